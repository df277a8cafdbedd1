"""The fine-tuning methods of the language-model study, one registry entry each.

Full fine-tuning and the RGFT methods train the pretrained decoder in its
scanned layout (`nnx.scan` over stacked layers, as LLM code stacks them);
budgeted RGFT detaches branches at run time there (`rgft_jax.detachable_step` with
a boolean array), so a layer's detached branch skips its backward pass inside
the scan and one compiled step serves every detached set. LISA and LoRA,
which close over held parameters per layer, train the looped layout (one
module per layer). Parameters are pure dicts (`nnx.to_pure_dict`); trained
parameters are evaluated in the looped layout (`Method.to_params`). A
`Method` (`experiments.registry.Method`) says how to initialise what it trains, how
to build the train step of a variant, how its trained tree becomes the
decoder's parameters, and which policy picks each step's variant. The
learning rate lives in the optimizer state (`optax.inject_hyperparams`), so
one compiled step serves every learning rate of the grid and every seed.

A variant (`frozenset[str]`) names what a step leaves out: the layers LISA
holds (`layers/2`) or the components budgeted RGFT detaches (`layers/2/mlp`).
Parameters a step does not train are closed over instead of differentiated,
so XLA drops their gradient work and the counted FLOPs are each method's real
cost.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

import rgft_jax
from experiments import budgets
from experiments import error_maps
from experiments import frozen
from experiments import lora as lora_lib
from experiments import registry
from experiments.budgets import BRANCH_RULES
from experiments.budgets import Costs
from experiments.lm import model as lm
from experiments.loop import RUNTIME
from experiments.policies import BudgetPolicy
from experiments.policies import LisaPolicy
from experiments.registry import Method
from experiments.registry import Step
from experiments.trees import flat
from rgft_jax import hold_masked

# Kernels LoRA adapts: the attention projections and the MLP's three layers.
_LORA_TARGET = re.compile(
  r"layers/\d+/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel"
)
_O_PROJ = re.compile(r".*/o_proj/kernel")  # [N, H, D]: heads merged into inputs.


class Unavailable(ValueError):
  """A method that cannot run on this model or budget; the message says why."""


class Decoder:
  """The decoder of `cfg` as a pure function of its parameters.

  `decoder(params)` is an `lm.Transformer` holding `params` (a pure dict, as
  `nnx.to_pure_dict` gives); it works under `jax.jit`.

  Example:

  >>> import numpy as np
  >>> cfg = lm.Config(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  >>> decoder = Decoder(cfg)
  >>> params = decoder.init(0)
  >>> decoder(params)(np.zeros((1, 4), np.int32)).shape
  (1, 4, 256)
  """

  def __init__(self, cfg: lm.Config):
    self.cfg = cfg
    abstract = nnx.eval_shape(lambda: lm.Transformer(cfg, rngs=nnx.Rngs(0)))
    self.graphdef, self._state = nnx.split(abstract)
    self.window_nats = jax.jit(self._window_nats)

  def init(self, seed: int) -> dict[str, Any]:
    """Freshly initialised parameters."""
    return params_of(lm.Transformer(self.cfg, rngs=nnx.Rngs(seed)))

  def __call__(self, params: dict[str, Any]) -> lm.Transformer:
    state = jax.tree.map(lambda x: x, self._state)  # A fresh copy to fill in.
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def _window_nats(self, params, tokens):
    return lm.loss(self(params), tokens)[1]["per_example"]


def params_of(model: nnx.Module) -> dict[str, Any]:
  """The model's parameters as a pure dict."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """What every method is built from.

  `cfg` is the study's `Config` (the hyperparameters the methods read);
  `costs` the step FLOPs that size budgets (None when no method needs them).
  """

  decoder: Decoder  # Looped layout.
  params: dict[str, Any]  # Pretrained.
  example: np.ndarray  # A training batch, int32 [B, T + 1].
  cfg: Any
  costs: Costs | None = None
  scanned: Decoder | None = None  # The same decoder, layers scanned.

  def layout(self, scan: bool) -> tuple[Decoder, dict[str, Any]]:
    """(decoder, pretrained params) in the scanned layout, where there is
    one and `scan`, else in the looped one."""
    if scan and self.scanned is not None:
      return self.scanned, lm.stack_layers(self.params)
    return self.decoder, self.params

  def to_looped(self, scan: bool) -> Callable[[Any], dict[str, Any]]:
    """Trained params of `layout(scan)` -> the looped layout's."""
    if scan and self.scanned is not None:
      return lm.unstack_layers
    return lambda tree: tree


def _under(path: str, prefixes) -> bool:
  """Whether `path` is one of `prefixes` or lies under one."""
  return any(path == p or path.startswith(p + "/") for p in prefixes)


def _adam(learning_rate: float, count: str) -> optax.GradientTransformation:
  return frozen.injected(lambda rate: frozen.adam(rate, count), learning_rate)


def _adam_step(decoder: Decoder, tx, held: frozenset[str]) -> Step:
  """Adam on every parameter not under a prefix in `held`; those are closed
  over (no gradient work), get no update and keep their optimizer state."""

  def step(params, opt_state, batch):
    (nats, _), grads = frozen.value_and_grad(
      lambda p: lm.loss(decoder(p), batch),
      lambda path: not _under(path, held),
      has_aux=True,
    )(params)
    updates, new_state = tx.update(grads, opt_state, params)
    masks = jax.tree_util.tree_map_with_path(
      lambda p, _: _under(frozen.path_of(p), held), params
    )
    if any(jax.tree.leaves(masks)):
      updates, new_state = hold_masked(tx, masks, updates, new_state, opt_state)
    return optax.apply_updates(params, updates), new_state, {"loss": nats}

  return step


def _full(setup: Setup, name: str, budget: float | None) -> Method:
  steps = None if budget is None else max(1, round(budget * setup.cfg.steps))
  decoder, params = setup.layout(scan=True)
  count = setup.cfg.adam_count
  return Method(
    name,
    lambda lr, seed: (params, _adam(lr, count).init(params)),
    lambda variant: _adam_step(decoder, _adam(1.0, count), variant),
    to_params=setup.to_looped(scan=True),
    family="adam:scan",
    steps=steps,
  )


def _lisa(setup: Setup, name: str, budget: float | None) -> Method:
  """LISA; `lisa@b` runs as many steps as give b of full fine-tuning's FLOPs,
  each charged a LISA step's (`Costs.lisa`: the lowest layer trained, the
  dearest)."""
  cfg, layers = setup.cfg, setup.decoder.cfg.n_layers
  steps = None
  if budget is not None:
    if setup.costs is None:
      raise ValueError(f"{name} needs the step costs (Setup.costs).")
    steps = max(1, round(budget * cfg.steps * setup.costs.full / setup.costs.lisa))
  # Holding a layer closes over everything under its prefix (`_adam_step`).
  held = {f"layers/{i}": frozenset({f"layers/{i}"}) for i in range(layers)}
  count = cfg.adam_count
  return Method(
    name,
    lambda lr, seed: (setup.params, _adam(lr, count).init(setup.params)),
    lambda variant: _adam_step(setup.decoder, _adam(1.0, count), variant),
    lambda seed: LisaPolicy(held, cfg.lisa_layers, cfg.lisa_period, seed),
    family="adam",
    steps=steps,
  )


def _lora(setup: Setup, name: str, budget: float | None) -> Method:
  del budget
  cfg, decoder = setup.cfg, setup.decoder

  def init(lr, seed):
    key = jax.random.key(seed)
    factors = lora_lib.init(setup.params, cfg.lora_rank, key, _LORA_TARGET, _O_PROJ)
    return {"base": setup.params, "lora": factors}, _adam(lr, cfg.adam_count).init(
      factors
    )

  def make_step(variant):
    del variant
    tx = _adam(1.0, cfg.adam_count)

    def step(tree, opt_state, batch):
      def loss(factors):
        return lm.loss(decoder(lora_lib.merge({**tree, "lora": factors})), batch)

      (nats, _), g = jax.value_and_grad(loss, has_aux=True)(tree["lora"])
      updates, opt_state = tx.update(g, opt_state, tree["lora"])
      factors = optax.apply_updates(tree["lora"], updates)
      return {**tree, "lora": factors}, opt_state, {"loss": nats}

    return step

  factors = lora_lib.init(  # The layout, the same for every seed.
    setup.params, cfg.lora_rank, jax.random.key(0), _LORA_TARGET, _O_PROJ
  )
  trainable = frozenset("lora/" + p for p in flat(factors))
  return Method(
    name,
    init,
    make_step,
    to_params=lora_lib.merge,
    trainable=trainable,
    family="lora",
  )


def is_branch(path: tuple[str, ...], module: Any) -> bool:
  """A decoder layer's attention or MLP branch (`ErrorTracker`'s `select`)."""
  del module
  return path[-1] in ("attn", "mlp")


def _components(setup: Setup, select) -> tuple[rgft_jax.ErrorTracker, Any]:
  decoder, params = setup.layout(scan=True)
  model = decoder(params)
  tracker = rgft_jax.ErrorTracker(model, select=select)
  comps = tracker.components(nnx.state(model, nnx.Param), setup.example[:, :-1])
  return tracker, comps


def _rgft_tx(
  setup: Setup, comps, min_scale: float | None = None
) -> Callable[[float], Any]:
  """RGFT's transformation at a learning rate; `min_scale=1` is plain Adam
  (every multiplier 1) that still measures the error map."""
  cfg = setup.cfg

  def tx_of(lr):
    return cfg.rgft_tx(lr, comps, cfg.steps, min_scale)

  return tx_of


def tracked_step(
  decoder: Decoder, tracker, tx, comps, detached, recompute: bool = False
) -> Step:
  """`rgft_jax.detachable_step` (NNX) as a pure step, with `detached` detached.

  With `detached=RUNTIME` the step takes the detached set as a fourth
  argument, a boolean array over `comps.names` (runtime gating; with
  `recompute`, gated branches keep no residuals).
  """
  sparse = rgft_jax.detachable_step(
    tracker, None, lm.loss, comps, has_aux=True, recompute=recompute
  )

  def step(params, opt_state, batch, flags=None):
    model = decoder(params)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # Its init is unused.
    nnx.update(optimizer.opt_state, nnx.state(opt_state))
    gate = flags if detached == RUNTIME else detached
    nats, _ = sparse(model, optimizer, batch, detached=gate)
    return params_of(model), nnx.as_pure(optimizer.opt_state), {"loss": nats}

  return step


def _tracked(
  setup: Setup,
  name: str,
  tracker,
  comps,
  policy,
  family: str,
  runtime: rgft_jax.DetachCosts | None = None,
  min_scale: float | None = None,
) -> Method:
  """RGFT over `comps`, measured by `tracker`, detaching what `policy` says."""
  tx_of = _rgft_tx(setup, comps, min_scale)
  decoder, params = setup.layout(scan=True)
  recompute = runtime is not None and setup.cfg.gate_recompute
  return Method(
    name,
    lambda lr, seed: (params, tx_of(lr).init(params)),
    lambda variant: tracked_step(
      decoder, tracker, tx_of(1.0), comps, variant, recompute
    ),
    policy,
    to_params=setup.to_looped(scan=True),
    family=family,
    components=comps,
    runtime=runtime,
  )


def _rgft(select):
  def build(setup: Setup, name: str, budget: float | None) -> Method:
    del budget
    tracker, comps = _components(setup, select)
    family = f"rgft:{select if isinstance(select, str) else 'branches'}"
    return _tracked(setup, name, tracker, comps, registry.no_policy, family)

  return build


def _rgft_random(setup: Setup, name: str, budget: float | None) -> Method:
  """Soft RGFT over the branches fed a random error map (`U[0, 1)` per
  branch, drawn each step from the run's seed, `error_maps.RandomErrorMap`)
  through the same EMA and threshold: does attribution matter? Gradients are
  plain `jax.grad`; the map's seed lives in the optimizer state."""
  del budget
  _, comps = _components(setup, is_branch)
  tx_of = _rgft_tx(setup, comps)
  decoder, params = setup.layout(scan=True)
  draw = error_maps.RandomErrorMap(comps.names).draw

  def tx(learning_rate: float, seed: int):
    return optax.chain(error_maps.random_map_seed(seed), tx_of(learning_rate))

  def make_step(variant: frozenset[str]) -> Step:
    del variant
    update = tx(1.0, 0).update  # Rate and seed are read from the state.

    def step(params, opt_state, batch):
      (nats, _), grads = jax.value_and_grad(
        lambda p: lm.loss(decoder(p), batch), has_aux=True
      )(params)
      updates, opt_state = update(grads, opt_state, params, error_map=draw(opt_state))
      return optax.apply_updates(params, updates), opt_state, {"loss": nats}

    return step

  return Method(
    name,
    lambda lr, seed: (params, tx(lr, seed).init(params)),
    make_step,
    to_params=setup.to_looped(scan=True),
    family="rgft:random",
    components=comps,
  )


def _layer(name: str) -> int:
  """The decoder layer of a component (`layers/3/mlp` -> 3)."""
  return int(re.match(r"layers/(\d+)/", name).group(1))


def _dropbp_sensitivity(setup: Setup, tracker, comps):
  """DropBP's sensitivity probe (`budgets.dropbp_probe`) on the decoder's loss."""
  decoder, _ = setup.layout(scan=True)

  @jax.jit
  def grads(params, batch, flags):
    vg = tracker.value_and_grad(lm.loss, has_aux=True, detach=flags)
    return vg(decoder(params), batch)[1]

  return budgets.dropbp_probe(grads, comps.names)


def _budgeted(rule: str):
  """A `Budget` with `rule` over the branches of the tracked step. DropBP
  runs with every multiplier 1 (Adam, as published) and draws every step."""

  def build(setup: Setup, name: str, budget: float | None) -> Method:
    cfg, costs = setup.cfg, setup.costs
    if costs is None:
      raise ValueError(f"{name} needs the step costs (Setup.costs).")
    why = budgets.unavailable(rule, budget, costs, cfg.steps, cfg.budget_every)
    if why:
      raise Unavailable(why)
    tracker, comps = _components(setup, is_branch)
    if costs.detach.names != comps.names:
      raise ValueError(
        f"The step costs are for {costs.detach.names}, the components are "
        f"{comps.names}."
      )
    dropbp = rule == "dropbp"
    sensitivity = _dropbp_sensitivity(setup, tracker, comps) if dropbp else None
    depth = [_layer(n) for n in comps.names]

    def policy(seed):
      return BudgetPolicy(
        rgft_jax.Budget(
          costs.detach,
          budget,
          total_steps=cfg.steps,
          every=1 if dropbp else cfg.budget_every,
          rule=rule,
          hysteresis=cfg.budget_hysteresis,
          seed=seed,
          unit=costs.full,  # A fraction of a plain full fine-tuning step.
          depth=depth,
        ),
        sensitivity=sensitivity,
      )

    gated = costs.detach if setup.scanned is not None else None
    family = "rgft:branches:runtime" if gated is not None else "rgft:branches"
    if dropbp:
      family += ":adam"
    return _tracked(
      setup, name, tracker, comps, policy, family, gated, 1.0 if dropbp else None
    )

  return build


def _freeze_step(decoder: Decoder, count: str):
  """`_adam_step` as `rgft_jax.freeze_costs` calls it."""
  adam = _adam(1.0, count)

  def step(params, opt_state, batch, frozen):
    return _adam_step(decoder, adam, frozen)(params, opt_state, batch)

  return step


def _greentrainer(setup: Setup, name: str, budget: float | None) -> Method:
  """GreenTrainer: Adam on the parameter tensors its dynamic program picks
  within the budget, from their importance in an undone trial step,
  re-picked every `--greentrainer_period` of the run (0.4: at steps 1,
  1 + 0.4 T and 1 + 0.8 T, as the original re-selects every 2 of 5 epochs).
  Looped layout: a tensor stacked over the layers of a scan could only be
  frozen in every layer at once."""
  cfg, costs = setup.cfg, setup.costs
  if costs is None or costs.freeze is None:
    raise ValueError(f"{name} needs the freeze costs (measure_costs(freeze=True)).")
  why = budgets.unavailable("greentrainer", budget, costs, cfg.steps, cfg.budget_every)
  if why:
    raise Unavailable(why)
  freeze = costs.freeze
  decoder, params = setup.decoder, setup.params
  adam = _adam(1.0, cfg.adam_count)

  def loss(p, batch):
    return lm.loss(decoder(p), batch)[0]

  importance = budgets.greentrainer_probe(loss, adam, freeze.names)
  every = max(1, math.ceil(cfg.greentrainer_period * cfg.steps))

  def policy(seed):
    return BudgetPolicy(
      rgft_jax.Budget(
        freeze,
        budget,
        cfg.steps,
        every=every,
        rule="greentrainer",
        seed=seed,
        unit=costs.full,
      ),
      scores=importance,
    )

  return Method(
    name,
    lambda lr, seed: (params, _adam(lr, cfg.adam_count).init(params)),
    lambda variant: _adam_step(decoder, adam, variant),
    policy,
    family="adam",
  )


_BUILDERS = (  # name, builder, budget ("none", "optional", "required").
  ("full", _full, "optional"),
  ("rgft_blocks", _rgft(is_branch), "none"),
  ("rgft_heads", _rgft("heads"), "none"),
  ("rgft_random", _rgft_random, "none"),
  *(
    (
      name,
      _greentrainer if name == "greentrainer" else _budgeted(BRANCH_RULES[name]),
      "required",
    )
    for name in budgets.BUDGETED
  ),
  ("lora", _lora, "none"),
  ("lisa", _lisa, "optional"),
)
for _name, _build, _budget in _BUILDERS:
  registry.METHODS.register(_name, task="lm", budget=_budget)(_build)
METHODS = registry.METHODS.task("lm")  # The study's methods, in the order of --help.


def parse(name: str) -> tuple[str, float | None]:
  """`"rgft_budget@0.5"` -> `("rgft_budget", 0.5)`; `"lora"` -> `("lora", None)`.

  >>> parse("full@0.5"), parse("lisa")
  (('full', 0.5), ('lisa', None))
  """
  return METHODS.parse(name)


def needs_costs(name: str) -> bool:
  """Whether `name` is sized by the step costs: every `name@b` but `full@b`
  (b x the steps)."""
  base, budget = parse(name)
  return budget is not None and base != "full"


def needs_freeze_costs(name: str) -> bool:
  return parse(name)[0] == "greentrainer"


def build(name: str, setup: Setup) -> Method:
  """The method `name` on `setup`; raises `Unavailable` when it cannot run."""
  base, budget = parse(name)
  return METHODS[base].build(setup, name, budget)


def measure_costs(setup: Setup, freeze: bool = False) -> Costs:
  """Step FLOPs that size budgets, from XLA's analysis of the lowered steps.

  `full` is a plain full fine-tuning step (the unit of every budget), `lisa`
  a LISA step training one layer, `detach` what detaching each branch of the
  tracked step saves (`rgft_jax.detach_costs`; in the scanned layout a
  layer's branch is charged its share of the branch detached in every
  layer, what a runtime-gated step skips). Each in the layout its method
  trains. With `freeze`, also `freeze`: a looped Adam step's FLOPs by the
  parameter tensors it trains (`rgft_jax.freeze_costs`, GreenTrainer's).
  """
  batch = setup.example
  adam = _adam(1.0, setup.cfg.adam_count)

  def flops(step, params):
    return rgft_jax.flops_of(step, params, adam.init(params), batch)

  decoder, params = setup.layout(scan=True)
  held = frozenset(f"layers/{i}" for i in range(1, decoder.cfg.n_layers))
  tracker, comps = _components(setup, is_branch)
  tx = _rgft_tx(setup, comps)(1.0)

  def step(params, opt_state, batch, detached):
    return tracked_step(decoder, tracker, tx, comps, detached)(params, opt_state, batch)

  detach = rgft_jax.detach_costs(
    step,
    comps.names,
    params,
    tx.init(params),
    batch,
    groups=comps.layer_groups,
  )
  freeze_costs = None
  if freeze:
    loss = lambda p, b: lm.loss(setup.decoder(p), b)[0]  # noqa: E731
    freeze_costs = rgft_jax.freeze_costs(
      _freeze_step(setup.decoder, setup.cfg.adam_count),
      rgft_jax.tensor_order(loss, setup.params, batch),
      setup.params,
      adam.init(setup.params),
      batch,
    )
  return Costs(
    detach,
    flops(_adam_step(decoder, adam, frozenset()), params),
    flops(_adam_step(setup.decoder, adam, held), setup.params),
    freeze_costs,
  )
