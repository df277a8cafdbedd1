"""When a branch budget cannot run (`experiments.budgets.unavailable`)."""

import types

from experiments import budgets


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
