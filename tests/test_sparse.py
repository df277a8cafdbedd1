"""Sparse RGFT: freezing decisions, frozen steps, their FLOPs, and the soft-mode limit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgft_jax

B, D_IN, W, H, DEPTH, CLASSES = 16, 6, 32, 64, 3, 4


class MlpBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(W)(nn.relu(nn.Dense(H)(x)))


class Net(nn.Module):
  """Residual MLP: embed, DEPTH branches, head. No norms: matmuls dominate FLOPs."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(W, name="embed")(x)
    for i in range(DEPTH):
      x = x + MlpBlock(name=f"block{i}")(x)
    return nn.Dense(CLASSES, name="head")(x)


def _loss(model):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def _setup(patience=2, refresh_every=4, policy="any", stem=None, min_scale=0.01):
  model = Net()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, B))
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model)
  comps = tracker.components(params, x)
  tx = rgft_jax.rgft(1e-2, comps, warmup_steps=10, min_scale=min_scale)
  freezer = rgft_jax.Freezer(
    comps,
    min_scale=min_scale,
    patience=patience,
    refresh_every=refresh_every,
    policy=policy,
    stem=stem,
  )
  return model, params, x, y, tracker, comps, tx, freezer


def test_decisions_by_hand():
  *_, comps, _, freezer = _setup(patience=2, refresh_every=4, policy="any")
  assert comps.names == ("block0", "block1", "block2")
  lo, hi = 0.01, 0.5
  seen = []
  for step, alpha in enumerate(
    [[lo, hi, lo], [lo, hi, lo], [lo, hi, hi], [lo, lo, hi], [hi, lo, hi], [lo, lo, lo]]
  ):
    variant = freezer.variant(step)
    freezer.observe(np.float32(alpha), variant)
    seen.append((sorted(variant), sorted(freezer.frozen)))
  assert seen == [
    ([], []),  # block0, block2 at the floor once.
    ([], ["block0", "block2"]),  # Twice: frozen from the next step.
    (["block0", "block2"], ["block0", "block2"]),  # Not measured, kept frozen.
    (["block0", "block2"], ["block0", "block2"]),  # block1 at the floor once.
    ([], ["block1"]),  # Refresh: block0, block2 rose; block1 at the floor twice.
    (["block1"], ["block1"]),  # block0, block2 at the floor once again.
  ]


def test_prefix_policy_freezes_only_from_the_input_side():
  *_, freezer = _setup(patience=1, refresh_every=100, policy="prefix")
  lo, hi = 0.01, 0.5
  freezer.observe(np.float32([hi, lo, lo]), frozenset())
  assert freezer.frozen == frozenset()  # block0 is not at the floor.
  freezer.observe(np.float32([lo, lo, hi]), frozenset())
  assert freezer.frozen == {"block0", "block1"}
  state = freezer.state_dict()
  other = _setup(patience=1, refresh_every=100, policy="prefix")[-1]
  other.load_state_dict(state)
  assert other.frozen == freezer.frozen
  with pytest.raises(ValueError, match="other components"):
    other.load_state_dict({"at_floor": [0, 0], "frozen": ["nope"]})


def test_frozen_step_holds_parameters_and_optimizer_state():
  model, params, x, y, tracker, comps, tx, freezer = _setup()
  step = jax.jit(
    freezer.train_step(tracker, tx, _loss(model)), static_argnames="frozen"
  )
  state = tx.init(params)
  _, params, state, _ = step(params, state, x, y)  # Moments are non-zero now.
  frozen = frozenset({"block1"})
  _, new_params, new_state, alpha = step(params, state, x, y, frozen=frozen)
  for name in ("Dense_0", "Dense_1"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(
        new_params["block1"][name][leaf], params["block1"][name][leaf]
      )
      for moment in ("mu", "nu"):
        np.testing.assert_array_equal(
          getattr(new_state[0], moment)["block1"][name][leaf],
          getattr(state[0], moment)["block1"][name][leaf],
        )
  assert not np.array_equal(
    new_params["block0"]["Dense_0"]["kernel"], params["block0"]["Dense_0"]["kernel"]
  )
  # Not measured: its EMA entry is the previous one.
  i = comps.names.index("block1")
  assert (
    optax.tree.get(new_state, "error_map")[i] == optax.tree.get(state, "error_map")[i]
  )
  assert alpha.shape == (3,)


def test_unfrozen_component_continues_from_its_optimizer_state():
  model, params, x, y, tracker, _, tx, freezer = _setup()
  step = jax.jit(
    freezer.train_step(tracker, tx, _loss(model)), static_argnames="frozen"
  )
  state = tx.init(params)
  for _ in range(2):
    _, params, state, _ = step(params, state, x, y)
  before = state[0].mu["block2"]
  for _ in range(3):
    _, params, state, _ = step(params, state, x, y, frozen=frozenset({"block2"}))
  for a, b in zip(
    jax.tree.leaves(state[0].mu["block2"]), jax.tree.leaves(before), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  # Thawed: Adam's first moment goes on from `before` with this step's gradient.
  _, grads = jax.value_and_grad(_loss(model))(params, x, y)
  _, params, state, _ = step(params, state, x, y)
  for a, m, g in zip(
    jax.tree.leaves(state[0].mu["block2"]),
    jax.tree.leaves(before),
    jax.tree.leaves(grads["block2"]),
    strict=True,
  ):
    np.testing.assert_allclose(a, 0.9 * m + 0.1 * g, rtol=1e-5, atol=1e-8)


def test_nothing_frozen_equals_the_soft_mode():
  model, params, x, y, tracker, _, tx, freezer = _setup(patience=10**6)
  sparse = rgft_jax.SparseTrainStep(
    freezer, freezer.train_step(tracker, tx, _loss(model))
  )

  @jax.jit
  def soft(params, state, x, y):
    loss, grads, error_map = tracker.value_and_grad(_loss(model))(params, x, y)
    updates, state = tx.update(grads, state, params, error_map=error_map)
    return loss, optax.apply_updates(params, updates), state

  p1, s1 = params, tx.init(params)
  p2, s2 = jax.tree.map(jnp.copy, params), tx.init(params)
  for t in range(6):
    l1, p1, s1 = soft(p1, s1, x, y)
    l2, p2, s2 = sparse(t, p2, s2, x, y)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert sparse.compilations == 1


def _matmul(m, k, n):
  return 2 * m * k * n


def test_frozen_variants_save_the_hand_counted_flops():
  model, params, x, y, tracker, _, tx, freezer = _setup(
    policy="prefix", stem=r"embed/.*"
  )
  step = freezer.train_step(tracker, tx, _loss(model))
  state = tx.init(params)

  def flops(frozen):
    compiled = (
      jax.jit(lambda *a: step(*a, frozen=frozen)).lower(params, state, x, y).compile()
    )
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

  def optimizer_flops(tree):
    """What XLA counts for Adam's update and its application on `tree` alone."""
    adam = optax.adam(1e-2)
    fn = jax.jit(lambda g, s, p: optax.apply_updates(p, adam.update(g, s, p)[0]))
    compiled = fn.lower(tree, adam.init(tree), tree).compile()
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

  full = flops(frozenset())
  # Weight gradients of one block (dW of both Dense layers) and its input
  # gradients (dX), by hand; the optimizer's elementwise work on what freezes.
  block_dw = _matmul(W, B, H) + _matmul(H, B, W)
  block_dx = _matmul(B, H, W) + _matmul(B, W, H)
  # Freezing the top block drops its weight gradients and its optimizer work.
  top = flops(frozenset({"block2"}))
  np.testing.assert_allclose(
    full - top, block_dw + optimizer_flops(params["block2"]), rtol=0.05
  )
  # Freezing the bottom block and the stem ends the backward pass above them:
  # no weight or input gradients through the block, no embed weight gradient,
  # and no input gradient of block1's first layer (nothing below needs it).
  bottom = flops(frozenset({"block0"}))
  held = {"block0": params["block0"], "embed": params["embed"]}
  np.testing.assert_allclose(
    full - bottom,
    block_dw
    + block_dx
    + _matmul(D_IN, B, W)
    + _matmul(B, W, H)
    + optimizer_flops(held),
    rtol=0.05,
  )
  assert bottom < top < full


def test_variant_cache_is_bounded_and_counts_compilations():
  model, params, x, y, tracker, _, tx, freezer = _setup()
  sparse = rgft_jax.SparseTrainStep(
    freezer, freezer.train_step(tracker, tx, _loss(model)), max_variants=1
  )
  state = tx.init(params)
  for frozen in ({"block0"}, {"block1"}, {"block0"}):
    sparse.compiled(frozenset(frozen), params, state, x, y)
  assert sparse.compilations == 3
  sparse.compiled(frozenset({"block0"}), params, state, x, y)
  assert sparse.compilations == 3  # The one kept.


def test_bad_arguments_are_named():
  *_, comps, _, _ = _setup()
  with pytest.raises(ValueError, match="policy"):
    rgft_jax.Freezer(comps, policy="top")
  with pytest.raises(ValueError, match="order must list every component"):
    rgft_jax.Freezer(comps, order=["block0"])
  with pytest.raises(ValueError, match="patience"):
    rgft_jax.Freezer(comps, patience=0)


def test_level_sets_what_counts_as_the_floor():
  *_, comps, _, _ = _setup()
  freezer = rgft_jax.Freezer(comps, min_scale=0.01, patience=1, level=0.5)
  freezer.observe(np.float32([0.5, 0.51, 0.2]), frozenset())
  assert freezer.frozen == {"block0", "block2"}
  with pytest.raises(ValueError, match="level"):
    rgft_jax.Freezer(comps, min_scale=0.1, level=0.05)
