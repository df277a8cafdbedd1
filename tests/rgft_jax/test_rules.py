"""The budget's control rules, each against a hand trace of its definition."""

import itertools

import numpy as np
import pytest

import rgft_jax


def _equal_costs(n, full=20.0, each=2.0):
  return rgft_jax.DetachCosts(tuple(f"c{i}" for i in range(n)), full, np.full(n, each))


def _run(budget, maps):
  """Decides and spends every step; `maps(t)` is the EMA read at step t."""
  trained = []
  for t in range(budget.total_steps):
    if budget.due(t):
      budget.decide(t, maps(t))
    trained.append(sorted(budget.trained))
    budget.spend(t, budget.detached)
  return trained


def test_shuffled_is_top_on_one_permutation_per_run():
  # With capacity for exactly one component, "top" on a one-hot map trains its
  # hot component; "shuffled" trains the component the run's permutation maps
  # onto it. Reading that for every hot position recovers the permutation.
  n, total, every = 6, 1 + 6 * 3, 3
  costs = _equal_costs(n, full=20.0, each=2.0)
  budget = 1 - (n - 1) * 2.0 / 20.0 - 1e-9  # One component trained per step...
  perms = []
  for seed in range(4):
    b = rgft_jax.Budget(costs, budget, total, every=every, rule="shuffled", seed=seed)
    hot = lambda t: np.eye(n)[(t - 1) // every]  # noqa: E731
    got = _run(b, hot)
    perm = {(t - 1) // every: got[t] for t in range(1, total)}
    assert all(len(v) == 1 for v in perm.values())
    perm = [int(perm[j][0][1:]) for j in range(n)]
    assert sorted(perm) == list(range(n))  # A bijection, the same all run long.
    perms.append(perm)
  assert len({tuple(p) for p in perms}) == 4  # A new permutation per seed.
  # The same seed gives the same permutation again (a run can be repeated).
  b = rgft_jax.Budget(costs, budget, total, every=every, rule="shuffled", seed=2)
  again = _run(b, lambda t: np.eye(n)[(t - 1) // every])
  assert [int(again[1 + j * every][0][1:]) for j in range(n)] == perms[2]


def test_shuffled_keeps_tops_knapsack_on_the_permuted_map():
  # Unequal costs: the trained set is the best knapsack of the permuted map
  # (brute force over all subsets).
  costs = rgft_jax.DetachCosts(
    tuple("abcde"), 20.0, np.array([2.0, 3.0, 1.5, 4.0, 2.5])
  )
  rng = np.random.default_rng(0)
  ema = rng.random(5)
  b = rgft_jax.Budget(costs, 0.7, 10, every=20, rule="shuffled", seed=5)
  b.spend(0, b.detached)
  b.decide(1, ema)
  capacity = b.target(1) - costs.floor
  trained = [costs.names.index(n) for n in b.trained]
  permuted = ema[_perm(5, 5)]
  best = max(
    (
      s
      for r in range(6)
      for s in itertools.combinations(range(5), r)
      if costs.saving[list(s)].sum() <= capacity + 1e-12
    ),
    key=lambda s: permuted[list(s)].sum(),
  )
  assert sorted(trained) == sorted(best)


def _perm(n, seed):
  """The run's permutation, recovered from one-hot probes (see above)."""
  costs = _equal_costs(n)
  budget = 1 - (n - 1) * 2.0 / 20.0 - 1e-9
  perm = [0] * n
  for j in range(n):
    b = rgft_jax.Budget(costs, budget, 2 + n, every=1, rule="shuffled", seed=seed)
    b.spend(0, b.detached)
    b.decide(1, np.eye(n)[j])
    (name,) = b.trained
    perm[int(name[1:])] = j  # Component i carries the map's entry perm[i].
  return perm


def test_static_measures_then_holds_top():
  n, every, total = 5, 4, 30
  costs = _equal_costs(n, full=20.0, each=3.0)  # Floor 5: 5 + 3k per step.
  rng = np.random.default_rng(3)
  maps = [rng.random(n) for _ in range(total)]
  b = rgft_jax.Budget(costs, 0.6, total, every=every, rule="static")
  got = _run(b, lambda t: maps[t])
  # Steps 0 to `every`: nothing trained (the window), at the floor's cost.
  assert all(got[t] == [] for t in range(1 + every))
  # Step 1 + every: the k highest of that step's map, k what the budget left
  # allows per step: (0.6 * 30 * 20 - 5 * 5) / 25 = 13.4 per step, 5 + 3k <= 13.4.
  k = 2
  top = sorted(f"c{i}" for i in np.argsort(-maps[1 + every])[:k])
  assert got[1 + every] == top
  assert all(got[t] == top for t in range(1 + every, total))  # Held.
  assert b.spent <= 0.6 * total * 20.0


def test_static_refuses_a_ramp_and_a_run_too_short():
  with pytest.raises(ValueError, match="no ramp"):
    rgft_jax.Budget(_equal_costs(3), 0.6, 20, every=4, rule="static", ramp_steps=4)
  with pytest.raises(ValueError, match="never reaches"):
    rgft_jax.Budget(_equal_costs(3), 0.6, 5, every=4, rule="static")


@pytest.mark.parametrize(
  ("rule", "depth", "expected"),
  [
    # Savings 4, 1, 3, 2, 5 (floor 5, full 20) with 6 FLOPs to spend, taken
    # by depth up to the first that does not fit: c0 (4), c1 (1), then c2
    # (3) does not fit in the 1 left.
    ("surgical_first", None, ["c0", "c1"]),
    # Deepest first: c4 (5), then c3 (2) does not fit in 1.
    ("surgical_last", None, ["c4"]),
    # Depths as blocks [2, 1, 2, 0, 0]: c3 (2), then c4 (5) does not fit in 4.
    ("surgical_first", [2, 1, 2, 0, 0], ["c3"]),
    # Deepest block first, names' order within it: c0 (4), then c2 (3) does
    # not fit in 2.
    ("surgical_last", [2, 1, 2, 0, 0], ["c0"]),
  ],
)
def test_surgical_takes_a_run_of_blocks_by_depth(rule, depth, expected):
  costs = rgft_jax.DetachCosts(
    tuple(f"c{i}" for i in range(5)), 20.0, np.array([4.0, 1.0, 3.0, 2.0, 5.0])
  )
  # Budget so that steps 1..: (b * T * 20 - floor) / (T - 1) = floor + 6 = 11.
  total = 10
  b = rgft_jax.Budget(
    costs, (5.0 + 11.0 * 9) / (total * 20.0), total, every=100, rule=rule, depth=depth
  )
  got = _run(b, lambda t: np.random.default_rng(t).random(5))  # Map ignored.
  assert got[1] == expected
  assert all(g == expected for g in got[1:])


def test_surgical_depth_is_checked():
  with pytest.raises(ValueError, match="one entry per component"):
    rgft_jax.Budget(_equal_costs(3), 0.6, 10, rule="surgical_first", depth=[0, 1])
  with pytest.raises(TypeError, match="integers"):
    rgft_jax.Budget(_equal_costs(3), 0.6, 10, rule="surgical_last", depth=[0, 1.5, 2])


def test_charge_counts_against_the_budget():
  costs = _equal_costs(4, full=20.0, each=3.0)  # Floor 8.
  budget = rgft_jax.Budget(costs, 0.6, 10, every=100)
  budget.spend(0, budget.detached)  # 8.
  budget.charge(12.0)  # A rule's own measurement, outside the steps.
  # Left: 0.6 * 10 * 20 - 8 - 12 = 100 over 9 steps.
  np.testing.assert_allclose(budget.target(1), 100 / 9)
  assert budget.spent == 20.0 and budget.charged == 12.0
  other = rgft_jax.Budget(costs, 0.6, 10, every=100)
  other.load_state_dict(budget.state_dict())
  assert other.charged == 12.0 and other.target(1) == budget.target(1)
  with pytest.raises(ValueError, match="flops"):
    budget.charge(-1.0)
  with pytest.raises(ValueError, match="charged"):
    other.load_state_dict({**budget.state_dict(), "charged": 30.0})
