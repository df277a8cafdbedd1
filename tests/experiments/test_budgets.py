"""When a budget cannot run (`experiments.budgets.unavailable`)."""

import dataclasses
import types

import rgft_jax
from experiments import budgets
from experiments import methods as vit_methods


def _costs(floor, full):
  return budgets.Costs(types.SimpleNamespace(floor=floor), full, float("nan"))


def test_a_budget_below_the_fully_detached_step_is_unavailable():
  costs = _costs(floor=30.0, full=100.0)  # Everything detached: 0.3 of a step.
  why = budgets.unavailable("top", 0.25, costs, steps=100, every=10)
  assert why == (
    "budget 0.25 is below 0.300 of a full step, the cost of a step with every "
    "branch detached"
  )
  assert budgets.unavailable("top", 0.3, costs, steps=100, every=10) is None


def test_static_needs_a_run_longer_than_its_window():
  costs = _costs(floor=10.0, full=100.0)
  assert budgets.unavailable("static", 0.5, costs, steps=11, every=10) == (
    "'static' decides after its window of --budget_every=10 steps, which a run "
    "of --steps=11 never ends"
  )
  assert budgets.unavailable("static", 0.5, costs, steps=12, every=10) is None
  assert budgets.unavailable("static", 0.5, costs, steps=None, every=10) is None
  assert budgets.unavailable("top", 0.5, costs, steps=11, every=10) is None


def _freeze(forward: float) -> rgft_jax.FreezeCosts:
  # Three tensors; a step training every one costs forward + 40 + 20 + 10.
  return rgft_jax.FreezeCosts(("a", "b", "c"), forward, [40.0, 30.0, 20.0], [0, 20, 10])


def _refused(costs: budgets.Costs, budget: float) -> bool:
  """Whether GreenTrainer's own `Budget` refuses `budget` (the reference)."""
  try:
    rgft_jax.Budget(costs.freeze, budget, 100, every=40, rule="greentrainer", unit=100)
  except ValueError as e:
    assert "below" in str(e)
    return True
  return False


def test_greentrainer_below_its_forward_pass_is_unavailable_as_its_budget_says():
  """GreenTrainer's cheapest step trains no tensor: the forward pass. Below
  it the study reports the method as not run (naming why) instead of failing
  when the run's `Budget` is built, for exactly the budgets `Budget` refuses."""
  costs = dataclasses.replace(_costs(floor=10.0, full=100.0), freeze=_freeze(33.5))
  for budget in (0.2, 0.3, 0.33, 0.335, 0.34, 0.5):
    why = budgets.unavailable("greentrainer", budget, costs, steps=100, every=40)
    assert (why is not None) == _refused(costs, budget), budget
  assert budgets.unavailable("greentrainer", 0.3, costs, 100, 40) == (
    "budget 0.3 is below 0.335 of a full step, the cost of a step training no tensor"
  )
  # The branches' floor (0.1) is not GreenTrainer's; unknown until measured.
  assert budgets.unavailable("top", 0.3, costs, steps=100, every=40) is None
  unmeasured = _costs(floor=10.0, full=100.0)
  assert budgets.unavailable("greentrainer", 0.3, unmeasured, 100, 40) is None
  # The ViT study asks the same of every name it runs.
  assert vit_methods.infeasible("greentrainer@0.3", costs) == budgets.unavailable(
    "greentrainer", 0.3, costs, None, 0
  )
  assert vit_methods.infeasible("greentrainer@0.5", costs) is None
