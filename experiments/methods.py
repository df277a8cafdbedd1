"""The ViT's fine-tuning methods, one registry entry each, on one parameter layout.

Each builder returns a `Method` (`registry.Method`: a run's start from a
learning rate and a seed, the step of each variant, the policy picking
variants), set up on the pretrained parameters: what it trains (LoRA and
the adapters add their own parameters), how that becomes the model's
parameters or logits, the optimizer (which holds the learning rate, so one
compiled step serves every rate and seed), and where RGFT's error map comes
from (`experiments.steps` builds the steps). The training loop knows no
method. Frozen parameters are held out of differentiation, so XLA drops
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
from experiments import registry
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
  "held_count",
  "identity",
  "infeasible",
  "make",
  "parse_name",
  "replace_head",
  "rgft_parts",
  "trainable_count",
  "trained_paths",
  "unflat",
)

REGISTRY = registry.METHODS.task("vit")  # The ViT's builders, registered below.
BUDGETS = (0.3, 0.5, 0.7)  # The budgets of `--methods all`.
# What `sum_i alpha_i size_i / sum_i size_i` over RGFT's block branches came to,
# averaged over the logged steps of the 10 `rgft_blocks` runs (5 seeds on each
# embedded task; 0.915 to 0.935 per run) of the 400-step default's earlier
# version, made on another machine: the sparsification baselines train this
# fraction of those entries by default.
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
class Method(registry.Method):
  """A ViT method: a harness `registry.Method`, plus where the classifier
  head sits in its tree and, for the adapters, the logits of the tree
  (`forward(model, tree, images)`, in place of the model on `to_params`)."""

  forward: Callable[[nn.Module, Any, jax.Array], jax.Array] | None = None
  head: str = "head"


def held_count(opt_state: Any) -> int:
  """Entries a `masks.hold_entries` in `opt_state` holds (0 without one)."""
  held = masks.held_entries(opt_state)
  return 0 if held is None else sum(int(np.sum(m)) for m in jax.tree.leaves(held))


def trained_paths(method: Method, tree: Any) -> frozenset[str]:
  """The paths of `tree` that `method` trains (all when it does not say)."""
  return frozenset(flat(tree)) if method.trainable is None else method.trainable


def trainable_count(method: Method, tree: Any, opt_state: Any) -> int:
  """Entries `method` trains in `tree`: its trainable paths, less the entries
  its optimizer holds."""
  return count(tree, trained_paths(method, tree)) - held_count(opt_state)


def replace_head(method: Method, tree: Any, head: Any) -> Any:
  """`tree` (a `method`'s trained tree) with `head` as the classifier head."""
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

  A budget cannot spend less than its cheapest step (`budgets.unavailable`:
  every branch detached, or GreenTrainer training no tensor);
  `static_budget` needs a run longer than its window (`hyper`'s), and LISA
  the looped layout.
  """
  base, budget = parse_name(name)
  if base == "lisa" and getattr(hyper, "scan", False):
    return "LISA holds whole blocks, which --scan stacks in one; run it looped"
  rule = budgets.RULES.get(base)
  if budget is None or rule is None:
    return None
  steps = None if hyper is None else hyper.steps
  every = 0 if hyper is None else hyper.budget_every
  return budgets.unavailable(rule, budget, costs, steps, every)


BUDGETED_RGFT = tuple(BRANCH_RULES)  # The methods a `Budget` drives.
# Attributions a budgeted run can use: detached steps feed the tracker's map
# to RGFT as it is (non-negative), with no random draw.
BUDGET_ERROR_METHODS = ("norm_product", "taylor")


def init_key(seed: int) -> jax.Array:
  """The key of a run's own initial parameters (LoRA's, the adapters')."""
  return jax.random.fold_in(jax.random.key(seed), 1)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a registry entry builds its method from (see `make`)."""

  name: str
  budget: float | None
  model: nn.Module
  params: Any
  example: jax.Array
  hyper: Hyper
  costs: Costs | None

  @property
  def paths(self) -> frozenset[str]:
    return frozenset(flat(self.params))

  @property
  def head(self) -> frozenset[str]:
    return frozenset(p for p in self.paths if p.startswith("head/"))

  def adam(self, learning_rate: float) -> optax.GradientTransformation:
    return frozen.injected(
      lambda rate: frozen.adam(rate, self.hyper.adam_count), learning_rate
    )


TxOf = Callable[[float, int], optax.GradientTransformation]  # (rate, seed) -> tx


def _dense(
  s: Setup,
  tx_of: TxOf,
  trainable: frozenset[str],
  *,
  tree_of: Callable[[int], Any] | None = None,
  to_params: Callable[[Any], Any] = identity,
  forward: Callable[..., jax.Array] | None = None,
  measure: Callable[..., Any] | None = None,
  components: rgft_jax.Components | None = None,
  **fields: Any,
) -> Method:
  """A method whose step differentiates `trainable` (`steps.dense_step`):
  `tx_of(rate, seed)` its optimizer (the rate and the seed only shape its
  state), `tree_of(seed)` the tree it trains (the pretrained parameters),
  `to_params`/`forward` how that gives the model's output, `measure` RGFT's
  error map; `fields` the rest of the `Method`'s."""
  tree_of = tree_of or (lambda seed: s.params)
  loss_fn = steps_lib.method_loss(s.model, to_params, forward)
  tx = tx_of(1.0, 0)

  def init(learning_rate: float, seed: int):
    tree = tree_of(seed)
    return tree, tx_of(learning_rate, seed).init(tree)

  return Method(
    s.name,
    init,
    lambda variant: steps_lib.dense_step(loss_fn, tx, trainable, variant, measure),
    to_params=to_params,
    trainable=trainable,
    components=components,
    forward=forward,
    **fields,
  )


def _rgft_tx(
  hyper: Hyper,
  comps: rgft_jax.Components,
  learning_rate: float | None = None,
  min_scale: float | None = None,
):
  """RGFT with `hyper`'s settings at `learning_rate` (`hyper`'s if None), the
  threshold rising over `--warmup_steps` (0: the run)."""
  rate = hyper.learning_rate if learning_rate is None else learning_rate
  return hyper.rgft_tx(rate, comps, hyper.warmup_steps or hyper.steps, min_scale)


def rgft_parts(model: nn.Module, params: Any, example: jax.Array, hyper: Hyper):
  """`rgft_blocks`' tracker, components and optimizer (at `hyper`'s rate):
  what the budgeted methods' step costs are measured on."""
  tracker = rgft_jax.ErrorTracker(model, select="branches", method=_attribution(hyper))
  comps = tracker.components(params, example)
  return tracker, comps, _rgft_tx(hyper, comps)


def _attribution(hyper: Hyper, error_method: str | None = None) -> str:
  """The tracker's attribution for `error_method` (`hyper`'s if None): the
  random and shuffled maps only need the components it names."""
  error_method = error_method or hyper.error_method
  return "norm_product" if error_method in ("random", "shuffled") else error_method


def _soft_rgft(s: Setup, select: str, error_method: str) -> Method:
  """Soft RGFT over `select` ("branches", "heads" or "mix"), map from `error_method`."""
  attribution = _attribution(s.hyper, error_method)
  if select == "mix":
    tracker = MixedTracker(s.model, method=attribution)
  else:
    tracker = rgft_jax.ErrorTracker(s.model, select=select, method=attribution)
  comps = tracker.components(s.params, s.example)

  def tx_of(learning_rate, seed):
    tx = _rgft_tx(s.hyper, comps, learning_rate)
    if error_method in ("random", "shuffled"):  # The map's seed, in the state.
      tx = optax.chain(random_map_seed(seed), tx)
    return tx

  if error_method == "random":  # The tracker only named the components.
    measure: Any = RandomErrorMap(comps.names)
  elif error_method == "shuffled":
    measure = ShuffledErrorMap(Tracked(tracker), comps.names)
  else:
    measure = Tracked(tracker, absolute=error_method == "ablation")
  return _dense(s, tx_of, s.paths, measure=measure, components=comps)


def _full(s: Setup) -> Method:
  steps = None if s.budget is None else max(1, round(s.budget * s.hyper.steps))
  return _dense(s, lambda lr, seed: s.adam(lr), s.paths, steps=steps)


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
  assert s.costs is not None
  costs = s.costs
  if costs.detach.names != comps.names:
    raise ValueError(
      f"The step costs are for components {costs.detach.names}, this model's "
      f"are {comps.names}."
    )
  h = s.hyper
  rule = BRANCH_RULES[parse_name(s.name)[0]]
  dropbp = rule == "dropbp"
  sensitivity = _dropbp_sensitivity(s.model, tracker, comps) if dropbp else None

  def policy(seed: int) -> BudgetPolicy:
    # Budgets are fractions of a full fine-tuning step; tracking is paid from them.
    return BudgetPolicy(
      rgft_jax.Budget(
        costs.detach,
        s.budget,
        total_steps=h.steps,
        every=1 if dropbp else h.budget_every,
        rule=rule,
        ramp_steps=h.budget_ramp,
        hysteresis=h.budget_hysteresis,
        seed=seed,
        unit=costs.full,
        refresh=h.budget_refresh,
        depth=[_block(n) for n in comps.names],
      ),
      sensitivity=sensitivity,
    )

  def tx_of(learning_rate):
    return _rgft_tx(h, comps, learning_rate, 1.0 if dropbp else None)

  gated = bool(comps.layer_groups or dropbp)
  tx = tx_of(1.0)
  return Method(
    s.name,
    lambda learning_rate, seed: (s.params, tx_of(learning_rate).init(s.params)),
    lambda variant: steps_lib.detached_step(
      s.model,
      tracker,
      tx,
      comps,
      variant,
      exact=h.budget_exact,
      recompute=h.gate_recompute and gated,
    ),
    policy,
    trainable=s.paths,
    components=comps,
    runtime=costs.detach if gated else None,
  )


def _greentrainer(s: Setup) -> Method:
  """GreenTrainer: Adam on the parameter tensors its dynamic program picks
  within the budget, from their importance in an undone trial step, re-picked
  every `--greentrainer_period` of the run (0.4: at steps 1, 1 + 0.4 T and
  1 + 0.8 T, every 2 of the original's 5 epochs). A variant is the set of
  frozen tensors (`steps.dense_step` closes over it)."""
  if s.costs is None or s.costs.freeze is None:
    raise ValueError(f"{s.name} needs the task's freeze costs (measure_costs).")
  costs, h = s.costs, s.hyper
  freeze = costs.freeze
  assert freeze is not None

  def loss(params, batch):
    return steps_lib.loss_and_accuracy(s.model, params, batch)[0]

  # Its trial step reads the run's rate from the run's state.
  importance = budgets.greentrainer_probe(loss, s.adam(1.0), freeze.names)

  def policy(seed: int) -> BudgetPolicy:
    return BudgetPolicy(
      rgft_jax.Budget(
        freeze,
        s.budget,
        h.steps,
        every=max(1, math.ceil(h.greentrainer_period * h.steps)),
        rule="greentrainer",
        seed=seed,
        unit=costs.full,
      ),
      scores=importance,
    )

  return _dense(s, lambda lr, seed: s.adam(lr), s.paths, policy=policy)


def _head_only(s: Setup) -> Method:
  return _dense(s, lambda lr, seed: _frozen_tx(s.adam(lr), s.params, s.head), s.head)


def _bitfit(s: Setup) -> Method:
  trainable = s.head | {p for p in s.paths if p.endswith("/bias")}
  return _dense(
    s, lambda lr, seed: _frozen_tx(s.adam(lr), s.params, trainable), trainable
  )


# Kernels LoRA adapts: attention projections and both MLP layers.
_LORA_TARGET = re.compile(
  r".*/(MultiHeadDotProductAttention_1/(query|key|value|out)|MlpBlock_3/Dense_\d)/kernel"
)
_LORA_OUTPUT = re.compile(r".*/out/kernel")


def _with_own(s: Setup, name: str, init_own: Callable[[jax.Array], Any], **fields):
  """A method training `name`'s parameters of its own (drawn from the run's
  seed, `init_key`) beside the frozen pretrained ones, and the head."""

  def tree_of(seed: int) -> dict[str, Any]:
    return {"base": s.params, name: init_own(init_key(seed))}

  tree = tree_of(0)  # The layout, the same for every seed.
  trainable = frozenset(
    p for p in flat(tree) if p.startswith(name + "/") or p.startswith("base/head/")
  )
  return _dense(
    s,
    lambda lr, seed: _frozen_tx(s.adam(lr), tree, trainable),
    trainable,
    tree_of=tree_of,
    head="base/head",
    **fields,
  )


def _lora(s: Setup) -> Method:
  rank = s.hyper.lora_rank
  return _with_own(
    s,
    "lora",
    lambda key: lora_lib.init(s.params, rank, key, _LORA_TARGET, _LORA_OUTPUT),
    to_params=lora_lib.merge,
  )


def _adapters(s: Setup) -> Method:
  width = s.hyper.adapter_width
  return _with_own(
    s,
    "adapters",
    lambda key: adapters_lib.init(s.model, s.params, s.example, width, key),
    to_params=_base,
    forward=adapters_lib.forward,
  )


def _masked(s: Setup, rule: str) -> Method:
  """A fixed mask over the block branches' entries (see `masks`), drawn from
  the run's seed for "random"; it lives in the optimizer state."""
  comps = rgft_jax.ErrorTracker(s.model, select="branches").components(
    s.params, s.example
  )
  fraction = s.hyper.sparse_fraction

  def tx_of(learning_rate, seed):
    if rule == "random":
      held = masks.random_mask(comps, s.params, fraction, seed)
    else:
      held = masks.magnitude_mask(comps, s.params, fraction)
    return optax.chain(masks.hold_entries(held), s.adam(learning_rate))

  return _dense(s, tx_of, s.paths)


def _lisa(s: Setup) -> Method:
  h = s.hyper
  if "encoderblock" in s.params.get("Transformer", {}):
    raise ValueError(
      "LISA holds whole blocks, which a model scanned over layers stacks in "
      "one; run it without --scan."
    )
  steps = None
  if s.budget is not None:
    assert s.costs is not None
    steps = max(1, round(s.budget * h.steps * s.costs.full / s.costs.lisa))
  layers = block_layers(s.paths)
  return _dense(
    s,
    lambda lr, seed: s.adam(lr),
    s.paths,
    policy=lambda seed: LisaPolicy(layers, h.lisa_layers, h.lisa_period, seed),
    steps=steps,
  )


_BUILDERS = (  # name, builder, budget ("none", "optional", "required").
  ("full", _full, "optional"),
  ("rgft_blocks", lambda s: _soft_rgft(s, "branches", s.hyper.error_method), "none"),
  ("rgft_heads", lambda s: _soft_rgft(s, "heads", s.hyper.error_method), "none"),
  ("lora", _lora, "none"),
  ("bitfit", _bitfit, "none"),
  ("head_only", _head_only, "none"),
  ("lisa", _lisa, "optional"),
  ("rgft_mix", lambda s: _soft_rgft(s, "mix", s.hyper.error_method), "none"),
  ("rgft_random", lambda s: _soft_rgft(s, "branches", "random"), "none"),
  ("adapters", _adapters, "none"),
  ("random_sparse", lambda s: _masked(s, "random"), "none"),
  ("magnitude_sparse", lambda s: _masked(s, "magnitude"), "none"),
  *(
    (name, _greentrainer if name == "greentrainer" else _budgeted, "required")
    for name in budgets.BUDGETED
  ),
)
for _name, _build, _budget in _BUILDERS:
  registry.METHODS.register(_name, task="vit", budget=_budget)(_build)
METHODS = REGISTRY.names(BUDGETS)  # Every name `--methods all` runs.


def make(
  name: str,
  model: nn.Module,
  params: Any,
  example: jax.Array,
  hyper: Hyper,
  costs: Costs | None = None,
) -> Method:
  """The method `name` (see `REGISTRY`) set up on pretrained `params`.

  A run starts from `method.init(learning_rate, seed)`: the seed draws
  LoRA's and the adapters' initial factors (`init_key`), the random mask
  and the random error map's seed, and `method.policy(seed)` the draws of
  LISA and the budget. Budgeted methods (`name@b`) need the task's `costs`.
  """
  base, budget = parse_name(name)
  if budget is not None and costs is None:
    raise ValueError(f"{name} needs the task's step costs (costs=...).")
  setup = Setup(name, budget, model, params, example, hyper, costs)
  return REGISTRY[base].build(setup)
