"""A compute budget that the error map spends: which components get a backward pass.

Detaching component `i`'s output (see `detachable_step`) saves `s_i` FLOPs of a
step, measured by XLA's cost analysis. Given a budget `b` (the fraction of a
full step's FLOPs to spend, averaged over the run, tracking included), the
`Budget` re-decides every `every` steps which components stay trained: those
whose EMA error is worth the most within what the budget has left.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from rgft_jax._costs import flops_of
from rgft_jax._peers import FreezeCosts
from rgft_jax._peers import dropbp_draw
from rgft_jax._peers import dropbp_rates
from rgft_jax._peers import greentrainer_select
from rgft_jax._validation import in_range
from rgft_jax._validation import number

RULES = (
  "top",
  "sample",
  "uniform",
  "shuffled",
  "static",
  "surgical_first",
  "surgical_last",
  "dropbp",
  "greentrainer",
)


@dataclasses.dataclass(frozen=True)
class DetachCosts:
  """FLOPs of a train step, and what detaching each component saves.

  Checked when made: distinct names, `full` finite and > 0, one finite saving
  per name, none above `full`, and savings that add up to at most `full`
  (a step with everything detached costs `floor` >= 0). A saving may be
  negative (detaching that component costs a little).

  Attributes:
    names: the component names.
    full: FLOPs of a step with nothing detached.
    saving: float64[n]; FLOPs saved by detaching component `i` alone.
    checks: `(detached names, measured FLOPs, predicted FLOPs)` of the
      sampled variants that tested whether savings add up.
  """

  names: tuple[str, ...]
  full: float
  saving: np.ndarray
  checks: tuple[tuple[tuple[str, ...], float, float], ...] = ()

  def __post_init__(self):
    names = self.names
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
      raise TypeError(f"names must be a sequence of strings, got {names!r}.")
    names = tuple(names)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
      raise ValueError(f"names must be distinct; {twice} appear more than once.")
    in_range("full", self.full, 0.0, None, low_open=True, finite=True)
    full = float(self.full)
    try:
      saving = np.array(self.saving, np.float64)
    except (TypeError, ValueError) as e:
      raise TypeError(
        f"saving must be an array of numbers, got {self.saving!r}."
      ) from e
    if saving.shape != (len(names),):
      raise ValueError(
        f"saving must have one entry per name ({len(names)}: {list(names)}), "
        f"got shape {saving.shape}."
      )
    bad = {
      n: float(v) for n, v in zip(names, saving, strict=True) if not np.isfinite(v)
    }
    if bad:
      raise ValueError(f"saving must be finite; got {bad}. Measure them again.")
    over = {n: float(v) for n, v in zip(names, saving, strict=True) if v > full}
    if over:
      raise ValueError(
        f"saving {over} exceeds full ({full}): detaching a component cannot save "
        "more than the whole step."
      )
    if full - saving.sum() < 0:
      raise ValueError(
        f"The savings add up to {saving.sum()}, more than full ({full}): a step "
        "with every component detached would cost less than nothing. Measure "
        "full and the savings on the same step."
      )
    object.__setattr__(self, "names", names)
    object.__setattr__(self, "full", full)
    object.__setattr__(self, "saving", saving)

  def step(self, detached: Any) -> float:
    """Predicted FLOPs of a step with `detached` (a set of names) detached.

    Savings add up. Raises ValueError naming any name that is not a component.
    """
    if isinstance(detached, str):
      raise TypeError(
        f"detached must be a collection of component names, got the string "
        f"{detached!r}; for one component pass {{{detached!r}}}."
      )
    detached = set(detached)
    unknown = sorted(detached - set(self.names))
    if unknown:
      raise ValueError(
        f"Unknown component names {unknown} in detached; the components are "
        f"{list(self.names)}."
      )
    idx = [i for i, n in enumerate(self.names) if n in detached]
    return float(self.full - self.saving[idx].sum())

  @property
  def floor(self) -> float:
    """Predicted FLOPs of a step with every component detached."""
    return self.step(self.names)

  @property
  def additivity_error(self) -> float:
    """Largest relative gap between a checked variant's FLOPs and the prediction."""
    return max((abs(m - p) / m for _, m, p in self.checks), default=0.0)


def detach_costs(
  step: Callable[..., Any],
  names: Sequence[str],
  *args: Any,
  samples: int = 2,
  seed: int = 0,
  compiled: bool = False,
  groups: Sequence[Sequence[str]] | None = None,
) -> DetachCosts:
  """Measures what detaching each component saves, from XLA's cost analysis.

  Lowers `step(*args, detached=...)` (a `detachable_step`) with nothing detached,
  with each component detached alone, with every component detached, and
  with `samples` random subsets; the last two check that savings add up
  (`DetachCosts.additivity_error`). With `compiled`, the compiled steps are
  analysed (slower; what actually runs); otherwise the lowered ones (0.04%
  apart on the ViT-B/16 step of `benchmarks/bench_sparse.py`).

  Args:
    step: a train step taking `detached=` (a frozenset of names).
    names: the component names.
    *args: example arguments of the step (arrays or `jax.ShapeDtypeStruct`s).
    samples: random subsets checked besides "everything detached".
    seed: seed of those subsets.
    compiled: analyse compiled rather than lowered steps.
    groups: components measured together, each charged an equal share of
      what detaching the group saves: the layers of one tap inside a scan
      over layers, where a static set detaching some layers only is a mask
      that saves nothing, while runtime gating saves each layer's share.
      Default: the `layer_groups` of a `detachable_step`'s components, else
      none.

  Returns:
    The `DetachCosts`.
  """
  names = tuple(names)
  units = _units(step, names, groups)

  def flops(detached):
    fn = lambda *a: step(*a, detached=frozenset(detached))  # noqa: E731
    return flops_of(fn, *args, compiled=compiled)

  full = flops(())
  saving = np.zeros(len(names), np.float64)
  for unit in units:
    share = (full - flops(unit)) / len(unit)
    saving[[names.index(n) for n in unit]] = share
  costs = DetachCosts(names, full, saving)
  rng = np.random.default_rng(seed)
  subsets = [names] + [
    tuple(n for unit in units if rng.random() < 0.5 for n in unit)
    for _ in range(samples)
  ]
  checks = tuple((s, flops(s), costs.step(s)) for s in subsets)
  costs = dataclasses.replace(costs, checks=checks)
  free = [n for n, s in zip(names, saving, strict=True) if s <= 0]
  if free:
    warnings.warn(
      f"Detaching {free} alone saves nothing (per-head detaching shares one "
      "einsum with the other heads); the budget always trains them.",
      RuntimeWarning,
      stacklevel=2,
    )
  if costs.additivity_error > 0.05:
    warnings.warn(
      f"Detach savings do not add up (largest gap {costs.additivity_error:.1%} "
      "on the sampled variants): budgets will be off by about that much.",
      RuntimeWarning,
      stacklevel=2,
    )
  return costs


def _units(
  step: Any, names: tuple[str, ...], groups: Sequence[Sequence[str]] | None
) -> list[tuple[str, ...]]:
  """The sets `detach_costs` measures: each group, and each name in none."""
  if groups is None:
    components = getattr(step, "components", None)
    groups = components.layer_groups if components is not None else ()
  units: list[tuple[str, ...]] = []
  seen: set[str] = set()
  for group in groups:
    group = tuple(n for n in group if n in names)
    if seen & set(group):
      raise ValueError(f"groups overlap: {sorted(seen & set(group))}.")
    seen.update(group)
    if group:
      units.append(group)
  units += [(n,) for n in names if n not in seen]
  return units


def best_within(
  error: Any, cost: Any, capacity: float, max_nodes: int = 200_000
) -> frozenset[int]:
  """The set of items with the most total error whose costs fit in `capacity`.

  An exact 0/1 knapsack (branch and bound over items sorted by error per
  cost, bounded by the fractional relaxation). Items that cost nothing (or
  less) are always in; items with no error are never added at a cost. The
  search visits at most `max_nodes` nodes (far more than tens of components
  need); past that it returns the best set found, never worse than filling
  greedily by error per cost, which it tries first.

  Examples:
    >>> import rgft_jax
    >>> sorted(rgft_jax.best_within([3.0, 2.0, 2.0], [2.0, 1.0, 1.0], 2.0))
    [1, 2]
  """
  error = np.maximum(np.nan_to_num(np.asarray(error, np.float64)), 0.0)
  cost = np.asarray(cost, np.float64)
  free = {i for i in range(len(cost)) if cost[i] <= 0}
  items = [i for i in range(len(cost)) if cost[i] > 0 and error[i] > 0]
  items.sort(key=lambda i: (-error[i] / cost[i], i))
  e = [error[i] for i in items]
  c = [cost[i] for i in items]
  best_value = 0.0
  best_take: tuple[int, ...] = ()
  # Nodes: (next item, room left, value so far, items taken).
  stack: list[tuple[int, float, float, tuple[int, ...]]]

  def bound(k, room, value):
    for j in range(k, len(items)):
      if c[j] <= room:
        room -= c[j]
        value += e[j]
      else:
        return value + e[j] * room / c[j]
    return value

  # Depth-first, "take" before "skip", so the greedy fill is found first.
  stack = [(0, float(capacity), 0.0, ())]
  nodes = 0
  while stack and nodes < max_nodes:
    nodes += 1
    k, room, value, take = stack.pop()
    if value > best_value:
      best_value, best_take = value, take
    if k == len(items) or bound(k, room, value) <= best_value:
      continue
    stack.append((k + 1, room, value, take))
    if c[k] <= room:
      stack.append((k + 1, room - c[k], value + e[k], (*take, items[k])))
  return frozenset(free) | frozenset(best_take)


def fill_in_order(order: Sequence[int], cost: Any, capacity: float) -> frozenset[int]:
  """Items taken in `order` while they fit (each one that fits is taken)."""
  cost = np.asarray(cost, np.float64)
  taken, room = set(), float(capacity)
  for i in order:
    if cost[i] <= room:
      taken.add(int(i))
      room -= max(cost[i], 0.0)
  return frozenset(taken)


def weighted_order(weights: Any, rng: np.random.Generator) -> list[int]:
  """A random order drawing each next item with probability in proportion to weight.

  Efraimidis-Spirakis keys `u ** (1 / w)`; items of weight 0 come last, in
  random order.
  """
  w = np.maximum(np.nan_to_num(np.asarray(weights, np.float64)), 0.0)
  u = rng.random(len(w))
  keys = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
  ties = rng.random(len(w))
  order = np.lexsort((-ties, -keys))  # Largest key first, ties at random.
  return [int(i) for i in order]


class Budget:
  """Spends a FLOP budget on the components with the most error.

  The run has `total_steps` steps; on average a step may cost `budget` times
  a full step (`unit`, by default `costs.full`). Step 0 detaches every
  component: it measures the whole error map at the lowest cost. At step 1 and every `every` steps
  after, the allocator reads RGFT's EMA error map and chooses the components
  that stay trained until the next decision (while no component has a
  positive EMA, every component counts as equally wrong):

  * `"top"`: the set with the most total EMA error whose savings forgone fit
    (exact, `best_within`), i.e. error per FLOP first;
  * `"sample"`: components drawn in proportion to their EMA error, each taken
    while it fits;
  * `"uniform"`: drawn uniformly, each taken while it fits (the control: same
    budget, no error map).

  Controls, which show what the error map adds:

  * `"shuffled"`: `"top"` on the EMA error map permuted across components,
    one permutation per run (from `seed`): a stable choice whose content
    does not follow the map;
  * `"static"`: every component detached (measured only) for the first
    measurement window, steps 0 to `every`; at step `1 + every` the `"top"`
    set within what the budget has left, held for the rest of the run;
  * `"surgical_first"` / `"surgical_last"`: the shallowest / deepest
    components by `depth`, up to the first that does not fit (Lee et al.,
    "Surgical fine-tuning improves adaptation to distribution shifts", ICLR
    2023: the first blocks for input-level shift, the last for output-level
    shift), re-filled at every decision as the budget left allows.

  Peers (see `rgft_jax._peers` for what each computes and where it departs
  from the original):

  * `"dropbp"` (DropBP, NeurIPS 2024): each branch detached at random with its
    own rate, re-drawn every step (`every=1`; runtime mode compiles once).
    Until `allocation_step` (10% of the run) every rate is the one that
    meets the budget in expectation; there the caller passes DropBP's
    sensitivity to `allocate` (`dropbp_sensitivity`), which sets the rates
    by DropBP's greedy 0.1 steps (`dropbp_rates`). A draw that would cost
    more than the step may cost detaches more branches, highest rate first.
  * `"greentrainer"` (GreenTrainer, ICLR 2024): `costs` are `FreezeCosts`
    (parameter tensors, frozen rather than detached) and `decide` takes
    GreenTrainer's importance (`greentrainer_importance`) instead of the
    error map; the set is its dynamic program's (`greentrainer_select`).
    The original re-selects every 2 of 5 epochs: set `every` to match.

  What fits: a step may cost the budget left divided by the steps left, so
  steps that cost less than their share leave more for later and the run's
  total never exceeds `budget * total_steps * unit` (the costs being
  `DetachCosts.step`). With `ramp_steps`, the per-step allowance falls
  linearly from a full step to the level that keeps the run's average at
  `budget` (progressive sparsification). With `hysteresis` h, components
  trained now count `1 + h` times their error in `"top"`, so the choice (and
  the compilations) change only for a clear gain.

  Args:
    costs: the `DetachCosts` of the train step (`FreezeCosts` for
      `"greentrainer"`, whose "detached" components are frozen tensors).
    budget: fraction of a full step's FLOPs to spend on average, in (0, 1];
      at least `costs.floor / unit`, the cost of a step with every
      component detached.
    total_steps: steps in the run.
    every: steps between decisions.
    rule: one of `RULES` (above).
    ramp_steps: steps over which the allowance falls from a full step.
    hysteresis: bonus of the components trained now, >= 0 (`"top"` and
      `"shuffled"`).
    seed: seed of `"sample"` and `"uniform"` (one draw per decision step)
      and of `"shuffled"`'s permutation, an integer >= 0.
    unit: the FLOPs `budget` is a fraction of, finite and > 0; default
      `costs.full` (the tracked step with nothing detached). Pass the FLOPs
      of a plain step without tracking to count the tracking against the
      budget.
    refresh: run step 0 and the step before each decision with nothing
      detached (paid from the budget), so every component is measured
      exactly before each decision. (A component below a detached one is
      measured without the gradient paths through the detached branch;
      `detachable_step(..., exact=True)` keeps such measurements out of the EMA.)
    depth: the surgical rules' order, one integer per component (its block
      from the input, say); ties keep the order of `costs.names`. Default:
      the position in `costs.names`.

  Examples:
    >>> import numpy as np
    >>> import rgft_jax
    >>> costs = rgft_jax.DetachCosts(("a", "b", "c"), 10.0, np.array([3.0, 3.0, 3.0]))
    >>> budget = rgft_jax.Budget(costs, 0.5, total_steps=10, every=5)
    >>> budget.detached == {"a", "b", "c"}  # Step 0 measures only.
    True
    >>> budget.spend(0, budget.detached)
    >>> budget.due(1)
    True
    >>> budget.decide(1, np.array([0.1, 0.9, 0.5]))
    >>> sorted(budget.trained)
    ['b']
  """

  def __init__(
    self,
    costs: DetachCosts | FreezeCosts,
    budget: float,
    total_steps: int,
    *,
    every: int = 20,
    rule: str = "top",
    ramp_steps: int = 0,
    hysteresis: float = 0.0,
    seed: int = 0,
    unit: float | None = None,
    refresh: bool = False,
    depth: Sequence[int] | None = None,
  ):
    if rule not in RULES:
      raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    kind = FreezeCosts if rule == "greentrainer" else DetachCosts
    if not isinstance(costs, kind):
      raise TypeError(
        f"rule {rule!r} takes {kind.__name__} costs, got {type(costs).__name__}."
      )
    if rule == "dropbp" and every != 1:
      raise ValueError(
        f"rule 'dropbp' draws a new set every step: every must be 1, got {every}."
      )
    in_range("budget", budget, 0.0, 1.0, low_open=True)
    in_range("total_steps", total_steps, 1, None)
    in_range("every", every, 1, None)
    in_range("ramp_steps", ramp_steps, 0, total_steps)
    in_range("hysteresis", hysteresis, 0.0, None, finite=True)
    in_range("seed", seed, 0, None)
    if unit is not None:
      in_range("unit", unit, 0.0, None, low_open=True, finite=True)
    for name, value in (
      ("total_steps", total_steps),
      ("every", every),
      ("ramp_steps", ramp_steps),
      ("seed", seed),
    ):
      if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    self.costs = costs
    self.budget = float(budget)
    self.total_steps = int(total_steps)
    self.every = int(every)
    self.rule = rule
    self.ramp_steps = int(ramp_steps)
    self.hysteresis = float(hysteresis)
    self.seed = int(seed)
    self.unit = float(costs.full if unit is None else unit)
    self.refresh = bool(refresh)
    self.depth = _depth(depth, costs.names)
    if rule == "static" and self.ramp_steps:
      raise ValueError(
        "rule 'static' holds one set after its measurement window; it takes no "
        f"ramp (got ramp_steps={self.ramp_steps})."
      )
    if rule == "static" and 1 + self.every >= self.total_steps:
      raise ValueError(
        f"rule 'static' decides at step 1 + every = {1 + self.every}, which a "
        f"run of total_steps={self.total_steps} never reaches; use a smaller "
        "every."
      )
    refreshes = self._refreshes(0)
    least = (total_steps - refreshes) * costs.floor + refreshes * costs.full
    floor = least / (total_steps * self.unit)
    if self.budget < floor:
      raise ValueError(
        f"budget {self.budget} is below {floor:.3f}, the cost of a step with every "
        "component detached (forward pass, measurement, and the gradients of the "
        "parameters in no component)"
        + (" and of the refresh steps" if self.refresh else "")
        + "; train fewer steps instead."
      )
    ramp = self._ramp_spend()
    if ramp + (self.total_steps - self.ramp_steps) * costs.floor > self._allowance:
      raise ValueError(
        f"ramp_steps={self.ramp_steps} spends too much of budget {self.budget}: "
        "the remaining steps could not stay within it even fully detached."
      )
    self.reset()

  @property
  def _allowance(self) -> float:
    return self.budget * self.total_steps * self.unit

  def _level(self) -> float:
    """Per-step fraction after the ramp that keeps the run's mean at `budget`."""
    r, t = self.ramp_steps, self.total_steps
    if r == 0:
      return self.budget
    return max((self.budget * t - r / 2) / (t - r / 2), 0.0)

  def _ramp_target(self, step: int) -> float:
    frac = step / self.ramp_steps
    return (1.0 - (1.0 - self._level()) * frac) * self.unit

  def _ramp_spend(self) -> float:
    return sum(
      max(self._ramp_target(t), self.costs.floor) for t in range(self.ramp_steps)
    )

  def reset(self) -> None:
    """Back to the start of the run."""
    self._detached = frozenset(self.costs.names)
    self.rates: np.ndarray | None = None  # "dropbp", once allocated.
    self.spent = 0.0
    self.charged = 0.0  # Of `spent`, what `charge` added.
    self.steps = 0
    self.decisions: list[tuple[int, list[str]]] = []

  @property
  def detached(self) -> frozenset[str]:
    """The components detached now."""
    return self._detached

  @property
  def trained(self) -> frozenset[str]:
    """The components trained now."""
    return frozenset(self.costs.names) - self._detached

  def due(self, step: int) -> bool:
    """Whether `step` is a decision step (1, 1 + every, 1 + 2 every, ...)."""
    return step >= 1 and (step - 1) % self.every == 0

  def is_refresh(self, step: int) -> bool:
    """Whether `step` runs with nothing detached (`refresh`: step 0 and the
    step before each decision)."""
    if not self.refresh:
      return False
    return step == 0 or (step + 1 < self.total_steps and self.due(step + 1))

  def _refreshes(self, start: int) -> int:
    return sum(self.is_refresh(t) for t in range(start, self.total_steps))

  def variant(self, step: int) -> frozenset[str]:
    """The components to detach at `step` (nothing on a refresh step)."""
    return frozenset() if self.is_refresh(step) else self._detached

  def target(self, step: int) -> float:
    """FLOPs a step may cost in the period starting at `step` (refresh steps
    aside, whose full cost is set apart first)."""
    refreshes = self._refreshes(step)
    period = min(self.every, self.total_steps - step)
    period -= sum(self.is_refresh(t) for t in range(step, step + period))
    left = self._allowance - self.spent - refreshes * self.costs.full
    rest = self.total_steps - step - refreshes
    if rest <= 0 or period <= 0:
      return self.costs.full
    share = left / rest
    if step < self.ramp_steps:
      # Never so much that the steps after this period could not stay within.
      room = (left - (rest - period) * self.costs.floor) / period
      return min(max(self._ramp_target(step), share), room)
    return share

  @property
  def allocation_step(self) -> int:
    """`"dropbp"`: the step at which `allocate` must have been called (10% of
    the run, as the original's `int(0.1 * max_iters)`, and at least 1)."""
    return max(1, int(0.1 * self.total_steps))

  def wants_sensitivity(self, step: int) -> bool:
    """Whether `allocate` is due before `decide(step)` (`"dropbp"` only)."""
    return self.rule == "dropbp" and self.rates is None and step >= self.allocation_step

  def allocate(self, sensitivity: Any) -> None:
    """`"dropbp"`: sets the drop rates from DropBP's sensitivity, once, at
    `allocation_step`, to meet what the budget has left in expectation."""
    if self.rule != "dropbp":
      raise ValueError(f"allocate() is for rule 'dropbp', not {self.rule!r}.")
    if self.rates is not None:
      raise ValueError("The drop rates are allocated already (once per run).")
    if self.steps != self.allocation_step:
      raise ValueError(
        f"allocate() belongs before step {self.allocation_step}; the budget is "
        f"at step {self.steps}."
      )
    self.rates = dropbp_rates(
      sensitivity, _saving(self).clip(min=0), self._keep(self.steps)
    )

  def _keep(self, step: int) -> float:
    """The fraction of the branches' backward FLOPs that step may keep."""
    saving = _saving(self).clip(min=0).sum()
    room = self.target(step) - self.costs.floor
    return float(np.clip(room / saving, 0.0, 1.0)) if saving > 0 else 1.0

  def decide(self, step: int, ema: Any) -> None:
    """Chooses the components trained from `step` on, from the EMA error map
    (GreenTrainer's importance for `"greentrainer"`)."""
    if step != self.steps:
      raise ValueError(
        f"decide({step}) out of order: the budget has accounted for {self.steps} "
        "steps; call spend() once per step, in order."
      )
    if step >= self.total_steps:
      raise ValueError(f"step {step} is past the run's {self.total_steps} steps.")
    ema = np.asarray(ema, np.float64)
    names = self.costs.names
    if ema.shape != (len(names),):
      raise ValueError(f"ema must have shape ({len(names)},), got {ema.shape}.")
    capacity = self.target(step) - self.costs.floor
    if self.wants_sensitivity(step):
      raise ValueError(
        f"Rule 'dropbp' allocates its rates at step {self.allocation_step}: call "
        "allocate(dropbp_sensitivity(...)) before decide()."
      )
    if self.rule != "greentrainer" and not (ema > 0).any():
      ema = np.ones_like(ema)  # No error signal yet (a zero-initialised head, say).
    trained = _RULE_OF[self.rule](self, step, ema, capacity)
    self._detached = frozenset(n for i, n in enumerate(names) if i not in trained)
    self.decisions.append((step, sorted(self.trained)))

  def charge(self, flops: float) -> None:
    """Counts `flops` spent outside the steps (a rule's own measurements:
    DropBP's sensitivity, GreenTrainer's trial step) against the budget;
    the steps after spend that much less."""
    value = number("flops", flops, finite=True)
    if value is None or value < 0:
      raise ValueError(f"flops must be a finite number >= 0, got {flops!r}.")
    self.spent += value
    self.charged += value
    least = self.spent + (self.total_steps - self.steps) * self.costs.floor
    if least > self._allowance * (1 + 1e-9):
      warnings.warn(
        f"The FLOPs charged so far ({self.charged:.4g}) leave the rest of the run "
        f"less than a fully detached step: it will spend {least / self._allowance:.3f}"
        " of its budget at least.",
        RuntimeWarning,
        stacklevel=2,
      )

  def spend(self, step: int, detached: Any) -> None:
    """Accounts for step `step`, run with `detached` detached."""
    if not 0 <= step < self.total_steps:
      raise ValueError(
        f"spend({step}): the run has total_steps={self.total_steps} (steps 0 to "
        f"{self.total_steps - 1}); make the Budget with more total_steps."
      )
    if step != self.steps:
      raise ValueError(f"spend({step}) out of order: expected step {self.steps}.")
    self.spent += self.costs.step(detached)
    self.steps += 1

  @property
  def fraction(self) -> float:
    """FLOPs spent so far over as many steps of `unit` FLOPs."""
    return self.spent / max(self.steps * self.unit, 1e-30)

  def _identity(self) -> dict[str, Any]:
    """What identifies this budget: its arguments and costs (JSON-able)."""
    if isinstance(self.costs, FreezeCosts):
      costs = {
        "forward": self.costs.forward,
        "alone": [float(s) for s in self.costs.alone],
        "weight": [float(s) for s in self.costs.weight],
      }
    else:
      costs = {
        "full": self.costs.full,
        "saving": [float(s) for s in _saving(self)],
      }
    return {
      "names": list(self.costs.names),
      **costs,
      "budget": self.budget,
      "total_steps": self.total_steps,
      "every": self.every,
      "rule": self.rule,
      "ramp_steps": self.ramp_steps,
      "hysteresis": self.hysteresis,
      "seed": self.seed,
      "unit": self.unit,
      "refresh": self.refresh,
    } | ({"depth": list(self.depth)} if self.rule.startswith("surgical") else {})

  def state_dict(self) -> dict[str, Any]:
    """The budget's progress, and what identifies the budget (`"budget_of"`)."""
    return {
      "detached": sorted(self._detached),
      "spent": self.spent,
      "charged": self.charged,
      "steps": self.steps,
      "decisions": self.decisions,
      "budget_of": self._identity(),
    } | ({"rates": _json_like(self.rates)} if self.rule == "dropbp" else {})

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores `state_dict()`'s progress into a budget made the same way.

    Raises ValueError if the state is of a budget with other arguments or
    costs (naming each field that differs), or is not a whole, sound state.
    """
    if not isinstance(state, Mapping):
      raise TypeError(f"state must be a dict, got {type(state).__name__}.")
    keys = ("detached", "spent", "steps", "decisions", "budget_of")
    missing = [k for k in keys if k not in state]
    if missing:
      raise ValueError(
        f"The budget state lacks {missing}: pass what Budget.state_dict() "
        "returned (a state saved before budgets recorded their arguments cannot "
        "be checked; start the run again)."
      )
    ours, theirs = self._identity(), dict(state["budget_of"])
    differ = [k for k in ours if ours[k] != _json_like(theirs.get(k))]
    if differ:
      listed = "; ".join(
        f"{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in differ
      )
      raise ValueError(
        f"This budget state is of another budget ({listed}): load it into a "
        "Budget made with the same costs and arguments."
      )
    unknown = set(state["detached"]) - set(self.costs.names)
    if unknown:
      raise ValueError(
        f"This budget state names components {sorted(unknown)} this budget lacks."
      )
    spent = number("spent", state["spent"], finite=True)
    if spent is None or spent < 0:
      raise ValueError(f"spent must be >= 0, got {state['spent']}.")
    in_range("steps", state["steps"], 0, self.total_steps, integer=True)
    rates = None
    if self.rule == "dropbp":
      if "rates" not in state:
        raise ValueError("This 'dropbp' budget state lacks its drop rates.")
      if state["rates"] is not None:
        rates = np.asarray(state["rates"], np.float64)
        if (
          rates.shape != (len(self.costs.names),)
          or not ((rates >= 0) & (rates <= 1)).all()
        ):
          raise ValueError(f"rates must be {len(self.costs.names)} numbers in [0, 1].")
    self.rates = rates
    self._detached = frozenset(state["detached"])
    charged = number("charged", state.get("charged", 0.0), finite=True)
    if charged is None or not 0 <= charged <= spent:
      raise ValueError(f"charged must be in [0, spent], got {state.get('charged')}.")
    self.spent = spent
    self.charged = charged
    self.steps = int(state["steps"])
    self.decisions = [(int(s), list(t)) for s, t in state["decisions"]]


def _saving(budget: Budget) -> np.ndarray:
  """The `DetachCosts.saving` of a budget that detaches (not `"greentrainer"`)."""
  assert isinstance(budget.costs, DetachCosts)  # Checked when made.
  return budget.costs.saving


def _depth(depth: Sequence[int] | None, names: tuple[str, ...]) -> tuple[int, ...]:
  """`depth` checked: one integer per component; default, the positions."""
  if depth is None:
    return tuple(range(len(names)))
  if isinstance(depth, str | bytes) or not hasattr(depth, "__len__"):
    raise TypeError(f"depth must be a sequence of integers, got {depth!r}.")
  if len(depth) != len(names):
    raise ValueError(
      f"depth must have one entry per component ({len(names)}), got {len(depth)}."
    )
  bad = [d for d in depth if not isinstance(d, int | np.integer) or isinstance(d, bool)]
  if bad:
    raise TypeError(f"depth must hold integers, got {bad}.")
  return tuple(int(d) for d in depth)


def _top(budget: Budget, step: int, ema: np.ndarray, capacity: float) -> frozenset[int]:
  """The most EMA error within `capacity` (trained components weigh 1 + h)."""
  del step
  names = budget.costs.names
  weight = np.where([n in budget.detached for n in names], 1.0, 1.0 + budget.hysteresis)
  return best_within(ema * weight, _saving(budget), capacity)


def _drawn(
  budget: Budget, step: int, ema: np.ndarray, capacity: float
) -> frozenset[int]:
  """`"sample"` (in proportion to error) or `"uniform"`, one draw per step."""
  rng = np.random.default_rng([budget.seed, step])
  if budget.rule == "sample":
    order = weighted_order(ema, rng)
  else:
    order = [int(i) for i in rng.permutation(len(ema))]
  return fill_in_order(order, _saving(budget), capacity)


def _shuffled(
  budget: Budget, step: int, ema: np.ndarray, capacity: float
) -> frozenset[int]:
  """`"top"` on the map permuted by the run's permutation."""
  rng = np.random.default_rng(np.random.SeedSequence(budget.seed, spawn_key=(1,)))
  perm = rng.permutation(len(ema))
  return _top(budget, step, ema[perm], capacity)


def _static(
  budget: Budget, step: int, ema: np.ndarray, capacity: float
) -> frozenset[int]:
  """Nothing trained until step `1 + every`; then `"top"`, held."""
  names = budget.costs.names
  if step < 1 + budget.every:
    return frozenset(i for i, s in enumerate(_saving(budget)) if s <= 0)
  if step > 1 + budget.every:
    return frozenset(i for i, n in enumerate(names) if n not in budget.detached)
  return _top(budget, step, ema, capacity)


def _surgical(
  budget: Budget, step: int, ema: np.ndarray, capacity: float
) -> frozenset[int]:
  """The shallowest (or deepest) components by `depth`, up to the first that
  does not fit: a contiguous run of blocks from the input (or the output)."""
  del step, ema
  sign = 1 if budget.rule == "surgical_first" else -1
  order = sorted(range(len(budget.depth)), key=lambda i: (sign * budget.depth[i], i))
  saving, taken, room = _saving(budget), set(), capacity
  for i in order:
    if saving[i] > room:
      break
    taken.add(i)
    room -= max(saving[i], 0.0)
  return frozenset(taken)


def _dropbp(
  budget: Budget, step: int, ema: np.ndarray, capacity: float
) -> frozenset[int]:
  """A fresh draw at the allocated rates (uniform ones before allocation)."""
  del ema
  rates = budget.rates
  if rates is None:
    rates = np.full(len(budget.costs.names), 1.0 - budget._keep(step))
  rng = np.random.default_rng([budget.seed, step])
  dropped = dropbp_draw(rates, rng, _saving(budget), capacity)
  return frozenset(range(len(rates))) - dropped


def _greentrainer(
  budget: Budget, step: int, importance: np.ndarray, capacity: float
) -> frozenset[int]:
  """GreenTrainer's dynamic program on the tensors' importance."""
  del step
  assert isinstance(budget.costs, FreezeCosts)  # Checked when made.
  return greentrainer_select(importance, budget.costs, capacity)


_RULE_OF: dict[str, Callable[[Budget, int, np.ndarray, float], frozenset[int]]] = {
  "top": _top,
  "sample": _drawn,
  "uniform": _drawn,
  "shuffled": _shuffled,
  "static": _static,
  "surgical_first": _surgical,
  "surgical_last": _surgical,
  "dropbp": _dropbp,
  "greentrainer": _greentrainer,
}


def _json_like(value: Any) -> Any:
  """Tuples and arrays as lists, so a state that went through JSON compares."""
  if isinstance(value, tuple | list | np.ndarray):
    return [_json_like(v) for v in value]
  if isinstance(value, np.floating):
    return float(value)
  return value
