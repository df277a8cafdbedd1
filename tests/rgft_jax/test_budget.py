"""The budget: allocation against brute force, decisions by hand, FLOP accounting."""

import itertools
import json

import jax
import numpy as np
import pytest
from _sparse_net import _loss
from _sparse_net import _setup

import rgft_jax
from rgft_jax._budget import best_within
from rgft_jax._budget import fill_in_order
from rgft_jax._budget import weighted_order


def _brute_force(error, cost, capacity):
  n = len(error)
  free = {i for i in range(n) if cost[i] <= 0}
  best, best_set = -1.0, None
  for r in range(n + 1):
    for subset in itertools.combinations(range(n), r):
      s = set(subset) | free
      if sum(max(cost[i], 0) for i in s) > capacity:
        continue
      value = sum(max(error[i], 0) for i in s)
      if value > best + 1e-12:
        best, best_set = value, s
  return best, best_set


@pytest.mark.parametrize("seed", range(40))
def test_top_allocation_equals_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 10))
  error = rng.random(n) * (rng.random(n) > 0.15)  # Some components with no error.
  cost = rng.random(n) + 0.05
  cost[rng.random(n) < 0.1] = 0.0  # Some detach for free (heads, say).
  capacity = float(rng.random() * cost.sum())
  got = best_within(error, cost, capacity)
  value, expected = _brute_force(error, cost, capacity)
  assert sum(cost[i] for i in got) <= capacity + 1e-12
  np.testing.assert_allclose(sum(error[i] for i in got), value, rtol=1e-12)
  assert {i for i in got if error[i] > 0 or cost[i] <= 0} == {
    i for i in expected if error[i] > 0 or cost[i] <= 0
  }


def test_fill_and_weighted_order():
  assert fill_in_order([2, 0, 1], [1.0, 2.0, 3.0], 4.5) == {2, 0}
  rng = np.random.default_rng(0)
  firsts = np.bincount(
    [weighted_order([1.0, 3.0, 0.0], rng)[0] for _ in range(4000)], minlength=3
  )
  np.testing.assert_allclose(firsts / 4000, [0.25, 0.75, 0.0], atol=0.03)


def _costs():
  return rgft_jax.DetachCosts(("a", "b", "c"), 10.0, np.array([3.0, 3.0, 3.0]))


def test_decisions_and_spending_by_hand():
  budget = rgft_jax.Budget(_costs(), 0.5, total_steps=10, every=5)
  ema = np.array([0.1, 0.9, 0.5])
  trace = []
  for t in range(10):
    if budget.due(t):
      budget.decide(t, ema)
    trace.append(sorted(budget.trained))
    budget.spend(t, budget.detached)
  # Step 0 detaches all (cost 1). At step 1 a step may cost (50 - 1) / 9 =
  # 5.44, so one branch (1 + 3 = 4): the largest error. Steps 1-5 spend 20;
  # at step 6 a step may cost (50 - 21) / 4 = 7.25: two branches (7).
  assert trace == [[]] + [["b"]] * 5 + [["b", "c"]] * 4
  assert budget.spent == 1 + 5 * 4 + 4 * 7
  assert budget.spent <= 0.5 * 10 * 10.0
  assert budget.decisions == [(1, ["b"]), (6, ["b", "c"])]


def test_hysteresis_keeps_the_trained_set():
  ema = np.array([0.5, 0.52, 0.0])
  for h, expected in ((0.0, {"b"}), (0.1, {"a"})):
    budget = rgft_jax.Budget(_costs(), 0.5, total_steps=10, every=1, hysteresis=h)
    budget.spend(0, budget.detached)
    budget.decide(1, np.array([1.0, 0.0, 0.0]))
    assert budget.trained == {"a"}
    budget.spend(1, budget.detached)
    budget.decide(2, ema)
    assert budget.trained == expected


@pytest.mark.parametrize(
  # The peers' own runs: tests/rgft_jax/test_peers.py.
  "rule",
  [r for r in rgft_jax._budget.RULES if r not in ("dropbp", "greentrainer")],
)
@pytest.mark.parametrize("ramp", [0, 6])
def test_every_rule_stays_within_the_budget(rule, ramp):
  if rule == "static" and ramp:
    pytest.skip("'static' takes no ramp (refused: tests/rgft_jax/test_rules.py)")
  costs = rgft_jax.DetachCosts(
    tuple("abcdef"), 20.0, np.array([2.0, 2.5, 3.0, 1.0, 4.0, 2.0])
  )
  rng = np.random.default_rng(1)
  budget = rgft_jax.Budget(
    costs, 0.6, total_steps=37, every=4, rule=rule, ramp_steps=ramp, seed=3
  )
  spends = []
  for t in range(37):
    if budget.due(t):
      budget.decide(t, rng.random(6))
    spends.append(costs.step(budget.detached))
    budget.spend(t, budget.detached)
  assert sum(spends) <= 0.6 * 37 * 20.0 + 1e-9
  assert sum(spends) >= 0.6 * 37 * 20.0 - 20.0  # Spent, not hoarded.
  if ramp:
    assert spends[1] >= 0.8 * costs.full  # The ramp starts near full steps.


def test_budget_below_the_floor_is_refused():
  with pytest.raises(ValueError, match=r"budget 0.05 is below 0.100"):
    rgft_jax.Budget(_costs(), 0.05, total_steps=10)
  with pytest.raises(ValueError, match="ramp_steps"):
    rgft_jax.Budget(_costs(), 0.2, total_steps=10, ramp_steps=10)
  with pytest.raises(ValueError, match="rule"):
    rgft_jax.Budget(_costs(), 0.5, total_steps=10, rule="best")
  with pytest.raises(TypeError, match="every"):
    rgft_jax.Budget(_costs(), 0.5, total_steps=10, every=2.5)
  budget = rgft_jax.Budget(_costs(), 0.5, total_steps=10)
  with pytest.raises(ValueError, match="out of order"):
    budget.decide(3, np.ones(3))


def test_state_dict_round_trip():
  budget = rgft_jax.Budget(_costs(), 0.5, total_steps=10, every=2)
  for t in range(4):
    if budget.due(t):
      budget.decide(t, np.array([0.3, 0.2, 0.1]))
    budget.spend(t, budget.detached)
  other = rgft_jax.Budget(_costs(), 0.5, total_steps=10, every=2)
  other.load_state_dict(budget.state_dict())
  assert (other.detached, other.spent, other.steps) == (
    budget.detached,
    budget.spent,
    budget.steps,
  )
  with pytest.raises(ValueError, match="lacks"):
    other.load_state_dict({**budget.state_dict(), "detached": ["zz"]})


@pytest.mark.slow
def test_costs_add_up_and_accounting_equals_variant_flops_times_steps():
  model, params, x, y, tracker, comps, tx = _setup()
  step = rgft_jax.detachable_step(tracker, tx, _loss(model), comps)
  state = tx.init(params)
  costs = rgft_jax.detach_costs(step, comps.names, params, state, x, y, compiled=True)
  assert costs.additivity_error < 0.01
  assert (costs.saving > 0).all()
  budget = rgft_jax.Budget(costs, 0.7, total_steps=12, every=3)
  sparse = rgft_jax.SparseTrainStep(step, budget)
  given = jax.tree.leaves((params, state))
  counts = {}
  for t in range(12):
    _, params, state = sparse(t, params, state, x, y)
    counts[budget.detached] = counts.get(budget.detached, 0) + 1
  measured = sum(
    sparse.variants.cost(d, params, state, x, y)[0] * n for d, n in counts.items()
  )
  np.testing.assert_allclose(budget.spent, measured, rtol=0.01)
  assert budget.spent <= 0.7 * 12 * costs.full * 1.0001
  assert budget.fraction > 0.6  # The budget is used.
  assert sparse.compilations == len(counts)
  # Lowered costs agree with compiled ones.
  lowered = rgft_jax.detach_costs(step, comps.names, params, state, x, y)
  np.testing.assert_allclose(lowered.saving, costs.saving, rtol=0.05)
  # Inputs were not donated: the first step's arguments are still alive.
  assert given and not any(leaf.is_deleted() for leaf in given)


def test_no_error_signal_spends_the_budget_evenly():
  budget = rgft_jax.Budget(_costs(), 0.5, total_steps=10, every=5)
  budget.spend(0, budget.detached)
  budget.decide(1, np.zeros(3))  # A zero-initialised head measures nothing.
  assert len(budget.trained) == 1  # As many as fit, not none.


def test_refresh_steps_are_full_and_paid_from_the_budget():
  costs = _costs()
  budget = rgft_jax.Budget(costs, 0.7, total_steps=12, every=5, refresh=True)
  ran = []
  for t in range(12):
    if budget.due(t):
      budget.decide(t, np.array([0.1, 0.9, 0.5]))
    ran.append(budget.variant(t))
    budget.spend(t, budget.variant(t))
  # Step 0 and the steps before the decisions at 1, 6 and 11 run undetached.
  assert [t for t, v in enumerate(ran) if not v] == [0, 5, 10]
  spent = sum(costs.step(v) for v in ran)
  assert spent == budget.spent <= 0.7 * 12 * costs.full
  with pytest.raises(ValueError, match="refresh steps"):
    rgft_jax.Budget(costs, 0.3, total_steps=12, every=2, refresh=True)


def test_exact_steps_fold_in_only_exact_measurements():
  model, params, x, y, tracker, comps, tx = _setup()
  step = jax.jit(
    rgft_jax.detachable_step(tracker, tx, _loss(model), comps, exact=True),
    static_argnames="detached",
  )
  state = tx.init(params)
  _, params, state = step(params, state, x, y)  # Everything measured.
  before = np.asarray(rgft_jax.residual_error_state(state).ema)
  _, _, new = step(params, state, x, y, detached=frozenset({"block1"}))
  after = np.asarray(rgft_jax.residual_error_state(new).ema)
  # block0 lies below the detached block1: not measured, its EMA is kept;
  # block1 and block2 are measured exactly and move.
  assert after[0] == before[0]
  assert after[1] != before[1] and after[2] != before[2]


def test_allocation_stays_fast_and_greedy_at_least_on_many_components():
  rng = np.random.default_rng(0)
  error, cost = rng.random(200), rng.random(200) + 0.1
  capacity = 0.3 * cost.sum()
  got = best_within(error, cost, capacity, max_nodes=2_000)
  order = np.argsort(-error / cost, kind="stable")
  greedy = fill_in_order(order, cost, capacity)
  assert sum(cost[i] for i in got) <= capacity
  assert sum(error[i] for i in got) >= sum(error[i] for i in greedy) - 1e-12


# Nothing silent: costs, budgets and their states are checked.


@pytest.mark.parametrize(
  "names, full, saving, error, match",
  [
    (("a", "b", "c"), 10.0, [3.0, np.nan, 3.0], ValueError, r"finite.*'b': nan"),
    (("a", "b", "c"), 10.0, [3.0, 15.0, 3.0], ValueError, r"'b': 15.0.*exceeds full"),
    (("a", "b", "c"), 10.0, [6.0, 6.0, 3.0], ValueError, r"add up to 15.0.*full"),
    (("a", "b", "a"), 10.0, [3.0, 3.0, 3.0], ValueError, r"distinct.*\['a'\]"),
    (("a", "b", "c"), 10.0, [3.0, 3.0], ValueError, r"one entry per name \(3"),
    (("a", "b", "c"), np.inf, [3.0, 3.0, 3.0], ValueError, "full"),
    (("a", "b", "c"), 0.0, [0.0, 0.0, 0.0], ValueError, "full"),
    (("a", "b", "c"), np.nan, [3.0, 3.0, 3.0], ValueError, "full"),
    ("abc", 10.0, [3.0, 3.0, 3.0], TypeError, "names"),
    (("a", "b", "c"), 10.0, ["x", "y", "z"], TypeError, "saving"),
  ],
)
def test_detach_costs_are_checked(names, full, saving, error, match):
  with pytest.raises(error, match=match):
    rgft_jax.DetachCosts(
      names, full, np.array(saving) if error is ValueError else saving
    )


def test_detach_costs_keep_negative_savings_and_predict_by_hand():
  costs = rgft_jax.DetachCosts(("a", "b"), 10, [4, -0.5])  # b costs a little.
  assert costs.saving.dtype == np.float64 and costs.full == 10.0
  assert costs.step({"a", "b"}) == costs.floor == 6.5
  assert costs.step(["a", "a"]) == 6.0  # A set: "a" saves once.


def test_unknown_component_names_are_named_with_the_known_ones():
  costs = _costs()
  with pytest.raises(ValueError, match=r"\['zz'\].*\['a', 'b', 'c'\]"):
    costs.step({"a", "zz"})
  with pytest.raises(TypeError, match=r"string 'a'.*\{'a'\}"):
    costs.step("a")
  budget = rgft_jax.Budget(costs, 0.5, total_steps=10)
  with pytest.raises(ValueError, match=r"\['blokc1'\].*\['a', 'b', 'c'\]"):
    budget.spend(0, {"blokc1"})
  assert budget.steps == 0 and budget.spent == 0.0  # Nothing was accounted.


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(unit=np.inf), ValueError, "unit"),
    (dict(unit=0.0), ValueError, "unit"),
    (dict(unit=np.nan), ValueError, "unit"),
    (dict(unit="10"), TypeError, "unit"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=None), TypeError, "seed"),
    (dict(hysteresis=np.inf), ValueError, "hysteresis"),
  ],
)
def test_budget_arguments_are_checked(kwargs, error, match):
  with pytest.raises(error, match=match):
    rgft_jax.Budget(_costs(), 0.5, total_steps=10, rule="sample", **kwargs)


def test_spending_past_the_run_is_refused():
  budget = rgft_jax.Budget(_costs(), 0.5, total_steps=10)
  for t in range(10):
    budget.spend(t, budget.detached)
  with pytest.raises(ValueError, match=r"spend\(10\).*total_steps=10"):
    budget.spend(10, budget.detached)
  assert budget.steps == 10 and budget.spent == 10 * 1.0  # Ten floors.


def test_a_state_of_another_budget_is_refused_naming_the_field():
  budget = rgft_jax.Budget(_costs(), 0.5, total_steps=10, every=2)
  budget.spend(0, budget.detached)
  state = budget.state_dict()
  for kwargs, field in (
    (dict(budget=0.7), "budget"),
    (dict(total_steps=20), "total_steps"),
    (dict(every=3), "every"),
    (dict(seed=1), "seed"),
    (dict(unit=20.0), "unit"),
  ):
    other = rgft_jax.Budget(
      _costs(), **{"budget": 0.5, "total_steps": 10, "every": 2, **kwargs}
    )
    with pytest.raises(ValueError, match=rf"another budget \({field}: "):
      other.load_state_dict(state)
    assert other.steps == 0  # Left as it was.
  costs = rgft_jax.DetachCosts(("a", "b", "c"), 10.0, np.array([3.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match=r"saving: \[3.0, 3.0, 3.0\] there"):
    rgft_jax.Budget(costs, 0.5, total_steps=10, every=2).load_state_dict(state)


def test_a_state_round_trips_through_json_and_bad_progress_is_refused():
  budget = rgft_jax.Budget(_costs(), 0.5, total_steps=10, every=2)
  for t in range(3):
    if budget.due(t):
      budget.decide(t, np.array([0.3, 0.2, 0.1]))
    budget.spend(t, budget.detached)
  state = json.loads(json.dumps(budget.state_dict()))  # How the harness saves it.
  other = rgft_jax.Budget(_costs(), 0.5, total_steps=10, every=2)
  other.load_state_dict(state)
  assert (other.detached, other.spent, other.steps, other.decisions) == (
    budget.detached,
    budget.spent,
    budget.steps,
    budget.decisions,
  )
  for change, match in (
    (dict(spent=-1.0), "spent"),
    (dict(spent=float("nan")), "spent"),
    (dict(steps=11), "steps"),
    (dict(steps=-1), "steps"),
  ):
    with pytest.raises(ValueError, match=match):
      other.load_state_dict({**state, **change})
  old = {k: v for k, v in state.items() if k != "budget_of"}
  with pytest.raises(ValueError, match=r"lacks \['budget_of'\]"):
    other.load_state_dict(old)
