"""What a run costs: XLA-counted FLOPs per step variant, peak memory, update ratio."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np

import rgft_jax
from experiments import loop
from experiments import methods as methods_lib
from experiments import steps as steps_lib
from experiments.budgets import Costs
from experiments.trees import count


def update_ratio(
  method: methods_lib.Method, tree: Any, opt_state: Any, frozen: frozenset[str], alpha
) -> float:
  """Fraction of the model's parameters a step moves, alpha-weighted for RGFT.

  Frozen parameters (LISA's, sparse RGFT's) and held entries (the masked
  baselines', in `opt_state`) count as not moved. Counted on the model's
  parameters (`to_params(tree)`): LoRA's update of an adapted kernel counts
  as its factors' size, the way LoRA is usually compared (adapters likewise
  count as their own size).
  """
  total = count(method.to_params(tree))
  if method.components is not None:
    sizes = method.components.sizes(tree)
    alpha = np.where([n in frozen for n in method.components.names], 0.0, alpha)
    return float((np.sum(alpha * sizes) + (total - sizes.sum())) / total)
  trained = methods_lib.trained_paths(method, tree) - frozen
  moved = count(tree, trained) - methods_lib.held_count(opt_state)
  return moved / total


def measure_costs(
  model: nn.Module, params: Any, example: jax.Array, hyper, batch, freeze: bool = False
) -> Costs:
  """Per-step FLOPs that size the budgeted methods, from compiled steps (a
  scanned model's from lowered ones, its scans unrolled; LISA cannot run
  on it, and its step costs NaN)."""

  def step_flops(name):
    method = methods_lib.make(name, model, params, example, hyper)
    tree, state = method.init(hyper.learning_rate, 0)
    variant = method.policy(0).variant(0, state)
    return loop.variants_of(method).cost(variant, tree, state, batch)[0]

  # The budgeted methods' step without its metrics (the study's results were
  # sized by this; the metrics change a step's count by about 1e-6).
  tracker, comps, tx = methods_lib.rgft_parts(model, params, example, hyper)
  sparse = rgft_jax.detachable_step(
    tracker,
    tx,
    functools.partial(steps_lib.loss_and_accuracy, model),
    comps,
    has_aux=True,
  )
  freeze_costs = None
  if freeze:  # GreenTrainer's: a full fine-tuning step by the tensors it trains.
    full = methods_lib.make("full", model, params, example, hyper)
    _, state = full.init(hyper.learning_rate, 0)
    loss = lambda p, b: steps_lib.loss_and_accuracy(model, p, b)[0]  # noqa: E731

    def frozen_step(params, opt_state, batch, frozen):
      return full.make_step(frozen)(params, opt_state, batch)

    freeze_costs = rgft_jax.freeze_costs(
      frozen_step, rgft_jax.tensor_order(loss, params, batch), params, state, batch
    )
  scanned = bool(comps.layer_groups)
  detach = rgft_jax.detach_costs(
    sparse, comps.names, params, tx.init(params), batch, compiled=not scanned
  )
  lisa = float("nan") if scanned else step_flops("lisa")
  return Costs(detach, step_flops("full"), lisa, freeze_costs)
