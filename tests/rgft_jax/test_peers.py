"""DropBP and GreenTrainer: hand traces of their formulas, ports of the
original allocators, brute force, and XLA's FLOP counts."""

import heapq
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgft_jax
from rgft_jax._peers import dropbp_draw

# DropBP.


def test_dropbp_rates_hand_trace():
  # S = [1, 2, 0.5], FLOPs [1, 2, 1], keep half of 4. Priorities S * (p + 0.1):
  # picks 2, 2, 0, 2, 2, 1, 0, 2, 2, 0, 2, 1, 0, 2, 2, 0, 1 (ties to the higher
  # index); kept FLOPs fall from 4 to 2.
  rates = rgft_jax.dropbp_rates([1.0, 2.0, 0.5], [1.0, 2.0, 1.0], 0.5)
  np.testing.assert_allclose(rates, [0.5, 0.3, 0.9])


def _allocate_p_port(s, f, keep):
  """`allocate_p.cc` (min_rate 0): a max-heap of (-S * (p + 0.1), index)."""
  b = [0] * len(s)  # Tenths.
  heap = [(s[i] * 0.1, -i) for i in range(len(s))]  # heapq pops the least.
  heapq.heapify(heap)
  kept, target = sum(f), keep * sum(f)
  while kept > target + 1e-9 * max(sum(f), 1.0) and heap:
    delta, neg_i = heapq.heappop(heap)
    i = -neg_i
    b[i] += 1
    kept -= f[i] * 0.1
    if b[i] < 9:
      heapq.heappush(heap, (delta + 0.1 * s[i], neg_i))
  return np.array(b) / 10


@pytest.mark.parametrize("seed", range(30))
def test_dropbp_rates_equal_a_port_of_the_original(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 12))
  s = rng.random(n) * (rng.random(n) > 0.1)
  s[rng.random(n) < 0.2] = s[0]  # Ties.
  f = rng.random(n) + 0.1
  keep = float(rng.random())
  np.testing.assert_allclose(
    rgft_jax.dropbp_rates(s, f, keep), _allocate_p_port(list(s), list(f), keep)
  )


def test_dropbp_rates_refuse_bad_input():
  with pytest.raises(ValueError, match="sensitivity"):
    rgft_jax.dropbp_rates([1.0, np.nan], [1.0, 1.0], 0.5)
  with pytest.raises(ValueError, match="one length"):
    rgft_jax.dropbp_rates([1.0], [1.0, 1.0], 0.5)
  with pytest.raises(ValueError, match="keep"):
    rgft_jax.dropbp_rates([1.0], [1.0], 1.5)


def test_dropbp_sensitivity_by_hand():
  # Gradients by hand: nothing dropped, norms (5, 1); dropping x zeroes "a"
  # (norms 0, 1): (5 - 0)^2 = 25; dropping y halves "b" (norms 5, 0.5): 0.25.
  grads = {
    frozenset(): {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])},
    frozenset({"x"}): {"a": jnp.zeros(2), "b": jnp.array([1.0])},
    frozenset({"y"}): {"a": jnp.array([4.0, 3.0]), "b": jnp.array([-0.5])},
  }
  s = rgft_jax.dropbp_sensitivity(grads.__getitem__, ["x", "y"])
  np.testing.assert_allclose(s, [25.0, 0.25])


def test_dropbp_draw_follows_rates_then_tops_up_by_rate():
  rates = np.array([0.1, 0.5, 0.9, 0.0])
  saving = np.ones(4)
  rng = np.random.default_rng(0)
  draws = [dropbp_draw(rates, rng, saving, room=10.0) for _ in range(4000)]
  freq = [np.mean([i in d for d in draws]) for i in range(4)]
  np.testing.assert_allclose(freq, rates, atol=0.03)
  # Room for one branch: whatever is drawn, the highest rates go first, so the
  # branch of rate 0 (never drawn) is the one kept unless drawn ones are fewer.
  for _ in range(50):
    d = dropbp_draw(rates, rng, saving, room=1.0)
    assert len(d) >= 3 and {0, 1, 2} <= d | {0}
    assert 2 in d and 1 in d


def _detach_costs():
  return rgft_jax.DetachCosts(
    ("a", "b", "c", "d"), 20.0, np.array([4.0, 3.0, 2.0, 5.0])
  )


def test_dropbp_budget_allocates_once_and_stays_within():
  costs = _detach_costs()
  total = 200
  with pytest.raises(ValueError, match="every must be 1"):
    rgft_jax.Budget(costs, 0.6, total, every=5, rule="dropbp")
  budget = rgft_jax.Budget(costs, 0.6, total, every=1, rule="dropbp", seed=1)
  assert budget.allocation_step == 20
  sensitivity = np.array([4.0, 1.0, 0.5, 2.0])
  detached = []
  for t in range(total):
    if budget.wants_sensitivity(t):
      assert t == 20
      with pytest.raises(ValueError, match="allocate"):
        budget.decide(t, np.ones(4))
      # What the budget has left per step, above the floor (6), over the
      # branches' 14: the fraction kept; the rates are DropBP's for it.
      keep = (budget.target(t) - costs.floor) / 14.0
      budget.allocate(sensitivity)
      np.testing.assert_allclose(
        budget.rates, rgft_jax.dropbp_rates(sensitivity, costs.saving, keep)
      )
    if budget.due(t):
      budget.decide(t, np.ones(4))
    detached.append(budget.detached)
    budget.spend(t, budget.detached)
  with pytest.raises(ValueError, match="already"):
    budget.allocate(sensitivity)
  assert budget.spent <= 0.6 * total * 20.0 + 1e-9
  assert budget.spent >= 0.9 * 0.6 * total * 20.0  # Not much hoarded.
  # After allocation, each branch is detached about as often as its rate
  # says, or more (top-ups); the most sensitive least often.
  after = detached[21:]
  freq = np.array([np.mean([n in d for d in after]) for n in costs.names])
  assert (freq >= budget.rates - 0.08).all()
  assert np.argmin(freq) == np.argmax(sensitivity)


def test_dropbp_state_round_trips_its_rates():
  costs = _detach_costs()
  budget = rgft_jax.Budget(costs, 0.6, 20, every=1, rule="dropbp")
  for t in range(3):
    if budget.wants_sensitivity(t):
      budget.allocate([1.0, 2.0, 3.0, 4.0])
    if budget.due(t):
      budget.decide(t, np.ones(4))
    budget.spend(t, budget.detached)
  state = budget.state_dict()
  other = rgft_jax.Budget(costs, 0.6, 20, every=1, rule="dropbp")
  other.load_state_dict(state)
  np.testing.assert_array_equal(other.rates, budget.rates)
  with pytest.raises(ValueError, match="rates"):
    other.load_state_dict({k: v for k, v in state.items() if k != "rates"})


# GreenTrainer.


def _chain_costs():
  """The trace's three tensors, input first: A (t_dy 3, t_dw 2), B (2, 2), C
  (1, 2). GreenTrainer's cost of a set: its t_dw, and the t_dy of every
  tensor from the deepest trained one up to the loss."""
  dy, dw = [3.0, 2.0, 1.0], [2.0, 2.0, 2.0]
  alone = [dw[i] + sum(dy[i:]) for i in range(3)]  # [8, 5, 3]
  return rgft_jax.FreezeCosts(("A", "B", "C"), 10.0, alone, [0.0, 2.0, 2.0])


@pytest.mark.parametrize(
  ("capacity", "expected"),
  [
    (3.0, {"C"}),  # 0.2 at cost 3.
    (6.0, {"B"}),  # 1.0 at cost 5; B and C would cost 7.
    (8.0, {"B", "C"}),  # 1.2 at cost 7; A alone is 0.5 at 8.
    # Everything (1.7 at 12): the original code returns {B, C} here, its
    # table stopping one tensor short.
    (12.0, {"A", "B", "C"}),
  ],
)
def test_greentrainer_select_hand_trace(capacity, expected):
  costs = _chain_costs()
  importance = [0.5, 1.0, 0.2]
  got = rgft_jax.greentrainer_select(importance, costs, capacity, buckets=12)
  assert {costs.names[i] for i in got} == expected


@pytest.mark.parametrize("seed", range(25))
def test_greentrainer_select_equals_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 8))
  alone = rng.integers(1, 20, n).astype(float)
  weight = rng.integers(0, 8, n).astype(float)
  weight[0] = 0.0
  costs = rgft_jax.FreezeCosts(tuple(f"t{i}" for i in range(n)), 5.0, alone, weight)
  importance = rng.normal(size=n)
  span = costs.full - costs.forward
  capacity = float(rng.integers(0, int(span) + 2))
  got = rgft_jax.greentrainer_select(importance, costs, capacity, buckets=int(span))
  best = max(
    (
      sum(importance[i] for i in s)
      for r in range(n + 1)
      for s in itertools.combinations(range(n), r)
      if costs.cost(s) - costs.forward <= capacity and all(importance[i] > 0 for i in s)
    ),
  )
  assert costs.cost(sorted(got)) - costs.forward <= capacity
  np.testing.assert_allclose(sum(importance[i] for i in got), best, atol=1e-12)


def _quadratic():
  """Least squares `0.5 * mean((x @ w + b - y) ** 2)`, gradients by hand."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 3))
  y = rng.normal(size=(8,))
  params = {"w": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(0.3)}

  def loss(p, x, y):
    return 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  def grads(w, b):
    r = x @ w + b - y
    return x.T @ r / len(y), r.mean()

  return loss, params, x, y, grads


def test_greentrainer_importance_by_hand():
  jax.config.update("jax_enable_x64", True)
  try:
    loss, params, x, y, grads = _quadratic()
    lr = 0.1
    gw0, gb0 = grads(np.asarray(params["w"]), float(params["b"]))
    dw, db = -lr * gw0, -lr * gb0  # One SGD step.
    gw1, gb1 = grads(np.asarray(params["w"]) + dw, float(params["b"]) + db)
    raw = np.array([-(gb1 * db), -(gw1 @ dw)])  # Tree order: b, w.
    tx = optax.sgd(lr)
    got = rgft_jax.greentrainer_importance(loss, tx, params, tx.init(params), x, y)
    np.testing.assert_allclose(got, raw / np.abs(raw).max(), rtol=1e-10)
    named = rgft_jax.greentrainer_importance(
      loss, tx, params, tx.init(params), x, y, names=["w", "b"]
    )
    np.testing.assert_allclose(named, got[::-1], rtol=1e-10)
  finally:
    jax.config.update("jax_enable_x64", False)


D, B = 16, 8


def _chain_params(layers=3):
  key = jax.random.key(0)
  return {
    f"l{i}": {
      "up": jax.random.normal(jax.random.fold_in(key, 2 * i), (D, 4 * D)) * 0.1,
      "down": jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (4 * D, D)) * 0.1,
    }
    for i in range(layers)
  }


def _chain_loss(p, x):
  for i in range(len(p)):
    x = x + jnp.tanh(x @ p[f"l{i}"]["up"]) @ p[f"l{i}"]["down"]
  return jnp.mean(x**2)


def test_tensor_order_is_first_use():
  params = {"z_in": jnp.ones((3, 3)), "a_out": jnp.ones((3, 1))}
  order = rgft_jax.tensor_order(
    lambda p, x: (x @ p["z_in"] @ p["a_out"]).sum(), params, jnp.ones((2, 3))
  )
  assert order == ("z_in", "a_out")  # Tree order would be a_out first.
  assert rgft_jax.tensor_order(_chain_loss, _chain_params(2), jnp.ones((B, D))) == (
    "l0/up",
    "l0/down",
    "l1/up",
    "l1/down",
  )


def test_freeze_step_equals_adam_on_the_trained_tensors_alone():
  params = _chain_params()
  x = jax.random.normal(jax.random.key(1), (B, D))
  tx = optax.adam(1e-2)
  step = jax.jit(rgft_jax.freeze_step(_chain_loss, tx), static_argnames="frozen")
  frozen = frozenset({"l0/up", "l1/down", "l2/up"})
  p, s = params, tx.init(params)
  # Reference: Adam on a dict of the trained tensors, the rest constants.
  trained = {
    k: params[k.split("/")[0]][k.split("/")[1]] for k in ("l0/down", "l1/up", "l2/down")
  }

  def ref_loss(sub):
    full = jax.tree.map(lambda a: a, params)
    full = {k: dict(v) for k, v in full.items()}
    for k, v in sub.items():
      layer, name = k.split("/")
      full[layer][name] = v
    return _chain_loss(full, x)

  ref_state = tx.init(trained)
  for _ in range(3):
    value, p, s = step(p, s, x, frozen=frozen)
    ref_value, g = jax.value_and_grad(ref_loss)(trained)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    u, ref_state = tx.update(g, ref_state, trained)
    trained = optax.apply_updates(trained, u)
  for k, v in trained.items():
    layer, name = k.split("/")
    np.testing.assert_allclose(p[layer][name], v, rtol=1e-5, atol=1e-7)
  for k in frozen:  # Frozen: weights and moments held exactly.
    layer, name = k.split("/")
    np.testing.assert_array_equal(p[layer][name], params[layer][name])
    assert (s[0].mu[layer][name] == 0).all() and (s[0].nu[layer][name] == 0).all()


def test_freeze_costs_match_xla_and_a_hand_count():
  params = _chain_params()
  x = jnp.ones((B, D))
  tx = optax.sgd(0.1)
  step = rgft_jax.freeze_step(_chain_loss, tx)
  names = rgft_jax.tensor_order(_chain_loss, params, x)
  opt_state = tx.init(params)
  costs = rgft_jax.freeze_costs(step, names, params, opt_state, x, samples=4)
  assert costs.additivity_error < 0.02
  # Each weight gradient is one [D, B] @ [B, out] matmul, 2 * B * D * 4D
  # FLOPs, and SGD's update, a multiply and an add per weight.
  matmul = 2 * B * D * 4 * D
  np.testing.assert_allclose(costs.weight[1:], matmul + 2 * D * 4 * D, rtol=1e-6)
  # Training only the last tensor: its weight gradient and the cotangent of
  # the loss above it, nothing below.
  assert matmul <= costs.alone[-1] < 1.2 * matmul
  # Every set of 3 tensors, measured by XLA against the model.
  for trained in itertools.combinations(range(len(names)), 3):
    frozen = frozenset(names) - {names[i] for i in trained}
    measured = rgft_jax.flops_of(
      lambda *a, frozen=frozen: step(*a, frozen=frozen), params, opt_state, x
    )
    np.testing.assert_allclose(costs.cost(trained), measured, rtol=0.02)


def test_greentrainer_budget_runs_the_dynamic_program():
  costs = _chain_costs()  # Forward 10, full 22.
  total = 10
  with pytest.raises(TypeError, match="FreezeCosts"):
    rgft_jax.Budget(_detach_costs(), 0.6, total, rule="greentrainer")
  with pytest.raises(TypeError, match="DetachCosts"):
    rgft_jax.Budget(costs, 0.6, total, rule="top")
  # Step 0 costs the forward pass (10); steps 1..9 may cost (b * 10 * 22 -
  # 10) / 9 = 16 each: capacity 6 above the forward pass, {B} (see above).
  b = (10 + 9 * 16) / (total * 22.0)
  budget = rgft_jax.Budget(costs, b, total, every=100, rule="greentrainer", unit=22.0)
  budget.spend(0, budget.detached)
  budget.decide(1, np.array([0.5, 1.0, 0.2]))
  assert budget.trained == {"B"}
  for t in range(1, total):
    budget.spend(t, budget.detached)
  assert budget.spent <= b * total * 22.0 + 1e-9
  with pytest.raises(ValueError, match="freeze_step"):
    rgft_jax.SparseTrainStep(lambda *a, **k: None, budget)
