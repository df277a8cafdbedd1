"""The training loop every study runs (`experiments.loop`), on a toy step."""

import dataclasses

import jax.numpy as jnp
import numpy as np

import rgft_jax
from experiments import loop
from experiments.policies import Policy


class Alternate(Policy):
  """Nothing left out on even steps, "a" on odd ones."""

  def variant(self, step, opt_state):
    del opt_state
    return frozenset({"a"}) if step % 2 else frozenset()


@dataclasses.dataclass(frozen=True)
class Toy:
  runtime: object = None
  components: object = None

  def flags(self, variant):
    return np.array([n in variant for n in ("a", "b")], bool)


def _make_step(variant):
  """Adds the batch, times 10 when "a" is left out; counts steps in the state."""
  scale = 10.0 if variant == frozenset({"a"}) else 1.0

  def step(tree, opt_state, batch):
    return tree + scale * batch, opt_state + 1, {"loss": tree}

  return step


BATCHES = [jnp.float32(b) for b in (1, 2, 3, 4, 5)]


def _train(steps=5, hooks=(), progress=None, tree=0.0, opt_state=0):
  variants = rgft_jax.StepVariants(_make_step)
  return loop.train(
    Toy(),
    variants,
    Alternate(),
    BATCHES,
    jnp.float32(tree),
    jnp.int32(opt_state),
    steps=steps,
    hooks=hooks,
    progress=progress,
  )


def test_each_step_runs_its_variant_and_is_counted():
  tree, opt_state, done = _train()
  # Steps 0, 2, 4 add their batch; steps 1, 3 add ten times theirs.
  assert float(tree) == 1 + 10 * 2 + 3 + 10 * 4 + 5
  assert int(opt_state) == 5
  assert done.step == 5
  assert done.counts.counts == {"all": 3, "a": 2}
  assert done.counts.names == {"all": [], "a": ["a"]}
  assert done.compilations == 2  # One per variant, each compiled once.


def test_hooks_run_every_nth_step_and_after_the_last():
  seen = {"every": [], "when": [], "timed": []}

  def note(key):
    return lambda now: seen[key].append((now.step, float(now.tree), now.last))

  hooks = [
    loop.Every(2, note("every")),
    loop.When(0, note("when"), when=lambda step, last: step == 3),
    loop.Every(1, note("timed"), timed=True),
    loop.Every(0, lambda now: seen.setdefault("never", []).append(now.step)),
  ]
  _train(hooks=hooks)
  assert seen["every"] == [(2, 21.0, False), (4, 64.0, False), (5, 69.0, True)]
  assert seen["when"] == [(3, 24.0, False)]
  assert [s for s, _, _ in seen["timed"]] == [1, 2, 3, 4, 5]
  assert "never" not in seen


def test_a_resumed_run_ends_where_an_uninterrupted_one_does():
  whole = _train()
  tree, opt_state, half = _train(steps=3)
  resumed = _train(steps=5, progress=half, tree=float(tree), opt_state=int(opt_state))
  assert float(resumed[0]) == float(whole[0])
  assert int(resumed[1]) == int(whole[1])
  assert resumed[2].counts.counts == whole[2].counts.counts
  assert resumed[2].step == 5


def test_hooks_and_compilation_are_left_out_of_the_wall_time(monkeypatch):
  now = {"t": 0.0}
  monkeypatch.setattr(loop.time, "perf_counter", lambda: now["t"])

  def slow_hook(_):
    now["t"] += 100.0  # A hook that takes 100 s of the fake clock.

  class SlowPolicy(Alternate):
    def prepare(self, step, tree, opt_state, batch):
      now["t"] += 1.0  # The policy's own work is the method's: timed.

  def slow_make_step(variant):
    now["t"] += 1000.0  # Building (and compiling) a variant's step.
    return _make_step(variant)

  variants = rgft_jax.StepVariants(slow_make_step)
  _, _, done = loop.train(
    Toy(),
    variants,
    SlowPolicy(),
    BATCHES,
    jnp.float32(0),
    jnp.int32(0),
    steps=5,
    hooks=[loop.Every(1, slow_hook)],
  )
  assert done.wall == 5.0  # One second of the policy per step, nothing else.


def test_a_runtime_gated_method_runs_one_step_with_its_flags():
  keys = []

  def make_step(key):
    keys.append(key)

    def step(tree, opt_state, batch, flags):
      return tree + jnp.sum(flags) * batch, opt_state, {"loss": tree}

    return step

  gated = Toy(runtime=object())
  tree, _, done = loop.train(
    gated,
    rgft_jax.StepVariants(make_step),
    Alternate(),
    BATCHES,
    jnp.float32(0),
    jnp.int32(0),
    steps=5,
  )
  assert keys == [loop.RUNTIME]  # One compiled step serves both variants.
  assert float(tree) == 2 + 4  # Odd steps flag "a" (one flag set).
  assert done.counts.counts == {"all": 3, "a": 2}
