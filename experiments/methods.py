"""The fine-tuning methods compared side by side, on one ViT parameter layout.

Every method is a `Method`: the parameters it trains from (LoRA and the
adapters add their own), how those become the model's parameters or logits,
which of them are trainable, the optax transformation, where RGFT's error map
comes from, and the step builder (`experiments.steps`). Each name is one
registry entry (`ENTRIES`) that builds its `Method`; the training loop knows
no method. Frozen parameters are held out of differentiation, so XLA drops
their weight-gradient work and the counted FLOPs show each method's real cost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

import rgft_jax
from experiments import adapters as adapters_lib
from experiments import budgets
from experiments import cli
from experiments import configs
from experiments import frozen
from experiments import lora as lora_lib
from experiments import masks
from experiments import steps as steps_lib
from experiments.budgets import BRANCH_RULES
from experiments.budgets import Costs
from experiments.error_maps import ERROR_METHODS
from experiments.error_maps import RandomErrorMap
from experiments.error_maps import ShuffledErrorMap
from experiments.error_maps import Tracked
from experiments.error_maps import random_map_seed
from experiments.grouping import MixedTracker
from experiments.policies import BudgetPolicy
from experiments.policies import LisaPolicy
from experiments.policies import Policy
from experiments.policies import block_layers
from experiments.registry import Registry
from experiments.trees import count
from experiments.trees import flat
from experiments.trees import identity
from experiments.trees import unflat

__all__ = (  # What other modules take from here, the registry's names aside.
  "BudgetPolicy",
  "Costs",
  "Hyper",
  "LisaPolicy",
  "Method",
  "Policy",
  "block_layers",
  "count",
  "flat",
  "identity",
  "infeasible",
  "make",
  "parse_name",
  "replace_head",
  "trainable_count",
  "unflat",
)

REGISTRY = Registry()  # Filled in below, one entry per method.
BUDGETS = (0.3, 0.5, 0.7)  # The budgets of `--methods all`.
# What `sum_i alpha_i size_i / sum_i size_i` over RGFT's block branches came to,
# averaged over the logged steps of the 10 committed `rgft_blocks` runs (5 seeds
# on each embedded task; 0.915 to 0.935 per run): the sparsification baselines
# train this fraction of those entries by default.
RGFT_BLOCKS_FRACTION = 0.926


def parse_name(name: str) -> tuple[str, float | None]:
  """`"rgft_budget@0.5"` -> `("rgft_budget", 0.5)`; `"full"` -> `("full", None)`."""
  return REGISTRY.parse(name)


@dataclasses.dataclass(frozen=True)
class Hyper(configs.RgftConfig, configs.BudgetConfig, configs.BaselineConfig):
  """What the methods read: one rule for all (the study tunes only the rate).

  RGFT's, the budget's and the baselines' settings come from the shared
  sub-configs (`experiments.configs`); `experiments.finetune.Config` extends it
  with the study's settings, so each field is declared once, with its default
  and its --help text (the comment).
  """

  learning_rate: float = 1e-3  # Fine-tuning Adam rate when --lr_grid is empty.
  steps: int = 200  # Fine-tuning steps (equal-FLOPs baselines run fewer).
  warmup_steps: int = 0  # RGFT: steps of the threshold's rise (0: --steps).
  # RGFT's attribution: norm_product, taylor, ablation (|exact|), random, or
  # shuffled (the norm_product map, permuted across components, one
  # permutation per run).
  error_method: str = "norm_product"
  adapter_width: int = 8  # Adapters: bottleneck width.
  # random_sparse, magnitude_sparse: fraction of the branches' entries trained.
  sparse_fraction: float = RGFT_BLOCKS_FRACTION
  budget_ramp: int = 0  # Budgeted RGFT: steps of the fall from full steps.
  budget_refresh: bool = False  # Budgeted RGFT: a full step before decisions.
  budget_exact: bool = False  # Budgeted RGFT: only exact measurements count.

  def validate(self) -> None:
    """Raises ValueError naming the flag and its allowed range."""
    cli.check_integers(
      self, {"steps": 1, "warmup_steps": 0, "adapter_width": 1, "budget_ramp": 0}
    )
    configs.BaselineConfig.validate(self)
    configs.BudgetConfig.validate(self)
    if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(
        f"--learning_rate must be finite and > 0, got {self.learning_rate}."
      )
    if not 0.0 < self.sparse_fraction <= 1.0:
      raise ValueError(
        f"--sparse_fraction must be in (0, 1], got {self.sparse_fraction}."
      )
    if self.error_method not in ERROR_METHODS:
      raise ValueError(
        f"--error_method must be one of {ERROR_METHODS}, got {self.error_method!r}."
      )
    if self.budget_ramp > self.steps:
      raise ValueError(
        f"--budget_ramp must be in [0, --steps={self.steps}], got {self.budget_ramp}."
      )
    if self.warmup_steps > self.steps:
      raise ValueError(
        f"--warmup_steps must be in [0, --steps={self.steps}], got {self.warmup_steps}."
      )
    configs.RgftConfig.validate(self)


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
  """A fine-tuning method: what it trains, its optimizer, how it picks variants.

  Variants (hashable) are what `policy` leaves out of a step: parameter paths
  for LISA, detached components for budgeted RGFT (`build_step` is then
  `steps.detached_step`). `steps` overrides the run's steps (equal-FLOPs
  baselines). `measure` gives the loss, gradients and the error map of
  methods with one (`error_maps`); `forward`, when set, gives the logits of
  `params` in place of `model.apply(to_model(params))` (adapters); `held`
  marks entries never updated (the sparsification baselines; their optimizer
  holds the same mask); `head` is where the classifier head sits in `params`.
  """

  name: str
  params: Any  # What the optimizer updates.
  to_model: Callable[[Any], Any]  # `params` -> the model's parameters.
  trainable: frozenset[str]  # Paths of `params` that are trained.
  tx: optax.GradientTransformation
  tracker: Any = None  # `rgft_jax.ErrorTracker` (or `grouping.MixedTracker`).
  components: rgft_jax.Components | None = None
  policy: Policy = dataclasses.field(default_factory=Policy)
  detaches: bool = False  # Variants name detached components.
  exact: bool = False  # Detached steps measure only what they measure exactly.
  steps: int | None = None
  measure: Callable[..., Any] | None = None
  forward: Callable[[nn.Module, Any, jax.Array], jax.Array] | None = None
  held: Any = None
  head: str = "head"
  build_step: Callable[..., Any] = steps_lib.dense_step
  # With these step costs the detached set is decided at run time (a scanned
  # model): variant `loop.RUNTIME` takes it as a boolean array, and a step
  # is charged `runtime.step(variant)` FLOPs.
  runtime: rgft_jax.DetachCosts | None = None
  recompute: bool = False  # Runtime-gated branches keep no residuals.

  def flags(self, variant: frozenset[str]) -> np.ndarray:
    """`variant` as a runtime step's boolean array over the components."""
    assert self.components is not None
    return np.array([n in variant for n in self.components.names], bool)


def trainable_count(method: Method) -> int:
  """Entries `method` trains: its trainable paths, less the entries it holds."""
  held = (
    0
    if method.held is None
    else sum(int(np.sum(m)) for m in jax.tree.leaves(method.held))
  )
  return count(method.params, method.trainable) - held


def replace_head(method: Method, tree: Any, head: Any) -> Any:
  """`tree` (a `method.params`) with `head` as the classifier head."""
  prefix = method.head + "/"
  kept = {p: v for p, v in flat(tree).items() if not p.startswith(prefix)}
  return unflat({**kept, **{prefix + p: v for p, v in flat(head).items()}})


def _frozen_tx(inner: optax.GradientTransformation, params, trainable) -> Any:
  """`inner` on the trainable leaves only (no optimizer state for the rest)."""
  labels = unflat({p: ("train" if p in trainable else "freeze") for p in flat(params)})
  return optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()}, labels)


def _base(tree: dict[str, Any]) -> Any:
  return tree["base"]


def infeasible(
  name: str, costs: Costs | None, hyper: Hyper | None = None
) -> str | None:
  """Why budgeted method `name` cannot run on a task with these costs, or None.

  Budgeted RGFT cannot spend less than a step with every branch detached
  (the forward pass, the measurement and the gradients outside the blocks);
  `static_budget` needs a run longer than its window (`hyper`'s), and LISA
  the looped layout.
  """
  base, budget = parse_name(name)
  if base == "lisa" and getattr(hyper, "scan", False):
    return "LISA holds whole blocks, which --scan stacks in one; run it looped"
  if budget is None or base not in BRANCH_RULES:
    return None
  steps = None if hyper is None else hyper.steps
  every = 0 if hyper is None else hyper.budget_every
  return budgets.unavailable(BRANCH_RULES[base], budget, costs, steps, every)


BUDGETED_RGFT = tuple(BRANCH_RULES)  # The methods a `Budget` drives.
# Attributions a budgeted run can use: detached steps feed the tracker's map
# to RGFT as it is (non-negative), with no random draw.
BUDGET_ERROR_METHODS = ("norm_product", "taylor")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a registry entry builds its method from (see `make`)."""

  name: str
  budget: float | None
  model: nn.Module
  params: Any
  example: jax.Array
  hyper: Hyper
  key: jax.Array
  seed: int
  costs: Costs | None

  @property
  def paths(self) -> frozenset[str]:
    return frozenset(flat(self.params))

  @property
  def head(self) -> frozenset[str]:
    return frozenset(p for p in self.paths if p.startswith("head/"))

  def adam(self) -> optax.GradientTransformation:
    return frozen.adam(self.hyper.learning_rate, self.hyper.adam_count)


def _rgft_tx(hyper: Hyper, comps: rgft_jax.Components):
  return rgft_jax.rgft(
    hyper.learning_rate,
    comps,
    beta=hyper.beta,
    thresh_init=hyper.thresh_init,
    thresh_final=hyper.thresh_final,
    warmup_steps=hyper.warmup_steps or hyper.steps,
    min_scale=hyper.min_scale,
    adam_count=hyper.adam_count,
  )


def _soft_rgft(s: Setup, select: str, error_method: str) -> Method:
  """Soft RGFT over `select` ("branches", "heads" or "mix"), map from `error_method`."""
  attribution = (
    "norm_product" if error_method in ("random", "shuffled") else error_method
  )
  if select == "mix":
    tracker = MixedTracker(s.model, method=attribution)
  else:
    tracker = rgft_jax.ErrorTracker(s.model, select=select, method=attribution)
  comps = tracker.components(s.params, s.example)
  tx = _rgft_tx(s.hyper, comps)
  if error_method == "random":  # The tracker only named the components.
    tx = optax.chain(random_map_seed(s.seed), tx)
    tracker, measure = None, RandomErrorMap(comps.names)
  elif error_method == "shuffled":
    tx = optax.chain(random_map_seed(s.seed), tx)
    measure = ShuffledErrorMap(Tracked(tracker), comps.names)
  else:
    measure = Tracked(tracker, absolute=error_method == "ablation")
  return Method(
    s.name, s.params, identity, s.paths, tx, tracker, comps, measure=measure
  )


def _full(s: Setup) -> Method:
  steps = None if s.budget is None else max(1, round(s.budget * s.hyper.steps))
  return Method(s.name, s.params, identity, s.paths, s.adam(), steps=steps)


def _block(name: str) -> int:
  """The encoder block of a component, looped or scanned (`encoderblock_3/...`
  or `encoderblock/3/...`)."""
  return int(re.search(r"encoderblock[_/](\d+)/", name).group(1))


def _dropbp_sensitivity(model: nn.Module, tracker, comps):
  """DropBP's sensitivity probe (`budgets.dropbp_probe`) on the ViT's loss."""
  loss = functools.partial(steps_lib.loss_and_accuracy, model)

  @jax.jit
  def grads(params, batch, flags):
    return tracker.value_and_grad(loss, has_aux=True, detach=flags)(params, batch)[1]

  return budgets.dropbp_probe(grads, comps.names)


def _budgeted(s: Setup) -> Method:
  """A `Budget` over the block branches: budgeted RGFT, its controls, or
  DropBP (Adam with every multiplier 1, as published; runtime-gated, since
  it draws a new set every step)."""
  if s.hyper.error_method not in BUDGET_ERROR_METHODS:
    raise ValueError(
      f"{s.name} needs --error_method in {BUDGET_ERROR_METHODS}, got "
      f"{s.hyper.error_method!r}."
    )
  tracker = rgft_jax.ErrorTracker(
    s.model, select="branches", method=s.hyper.error_method
  )
  comps = tracker.components(s.params, s.example)
  if s.costs.detach.names != comps.names:
    raise ValueError(
      f"The step costs are for components {s.costs.detach.names}, this model's "
      f"are {comps.names}."
    )
  h = s.hyper
  rule = BRANCH_RULES[parse_name(s.name)[0]]
  dropbp = rule == "dropbp"
  # Budgets are fractions of a full fine-tuning step; tracking is paid from them.
  policy = BudgetPolicy(
    rgft_jax.Budget(
      s.costs.detach,
      s.budget,
      total_steps=h.steps,
      every=1 if dropbp else h.budget_every,
      rule=rule,
      ramp_steps=h.budget_ramp,
      hysteresis=h.budget_hysteresis,
      seed=s.seed,
      unit=s.costs.full,
      refresh=h.budget_refresh,
      depth=[_block(n) for n in comps.names],
    ),
    sensitivity=_dropbp_sensitivity(s.model, tracker, comps) if dropbp else None,
  )
  tx = _rgft_tx(dataclasses.replace(h, min_scale=1.0) if dropbp else h, comps)
  return Method(
    s.name,
    s.params,
    identity,
    s.paths,
    tx,
    tracker,
    comps,
    policy,
    detaches=True,
    exact=h.budget_exact,
    build_step=steps_lib.detached_step,
    runtime=s.costs.detach if comps.layer_groups or dropbp else None,
    recompute=h.gate_recompute and bool(comps.layer_groups or dropbp),
  )


def _greentrainer(s: Setup) -> Method:
  """GreenTrainer: Adam on the parameter tensors its dynamic program picks
  within the budget, from their importance in an undone trial step, re-picked
  every `--greentrainer_period` of the run (0.4: at steps 1, 1 + 0.4 T and
  1 + 0.8 T, every 2 of the original's 5 epochs). A variant is the set of
  frozen tensors (`steps.dense_step` closes over it)."""
  if s.costs is None or s.costs.freeze is None:
    raise ValueError(f"{s.name} needs the task's freeze costs (measure_costs).")
  freeze, h = s.costs.freeze, s.hyper
  adam = s.adam()

  def loss(params, batch):
    return steps_lib.loss_and_accuracy(s.model, params, batch)[0]

  importance = budgets.greentrainer_probe(loss, adam, freeze.names)
  policy = BudgetPolicy(
    rgft_jax.Budget(
      freeze,
      s.budget,
      h.steps,
      every=max(1, math.ceil(h.greentrainer_period * h.steps)),
      rule="greentrainer",
      seed=s.seed,
      unit=s.costs.full,
    ),
    scores=importance,
  )
  return Method(s.name, s.params, identity, s.paths, adam, policy=policy)


def _head_only(s: Setup) -> Method:
  return Method(
    s.name, s.params, identity, s.head, _frozen_tx(s.adam(), s.params, s.head)
  )


def _bitfit(s: Setup) -> Method:
  trainable = s.head | {p for p in s.paths if p.endswith("/bias")}
  return Method(
    s.name, s.params, identity, trainable, _frozen_tx(s.adam(), s.params, trainable)
  )


# Kernels LoRA adapts: attention projections and both MLP layers.
_LORA_TARGET = re.compile(
  r".*/(MultiHeadDotProductAttention_1/(query|key|value|out)|MlpBlock_3/Dense_\d)/kernel"
)
_LORA_OUTPUT = re.compile(r".*/out/kernel")


def _lora(s: Setup) -> Method:
  factors = lora_lib.init(
    s.params, s.hyper.lora_rank, s.key, _LORA_TARGET, _LORA_OUTPUT
  )
  tree = {"base": s.params, "lora": factors}
  trainable = frozenset(
    p for p in flat(tree) if p.startswith("lora/") or p.startswith("base/head/")
  )
  tx = _frozen_tx(s.adam(), tree, trainable)
  return Method(s.name, tree, lora_lib.merge, trainable, tx, head="base/head")


def _adapters(s: Setup) -> Method:
  width = s.hyper.adapter_width
  tree = {
    "base": s.params,
    "adapters": adapters_lib.init(s.model, s.params, s.example, width, s.key),
  }
  trainable = frozenset(
    p for p in flat(tree) if p.startswith("adapters/") or p.startswith("base/head/")
  )
  tx = _frozen_tx(s.adam(), tree, trainable)
  return Method(
    s.name,
    tree,
    _base,
    trainable,
    tx,
    forward=adapters_lib.forward,
    head="base/head",
  )


def _masked(s: Setup, rule: str) -> Method:
  """A fixed mask over the block branches' entries (see `masks`)."""
  comps = rgft_jax.ErrorTracker(s.model, select="branches").components(
    s.params, s.example
  )
  fraction = s.hyper.sparse_fraction
  if rule == "random":
    held = masks.random_mask(comps, s.params, fraction, s.seed)
  else:
    held = masks.magnitude_mask(comps, s.params, fraction)
  tx = optax.chain(masks.hold_entries(held), s.adam())
  return Method(s.name, s.params, identity, s.paths, tx, held=held)


def _lisa(s: Setup) -> Method:
  h = s.hyper
  if "encoderblock" in s.params.get("Transformer", {}):
    raise ValueError(
      "LISA holds whole blocks, which a model scanned over layers stacks in "
      "one; run it without --scan."
    )
  policy = LisaPolicy(block_layers(s.paths), h.lisa_layers, h.lisa_period, s.seed)
  steps = None
  if s.budget is not None:
    steps = max(1, round(s.budget * h.steps * s.costs.full / s.costs.lisa))
  return Method(
    s.name, s.params, identity, s.paths, s.adam(), policy=policy, steps=steps
  )


_ENTRIES = (  # name, builder, budget ("none", "optional", "required"), help.
  ("full", _full, "optional", "Adam on every parameter; full@b runs b x steps"),
  (
    "rgft_blocks",
    lambda s: _soft_rgft(s, "branches", s.hyper.error_method),
    "none",
    "rgft() over each block's attention and MLP branch",
  ),
  (
    "rgft_heads",
    lambda s: _soft_rgft(s, "heads", s.hyper.error_method),
    "none",
    "rgft() over each attention head",
  ),
  ("lora", _lora, "none", "LoRA on the blocks' kernels, the head trained"),
  ("bitfit", _bitfit, "none", "the biases and the head"),
  ("head_only", _head_only, "none", "the classifier head alone"),
  (
    "lisa",
    _lisa,
    "optional",
    "LISA: random blocks trained, redrawn periodically; lisa@b runs fewer steps",
  ),
  (
    "rgft_mix",
    lambda s: _soft_rgft(s, "mix", s.hyper.error_method),
    "none",
    "rgft() over heads and MLP branches together",
  ),
  (
    "rgft_random",
    lambda s: _soft_rgft(s, "branches", "random"),
    "none",
    "control: rgft_blocks on a random error map",
  ),
  ("adapters", _adapters, "none", "bottleneck adapters after each block, the head"),
  (
    "random_sparse",
    lambda s: _masked(s, "random"),
    "none",
    "a fixed random mask over the branches' entries (--sparse_fraction)",
  ),
  (
    "magnitude_sparse",
    lambda s: _masked(s, "magnitude"),
    "none",
    "a fixed mask of the branches' largest entries (--sparse_fraction)",
  ),
  *(
    (name, _greentrainer if name == "greentrainer" else _budgeted, "required", help)
    for name, help in budgets.BUDGETED.items()
  ),
)
for _name, _build, _budget, _help in _ENTRIES:
  REGISTRY.register(_name, budget=_budget, help=_help)(_build)
METHODS = REGISTRY.names(BUDGETS)  # Every name `--methods all` runs.


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
  """The method `name` (see `REGISTRY`) set up on pretrained `params`.

  `key` draws LoRA's and the adapters' initial factors; `seed` seeds the
  random draws of LISA, the budget, the random mask and the random error
  map; budgeted methods (`name@b`) need the task's `costs`.
  """
  base, budget = parse_name(name)
  if budget is not None and costs is None:
    raise ValueError(f"{name} needs the task's step costs (costs=...).")
  setup = Setup(name, budget, model, params, example, hyper, key, seed, costs)
  return REGISTRY[base].build(setup)
