"""The fine-tuning methods compared side by side, on one ViT parameter layout.

Every method is a `Method`: the parameters it trains from (LoRA adds factors),
how those become the model's parameters, which of them are trainable, the optax
transformation, and for RGFT the `ErrorTracker`. Frozen parameters are held out
of differentiation, so XLA drops their weight-gradient work and the counted
FLOPs show each method's real cost.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import rgft_jax

BASE_METHODS = (
  "full",
  "rgft_blocks",
  "rgft_heads",
  "lora",
  "bitfit",
  "head_only",
  "lisa",
)
# Methods given a compute budget b as `name@b`: budgeted RGFT (the error map
# chooses which block branches get a backward pass; `top` or `sample`), the
# same budget spent uniformly at random, and the equal-FLOPs baselines (full
# fine-tuning and LISA trained for fewer steps, so their FLOPs match b).
BUDGET_METHODS = ("rgft_budget", "rgft_budget_sample", "uniform_budget", "full", "lisa")
BUDGETS = (0.3, 0.5, 0.7)
METHODS = BASE_METHODS + tuple(f"{m}@{b}" for b in BUDGETS for m in BUDGET_METHODS)

_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/")
# Kernels LoRA adapts: attention projections and both MLP layers.
_LORA_TARGET = re.compile(
  r".*/(MultiHeadDotProductAttention_1/(query|key|value|out)|MlpBlock_3/Dense_\d)/kernel"
)


def parse_name(name: str) -> tuple[str, float | None]:
  """`"rgft_budget@0.5"` -> `("rgft_budget", 0.5)`; `"full"` -> `("full", None)`."""
  base, at, budget = name.partition("@")
  if not at:
    if base not in BASE_METHODS:
      raise ValueError(f"Unknown method {name!r}; choose from {METHODS}.")
    return base, None
  if base not in BUDGET_METHODS:
    raise ValueError(
      f"Unknown budgeted method {name!r}; the budgeted ones are "
      f"{[m + '@<budget>' for m in BUDGET_METHODS]}."
    )
  try:
    value = float(budget)
  except ValueError:
    raise ValueError(f"The budget of {name!r} is not a number.") from None
  if not 0.0 < value <= 1.0:
    raise ValueError(f"The budget of {name!r} must be in (0, 1], got {value}.")
  return base, value


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Hyperparameters shared by every method (one rule for all, no per-method tuning)."""

  learning_rate: float = 1e-3
  steps: int = 300
  lora_rank: int = 4
  lisa_layers: int = 1  # Blocks trained at a time.
  lisa_period: int = 20  # Steps between re-sampling them.
  beta: float = 0.9
  thresh_init: float = 0.1
  thresh_final: float = 0.3
  min_scale: float = 0.01
  budget_every: int = 20  # Budgeted RGFT: steps between decisions.
  budget_ramp: int = 0  # Steps over which the allowance falls from full steps.
  budget_hysteresis: float = 0.1  # Bonus of the components trained now ("top").
  budget_refresh: bool = False  # A step with nothing detached before each decision.
  budget_exact: bool = False  # Only exact measurements enter the error map.


class Policy:
  """Chooses each step's variant: what the compiled step leaves out (nothing here)."""

  def variant(self, step: int, opt_state: Any) -> frozenset[str]:
    del step, opt_state
    return frozenset()

  def spend(self, step: int, variant: frozenset[str]) -> None:
    del step, variant

  def reset(self) -> None:
    """Back to the start of a run."""

  def state_dict(self) -> dict[str, Any]:
    return {}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    del state


@dataclasses.dataclass
class LisaPolicy(Policy):
  """LISA: `layers` random blocks trained, redrawn every `period` steps."""

  params: Any
  trainable: frozenset[str]
  layers: int
  period: int
  seed: int

  def variant(self, step, opt_state):
    del opt_state
    active = lisa_blocks(self.params, step, self.seed, self.layers, self.period)
    return frozenset(
      p
      for p in self.trainable
      if (m := _BLOCK.match(p)) is not None and int(m.group(1)) not in active
    )


@dataclasses.dataclass
class BudgetPolicy(Policy):
  """Budgeted RGFT: the variant is the set of detached components."""

  budget: rgft_jax.Budget

  def variant(self, step, opt_state):
    if self.budget.due(step):  # The only host read of the error map.
      ema = rgft_jax.residual_error_state(opt_state).error_map
      self.budget.decide(step, jax.device_get(ema))
    return self.budget.variant(step)

  def spend(self, step, variant):
    self.budget.spend(step, variant)

  def reset(self):
    self.budget.reset()

  def state_dict(self):
    return self.budget.state_dict()

  def load_state_dict(self, state):
    self.budget.load_state_dict(state)


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
  """A fine-tuning method: what it trains, its optimizer, how it picks variants.

  Variants (hashable) are what `policy` leaves out of a step: parameter paths
  for LISA, detached components for budgeted RGFT. `detaches` says which.
  `steps` overrides the run's steps (equal-FLOPs baselines).
  """

  name: str
  params: Any  # What the optimizer updates.
  to_model: Callable[[Any], Any]  # `params` -> the model's parameters.
  trainable: frozenset[str]  # Paths of `params` that are trained.
  tx: optax.GradientTransformation
  tracker: rgft_jax.ErrorTracker | None = None
  components: rgft_jax.Components | None = None
  policy: Policy = dataclasses.field(default_factory=Policy)
  detaches: bool = False  # Variants name detached components.
  exact: bool = False  # Detached steps measure only what they measure exactly.
  steps: int | None = None


def identity(tree: Any) -> Any:
  return tree


def flat(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(tree: dict[str, Any]) -> Any:
  return traverse_util.unflatten_dict(tree, sep="/")


def depth(params: Any) -> int:
  return 1 + max(int(m.group(1)) for p in flat(params) if (m := _BLOCK.match(p)))


def lisa_blocks(params, step: int, seed: int, layers: int, period: int) -> tuple:
  """The blocks LISA trains at `step`: `layers` of them, redrawn every `period`."""
  rng = np.random.default_rng([seed, step // period])
  return tuple(sorted(rng.choice(depth(params), size=layers, replace=False).tolist()))


def _frozen_tx(inner: optax.GradientTransformation, params, trainable) -> Any:
  """`inner` on the trainable leaves only (no optimizer state for the rest)."""
  labels = unflat({p: ("train" if p in trainable else "freeze") for p in flat(params)})
  return optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()}, labels)


def _lora_init(params, rank: int, key: jax.Array) -> dict[str, Any]:
  """Factors `a` [d_in, r] (scaled normal) and `b` [r, d_out] (zeros) per kernel."""
  factors = {}
  targets = sorted(p for p in flat(params) if _LORA_TARGET.fullmatch(p))
  for path, k in zip(targets, jax.random.split(key, len(targets)), strict=True):
    d_in, d_out = _lora_shape(path, flat(params)[path].shape)
    factors[path.replace("/", ".")] = {
      "a": jax.random.normal(k, (d_in, rank)) / np.sqrt(d_in),
      "b": jnp.zeros((rank, d_out)),
    }
  return factors


def _lora_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """A kernel as a matrix: out's [H, K, D] is [H*K, D], q/k/v's [D, H, K] is [D, H*K]."""
  if path.endswith("out/kernel"):
    return int(np.prod(shape[:-1])), shape[-1]
  return shape[0], int(np.prod(shape[1:]))


def _lora_merge(tree: dict[str, Any]) -> Any:
  base = flat(tree["base"])
  for key, f in tree["lora"].items():
    path = key.replace(".", "/")
    base[path] = base[path] + (f["a"] @ f["b"]).reshape(base[path].shape)
  return unflat(base)


@dataclasses.dataclass(frozen=True)
class Costs:
  """Per-step FLOPs a budgeted method is sized by (measured once per task).

  `detach` is what detaching each block branch of the RGFT step saves;
  `full` the FLOPs of a full fine-tuning step, the unit of every budget;
  `lisa` the FLOPs of a LISA step.
  """

  detach: rgft_jax.DetachCosts
  full: float
  lisa: float


def infeasible(name: str, costs: Costs | None) -> str | None:
  """Why budgeted method `name` cannot run on a task with these costs, or None.

  Budgeted RGFT cannot spend less than a step with every branch detached
  (the forward pass, the measurement and the gradients outside the blocks).
  """
  base, budget = parse_name(name)
  if budget is None or base not in _BUDGET_RULES:
    return None
  floor = costs.detach.floor / costs.full
  if budget < floor:
    return (
      f"budget {budget} is below {floor:.3f} of a full step, the cost of a step "
      "with every branch detached"
    )
  return None


_BUDGET_RULES = {
  "rgft_budget": "top",
  "rgft_budget_sample": "sample",
  "uniform_budget": "uniform",
}


def _rgft(model, params, example, hyper, select):
  tracker = rgft_jax.ErrorTracker(model, select=select)
  comps = tracker.components(params, example)
  tx = rgft_jax.rgft(
    hyper.learning_rate,
    comps,
    beta=hyper.beta,
    thresh_init=hyper.thresh_init,
    thresh_final=hyper.thresh_final,
    warmup_steps=hyper.steps,
    min_scale=hyper.min_scale,
  )
  return tracker, comps, tx


def make(
  name: str,
  model: nn.Module,
  params: Any,
  example: jax.Array,
  hyper: Hyper,
  key: jax.Array,
  seed: int = 0,
  costs: Costs | None = None,
) -> Method:
  """The method `name` (one of `METHODS`) set up on pretrained `params`.

  `seed` seeds LISA's and the budget's random draws; budgeted methods
  (`name@b`) need the task's `costs`.
  """
  base, budget = parse_name(name)
  adam = optax.adam(hyper.learning_rate)
  paths = frozenset(flat(params))
  head = frozenset(p for p in paths if p.startswith("head/"))
  if budget is not None and costs is None:
    raise ValueError(f"{name} needs the task's step costs (costs=...).")
  if base == "full":
    steps = None if budget is None else max(1, round(budget * hyper.steps))
    return Method(name, params, identity, paths, adam, steps=steps)
  if base in ("rgft_blocks", "rgft_heads"):
    select = "heads" if base == "rgft_heads" else "branches"
    tracker, comps, tx = _rgft(model, params, example, hyper, select)
    return Method(name, params, identity, paths, tx, tracker, comps)
  if base in _BUDGET_RULES:
    tracker, comps, tx = _rgft(model, params, example, hyper, "branches")
    rule = _BUDGET_RULES[base]
    if costs.detach.names != comps.names:
      raise ValueError(
        f"The step costs are for components {costs.detach.names}, this model's "
        f"are {comps.names}."
      )
    # Budgets are fractions of a full fine-tuning step; tracking is paid from them.
    policy = BudgetPolicy(
      rgft_jax.Budget(
        costs.detach,
        budget,
        total_steps=hyper.steps,
        every=hyper.budget_every,
        rule=rule,
        ramp_steps=hyper.budget_ramp,
        hysteresis=hyper.budget_hysteresis,
        seed=seed,
        unit=costs.full,
        refresh=hyper.budget_refresh,
      )
    )
    return Method(
      name,
      params,
      identity,
      paths,
      tx,
      tracker,
      comps,
      policy,
      detaches=True,
      exact=hyper.budget_exact,
    )
  if base == "head_only":
    return Method(name, params, identity, head, _frozen_tx(adam, params, head))
  if base == "bitfit":
    trainable = head | {p for p in paths if p.endswith("/bias")}
    return Method(
      name, params, identity, trainable, _frozen_tx(adam, params, trainable)
    )
  if base == "lora":
    tree = {"base": params, "lora": _lora_init(params, hyper.lora_rank, key)}
    trainable = frozenset(
      p for p in flat(tree) if p.startswith("lora/") or p.startswith("base/head/")
    )
    return Method(name, tree, _lora_merge, trainable, _frozen_tx(adam, tree, trainable))
  # LISA.
  if not 1 <= hyper.lisa_layers <= depth(params):
    raise ValueError(
      f"lisa_layers must be in [1, {depth(params)}], got {hyper.lisa_layers}."
    )
  policy = LisaPolicy(params, paths, hyper.lisa_layers, hyper.lisa_period, seed)
  steps = None
  if budget is not None:
    steps = max(1, round(budget * hyper.steps * costs.full / costs.lisa))
  return Method(name, params, identity, paths, adam, policy=policy, steps=steps)


def count(tree: Any, paths: frozenset[str] | None = None) -> int:
  """Number of parameter entries (at `paths`, or all)."""
  return sum(
    int(np.prod(np.shape(v)))
    for p, v in flat(tree).items()
    if paths is None or p in paths
  )
