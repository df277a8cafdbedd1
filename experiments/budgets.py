"""What the budgeted methods of every study share: the step costs they are
sized by, when a budget cannot run, the `Budget` rule of each method, and
the peers' probes (DropBP's sensitivity, GreenTrainer's importance).

A study supplies its own gradients and loss; everything here works on any
model the tracker handles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import rgft_jax

# Budgeted methods driven by a `rgft_jax.Budget` over detachable branches,
# and the rule each uses (GreenTrainer's budget is over tensors instead).
BRANCH_RULES = {
  "rgft_budget": "top",
  "rgft_budget_sample": "sample",
  "uniform_budget": "uniform",
  "shuffled_budget": "shuffled",
  "static_budget": "static",
  "surgical_first": "surgical_first",
  "surgical_last": "surgical_last",
  "dropbp": "dropbp",
}


# The budgeted methods both studies register (`name@b`), with their --help.
BUDGETED = {
  "rgft_budget": "budgeted RGFT: the error map picks the branches that get a "
  "backward pass",
  "rgft_budget_sample": "budgeted RGFT, branches drawn by error",
  "uniform_budget": "the same budget spent uniformly at random",
  "shuffled_budget": "control: budgeted RGFT on the error map permuted once per run",
  "static_budget": "control: the error map's choice after one window "
  "(--budget_every), held",
  "surgical_first": "control: the first layers' branches that fit the budget "
  "(surgical FT)",
  "surgical_last": "control: the last layers' branches that fit the budget "
  "(surgical FT)",
  "dropbp": "DropBP: branches dropped at per-branch rates from a sensitivity, "
  "drawn every step (Adam, no multipliers)",
  "greentrainer": "GreenTrainer: the tensors a knapsack on trial-step importance picks",
}
# Every budgeted method's `Budget` rule, GreenTrainer's (over tensors) included.
RULES = {**BRANCH_RULES, "greentrainer": "greentrainer"}
assert set(RULES) == set(BUDGETED)


@dataclasses.dataclass(frozen=True)
class Costs:
  """Per-step FLOPs a budgeted method is sized by (measured once per task).

  `detach` is what detaching each branch of the RGFT step saves; `full` the
  FLOPs of a full fine-tuning step, the unit of every budget; `lisa` the
  FLOPs of a LISA step; `freeze` the FLOPs of a step as a function of the
  parameter tensors it trains (GreenTrainer's), when a method needs them.
  """

  detach: rgft_jax.DetachCosts
  full: float
  lisa: float
  freeze: rgft_jax.FreezeCosts | None = None


def unavailable(
  rule: str, budget: float, costs: Costs, steps: int | None, every: int
) -> str | None:
  """Why a budget with `rule` (a branch rule, or "greentrainer") cannot run, or None.

  No budget can spend less than its cheapest step: with every branch detached
  (the forward pass, the measurement and the gradients outside the
  branches), or for GreenTrainer a step training no tensor (the forward pass;
  known once its freeze costs are measured, None before). `"static"` decides
  once after its first window of `every` steps, which a run of `steps` (when
  known) must outlast.
  """
  if rule == "static" and steps is not None and 1 + every >= steps:
    return (
      f"'static' decides after its window of --budget_every={every} steps, "
      f"which a run of --steps={steps} never ends"
    )
  if rule == "greentrainer":
    if costs.freeze is None:
      return None
    floor, cheapest = costs.freeze.floor / costs.full, "training no tensor"
  else:
    floor, cheapest = costs.detach.floor / costs.full, "with every branch detached"
  if budget < floor:
    return (
      f"budget {budget} is below {floor:.3f} of a full step, the cost of a step "
      + cheapest
    )
  return None


def dropbp_probe(
  grads: Callable[[Any, Any, jax.Array], Any], names: tuple[str, ...]
) -> Callable[[Any, Any, Any], tuple[Any, float]]:
  """DropBP's sensitivity as a `BudgetPolicy` probe.

  `grads(tree, batch, flags)` gives the gradients with the branches flagged
  in `flags` (one boolean per name) detached. The probe measures on the
  first example of the step's batch and returns `(sensitivity, FLOPs)`; the
  FLOPs are an upper bound: XLA counts every gate's backward pass as run.
  """

  def flags_of(detached):
    return jnp.asarray([n in detached for n in names])

  def sensitivity(tree, opt_state, batch):
    del opt_state
    one = jax.tree.map(lambda a: a[:1], batch)
    values = rgft_jax.dropbp_sensitivity(lambda d: grads(tree, one, flags_of(d)), names)
    flops = rgft_jax.flops_of(grads, tree, one, flags_of(frozenset()))
    return values, flops * (len(names) + 1)

  return sensitivity


def greentrainer_probe(
  loss: Callable[[Any, Any], jax.Array],
  optimizer: Any,
  names: tuple[str, ...],
) -> Callable[[Any, Any, Any], tuple[Any, float]]:
  """GreenTrainer's tensor importance as a `BudgetPolicy` scorer.

  `loss(tree, batch)` is the scalar loss; `optimizer` the run's (its trial
  step is taken and undone, `rgft_jax.greentrainer_importance`). Returns
  `(importance, FLOPs)`: two gradients, before and after the trial.
  """
  grad = jax.jit(jax.grad(loss))
  probe: dict[str, float] = {}

  def importance(tree, opt_state, batch):
    values = rgft_jax.greentrainer_importance(
      loss, optimizer, tree, opt_state, batch, names=names
    )
    if "flops" not in probe:
      probe["flops"] = 2 * rgft_jax.flops_of(grad, tree, batch)
    return values, probe["flops"]

  return importance
