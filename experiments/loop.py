"""The training loop of every study: a policy picks each step's variant, the
compiled step of that variant runs, hooks log, evaluate and checkpoint.

A method (`experiments.registry.Method`) trains a tree with an optimizer
state; its policy names what a step leaves out (a variant, a `frozenset` of
names) and `rgft_jax.StepVariants` holds one compiled step per variant
(`variants_of`). A runtime-gated method (`method.runtime` set) has
one compiled step, keyed `RUNTIME`, that takes the variant as a boolean array
over `method.components.names`. The loop times the steps (the policy's own
measurements included) and leaves compilation and hooks out of the time.

What a study does around it (its records, logging, evaluation, resuming) is
given as hooks: `Every(n, fn)` calls `fn(now)` after every n-th step and the
last, with the loop's clock stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax

from rgft_jax import StepVariants

RUNTIME = "runtime"  # The variant key of a runtime-gated step.


def variants_of(method: Any) -> StepVariants:
  """The compiled steps of `method`, one per variant, for runs of every
  learning rate and seed (what differs between them is in the state)."""
  return StepVariants(method.make_step, max_variants=32)


def step_key(method: Any, variant: frozenset[str]) -> tuple[Any, tuple[Any, ...]]:
  """`(compiled step's key, extra arguments)` of `method`'s step running `variant`."""
  if method.runtime is None:
    return variant, ()
  return RUNTIME, (method.flags(variant),)


class StepCounts:
  """Steps run per variant, by the variant's name, and each name's set."""

  def __init__(self, counts=None, names=None):
    self.counts: dict[str, int] = dict(counts or {})
    self.names: dict[str, list[str]] = dict(names or {})

  def add(self, name: str, variant: frozenset[str]) -> None:
    self.counts[name] = self.counts.get(name, 0) + 1
    if name not in self.names:
      self.names[name] = sorted(variant)

  def flops(self, cost_of) -> float:
    """FLOPs of the steps counted so far (`cost_of`: see `step_cost`)."""
    return sum(cost_of(frozenset(self.names[v]))[0] * n for v, n in self.counts.items())

  def costs(self, cost_of) -> tuple[dict[str, float], int]:
    """FLOPs of each variant that ran, by name, and the largest peak bytes."""
    flops, peak = {}, 0
    for name, members in self.names.items():
      f, p = cost_of(frozenset(members))
      flops[name] = f
      peak = max(peak, p)
    return flops, peak


def step_cost(method: Any, variants: StepVariants, *args):
  """`variant -> (FLOPs, peak bytes)` of `method`'s step (`args`: a step's
  arguments). A runtime-gated step is charged its full FLOPs minus what the
  variant detaches (XLA counts both sides of each gate)."""

  def cost_of(variant: frozenset[str]) -> tuple[float, int]:
    key, extra = step_key(method, variant)
    flops, peak = variants.cost(key, *args, *extra)
    if method.runtime is not None:
      flops = method.runtime.step(variant)
    return flops, int(peak)

  return cost_of


class Clock:
  """Wall time of the loop, paused for compilation and hooks."""

  def __init__(self, elapsed: float = 0.0):
    self.elapsed, self._tic = elapsed, time.perf_counter()

  def pause(self, sync: Any) -> None:
    jax.block_until_ready(sync)
    self.elapsed += time.perf_counter() - self._tic

  def resume(self) -> None:
    self._tic = time.perf_counter()


@dataclasses.dataclass
class Progress:
  """Where a run is: steps done, steps run per variant, wall time, compilations."""

  step: int = 0
  counts: StepCounts = dataclasses.field(default_factory=StepCounts)
  wall: float = 0.0
  compilations: int = 0


@dataclasses.dataclass(frozen=True)
class Now:
  """What a hook sees after a step: the step just done (from 1), the trained
  tree and optimizer state, the step's metrics (on device), its variant,
  whether it is the run's last, and the run's progress."""

  step: int
  tree: Any
  opt_state: Any
  metrics: dict[str, Any]
  variant: frozenset[str]
  last: bool
  progress: Progress


@dataclasses.dataclass(frozen=True)
class Every:
  """A hook: `fn(now)` after every `every`-th step and the last (0: never).

  The clock stops while it runs, unless `timed` (a hook as cheap as a
  progress bar's tick, which should not wait for the step to finish).
  """

  every: int
  fn: Callable[[Now], None]
  timed: bool = False

  def due(self, step: int, last: bool) -> bool:
    return self.every > 0 and (step % self.every == 0 or last)


@dataclasses.dataclass(frozen=True)
class When(Every):
  """A hook: `fn(now)` after the steps where `when(step, last)` holds."""

  when: Callable[[int, bool], bool] = lambda step, last: False

  def due(self, step: int, last: bool) -> bool:
    return self.when(step, last)


def train(
  method: Any,
  variants: StepVariants,
  policy: Any,
  batches,
  tree: Any,
  opt_state: Any,
  *,
  steps: int,
  hooks: Sequence[Every] = (),
  progress: Progress | None = None,
) -> tuple[Any, Any, Progress]:
  """Runs steps `progress.step .. steps - 1` (from 0 without `progress`).

  `batches[step]` is a step's batch (a resumed run sees the same data);
  `policy` (`experiments.policies.Policy`) picks each step's variant and is
  told what was spent. Returns the trained tree, its optimizer state and the
  progress (wall time without compilation and hooks).
  """
  at = progress or Progress()
  counts, compilations = at.counts, at.compilations
  clock = Clock(at.wall)
  for step in range(at.step, steps):
    batch = batches[step]
    policy.prepare(step, tree, opt_state, batch)  # Timed: part of the method.
    variant = policy.variant(step, opt_state)
    key, extra = step_key(method, variant)
    if not variants.has(key, tree, opt_state, batch, *extra):
      clock.pause(tree)  # Compilation is reported, not timed.
      variants.compiled(key, tree, opt_state, batch, *extra)
      compilations += 1
      clock.resume()
    counts.add(policy.variant_name(variant), variant)
    tree, opt_state, metrics = variants(key, tree, opt_state, batch, *extra)
    policy.spend(step, variant)
    done, last = step + 1, step + 1 == steps
    due = [h for h in hooks if h.due(done, last)]
    timed = [h for h in due if h.timed]
    due = [h for h in due if not h.timed]
    if due:
      clock.pause(tree)  # Hooks are not timed.
    if due or timed:
      at = Progress(done, counts, clock.elapsed, compilations)
      now = Now(done, tree, opt_state, metrics, variant, last, at)
      for hook in due + timed:
        hook.fn(now)
    if due:
      clock.resume()
  clock.pause(tree)
  return (
    tree,
    opt_state,
    Progress(max(at.step, steps), counts, clock.elapsed, compilations),
  )
