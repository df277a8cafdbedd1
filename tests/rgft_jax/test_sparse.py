"""Detached-output steps: gradients, held state, FLOPs, NNX, and the variant cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _sparse_net import CLASSES
from _sparse_net import D_IN
from _sparse_net import B
from _sparse_net import H
from _sparse_net import Net
from _sparse_net import W
from _sparse_net import _loss
from _sparse_net import _setup
from flax import nnx

import rgft_jax


@pytest.mark.slow
@pytest.mark.parametrize("detach", [(0,), (2,), (0, 2)])
def test_detached_gradients_equal_a_hand_written_stop_gradient(detach):
  model, params, x, y, tracker, comps, _ = _setup()
  names = frozenset(f"block{i}" for i in detach)
  loss, grads, error_map = jax.jit(tracker.value_and_grad(_loss(model), detach=names))(
    params, x, y
  )
  ref_loss, ref = jax.value_and_grad(_loss(Net(detach=detach)))(params, x, y)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for i in detach:  # No gradient reaches a detached branch's weights.
    assert all((g == 0).all() for g in jax.tree.leaves(grads[f"block{i}"]))
  # Still measured: as without detaching, from the top detached branch up
  # (below it the paths through the detached branches are gone, as in the
  # hand-written model measured without detaching).
  _, _, undetached = jax.jit(tracker.value_and_grad(_loss(model)))(params, x, y)
  for n in comps.names[max(detach) :]:
    np.testing.assert_allclose(error_map[n], undetached[n], rtol=1e-5)
  hand = rgft_jax.ErrorTracker(Net(detach=detach))
  _, _, written = jax.jit(hand.value_and_grad(_loss(Net(detach=detach))))(params, x, y)
  for n in comps.names:
    if n not in names:
      np.testing.assert_allclose(error_map[n], written[n], rtol=1e-5)


def test_detaching_needs_known_names():
  model, params, x, y, tracker, *_ = _setup()
  with pytest.raises(ValueError, match="detach names unknown components"):
    tracker.value_and_grad(_loss(model), detach={"nope"})(params, x, y)


def _step(tracker, tx, model, comps):
  return jax.jit(
    rgft_jax.detachable_step(tracker, tx, _loss(model), comps),
    static_argnames="detached",
  )


def test_detached_step_holds_parameters_and_optimizer_state():
  model, params, x, y, tracker, comps, tx = _setup()
  step = _step(tracker, tx, model, comps)
  state = tx.init(params)
  _, params, state = step(params, state, x, y)  # Moments are non-zero now.
  _, new_params, new_state = step(params, state, x, y, detached=frozenset({"block1"}))
  held = jax.tree.leaves(
    (params["block1"], state[0].mu["block1"], state[0].nu["block1"])
  )
  now = jax.tree.leaves(
    (new_params["block1"], new_state[0].mu["block1"], new_state[0].nu["block1"])
  )
  for a, b in zip(held, now, strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(
    new_params["block0"]["Dense_0"]["kernel"], params["block0"]["Dense_0"]["kernel"]
  )
  # Measured although detached: its EMA moved.
  i = comps.names.index("block1")
  ema = optax.tree.get(new_state, "ema")
  assert ema[i] != optax.tree.get(state, "ema")[i]


def test_deprecated_train_step_warns_and_builds_the_detachable_step():
  model, params, x, y, tracker, comps, tx = _setup()
  with pytest.warns(DeprecationWarning, match=r"use rgft_jax\.detachable_step"):
    old = rgft_jax.train_step(tracker, tx, _loss(model), comps, exact=True)
  new = rgft_jax.detachable_step(tracker, tx, _loss(model), comps, exact=True)
  assert old.tracker is tracker
  state = tx.init(params)
  detached = frozenset({"block1"})
  got, want = (
    jax.jit(step, static_argnames="detached")(params, state, x, y, detached=detached)
    for step in (old, new)
  )
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  _, new_params, _ = got  # The detached block kept its parameters; others moved.
  for a, b in zip(
    jax.tree.leaves(new_params["block1"]),
    jax.tree.leaves(params["block1"]),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(
    new_params["block2"]["Dense_0"]["kernel"], params["block2"]["Dense_0"]["kernel"]
  )


def test_retrained_component_continues_from_its_optimizer_state():
  model, params, x, y, tracker, comps, tx = _setup()
  step = _step(tracker, tx, model, comps)
  state = tx.init(params)
  for _ in range(2):
    _, params, state = step(params, state, x, y)
  before = state[0].mu["block2"]
  for _ in range(3):
    _, params, state = step(params, state, x, y, detached=frozenset({"block2"}))
  for a, b in zip(
    jax.tree.leaves(state[0].mu["block2"]), jax.tree.leaves(before), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  # Trained again: Adam's first moment goes on from `before` with this gradient.
  _, grads = jax.value_and_grad(_loss(model))(params, x, y)
  _, params, state = step(params, state, x, y)
  for a, m, g in zip(
    jax.tree.leaves(state[0].mu["block2"]),
    jax.tree.leaves(before),
    jax.tree.leaves(grads["block2"]),
    strict=True,
  ):
    np.testing.assert_allclose(a, 0.9 * m + 0.1 * g, rtol=1e-5, atol=1e-8)


def _matmul(m, k, n):
  return 2 * m * k * n


def _flops(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


@pytest.mark.slow
@pytest.mark.parametrize("block", [0, 1, 2])
def test_detaching_saves_the_hand_counted_backward_at_any_depth(block):
  model, params, x, y, tracker, comps, tx = _setup()
  step = rgft_jax.detachable_step(tracker, tx, _loss(model), comps)
  state = tx.init(params)

  def flops(detached):
    return _flops(lambda *a: step(*a, detached=detached), params, state, x, y)

  adam = optax.adam(1e-2)
  tree = params[f"block{block}"]
  optimizer = _flops(
    lambda g, s, p: optax.apply_updates(p, adam.update(g, s, p)[0]),
    tree,
    adam.init(tree),
    tree,
  )
  # The branch's weight gradients (dW of both layers) and input gradients
  # (dX of both layers), by hand, plus the optimizer's work on its parameters.
  backward = 2 * (_matmul(W, B, H) + _matmul(B, H, W))
  saved = flops(frozenset()) - flops(frozenset({f"block{block}"}))
  np.testing.assert_allclose(saved, backward + optimizer, rtol=0.05)


@pytest.mark.slow
def test_heads_save_only_when_the_whole_attention_is_detached():
  """Per-head detaching is correct but saves nothing: the heads share one einsum."""

  class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8, name="embed")(x)
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(y, y)
      return nn.Dense(3, name="head")(x.mean(1))

  model = Attn()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 4)), jnp.float32)
  y = jnp.array([0, 1, 2, 0])
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model, select="heads")
  comps = tracker.components(params, x)
  assert comps.names == ("attn/head0", "attn/head1")
  tx = rgft_jax.rgft(1e-2, comps)
  step = rgft_jax.detachable_step(tracker, tx, _loss(model), comps)
  state = tx.init(params)

  def flops(detached):
    return _flops(lambda *a: step(*a, detached=detached), params, state, x, y)

  full = flops(frozenset())
  one = flops(frozenset({"attn/head0"}))
  both = flops(frozenset(comps.names))
  assert one >= 0.99 * full  # Nothing saved.
  assert both < 0.9 * full

  # One head detached: its q/k/v slices get no gradient, the other head's do.
  _, grads, _ = tracker.value_and_grad(_loss(model), detach={"attn/head0"})(
    params, x, y
  )
  _, ref = jax.value_and_grad(_loss(model))(params, x, y)
  for name in ("query", "key", "value"):
    g, r = grads["attn"][name]["kernel"], ref["attn"][name]["kernel"]
    assert (g[:, 0] == 0).all() and (r[:, 0] != 0).any()
    np.testing.assert_allclose(g[:, 1], r[:, 1], rtol=1e-5, atol=1e-7)


class NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(W, H, rngs=rngs)
    self.l2 = nnx.Linear(H, W, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


class NnxNet(nnx.Module):
  def __init__(self, rngs, detach=()):
    self.embed = nnx.Linear(D_IN, W, rngs=rngs)
    self.block0 = NnxMlp(rngs)
    self.block1 = NnxMlp(rngs)
    self.head = nnx.Linear(W, CLASSES, rngs=rngs)
    self.detach = tuple(detach)

  def __call__(self, x):
    x = self.embed(x)
    for i, block in enumerate((self.block0, self.block1)):
      h = block(x)
      x = x + (jax.lax.stop_gradient(h) if i in self.detach else h)
    return self.head(x)


def _nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_detached_step_matches_a_hand_written_stop_gradient():
  _, _, x, y, *_ = _setup()
  model = NnxNet(nnx.Rngs(0))
  tracker = rgft_jax.ErrorTracker(model, select=lambda p, m: isinstance(m, NnxMlp))
  comps = tracker.components(nnx.state(model, nnx.Param), x)
  assert comps.names == ("block0", "block1")
  # Gradients against the same model with stop_gradient written in.
  ref_model = NnxNet(nnx.Rngs(0), detach=(1,))
  _, grads, _ = nnx.jit(tracker.value_and_grad(_nnx_loss, detach={"block1"}))(
    model, x, y
  )
  ref = nnx.grad(_nnx_loss)(ref_model, x, y)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  optimizer = nnx.Optimizer(model, rgft_jax.rgft(1e-2, comps), wrt=nnx.Param)
  step = nnx.jit(
    rgft_jax.detachable_step(tracker, None, _nnx_loss, comps),
    static_argnames="detached",
  )
  step(model, optimizer, x, y)
  before = jax.tree.map(jnp.copy, nnx.state((model.block1, optimizer.opt_state)))
  block0 = jnp.copy(model.block0.l1.kernel[...])
  step(model, optimizer, x, y, detached=frozenset({"block1"}))
  after = nnx.state((model.block1, optimizer.opt_state))
  mu = lambda s: s[1][0].mu["block1"]  # noqa: E731
  for a, b in zip(
    jax.tree.leaves((before[0], mu(before))),
    jax.tree.leaves((after[0], mu(after))),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(model.block0.l1.kernel[...], block0)
  assert int(optimizer.step[...]) == 2


def test_variant_cache_keys_on_argument_types_and_counts_compilations():
  model, params, x, y, tracker, comps, tx = _setup()
  step = rgft_jax.detachable_step(tracker, tx, _loss(model), comps)
  variants = rgft_jax.StepVariants(
    lambda d: lambda *a: step(*a, detached=d), max_variants=2
  )
  state = tx.init(params)
  for detached in ({"block0"}, {"block1"}, {"block0"}):
    variants(frozenset(detached), params, state, x, y)
  assert variants.compilations == 2
  # Another batch size is another compiled step, not an error.
  variants(frozenset({"block0"}), params, state, x[:8], y[:8])
  assert variants.compilations == 3
  variants(frozenset({"block1"}), params, state, x, y)  # Evicted: recompiled.
  assert variants.compilations == 4
  # Not donated: the inputs stay usable.
  assert np.isfinite(np.asarray(params["embed"]["kernel"])).all()


def test_variant_cache_warns_when_it_thrashes():
  model, params, x, y, tracker, comps, tx = _setup()
  step = rgft_jax.detachable_step(tracker, tx, _loss(model), comps)
  variants = rgft_jax.StepVariants(
    lambda d: lambda *a: step(*a, detached=d), max_variants=1, warn_after=2
  )
  state = tx.init(params)
  variants(frozenset({"block0"}), params, state, x, y)
  variants(frozenset({"block1"}), params, state, x, y)
  with pytest.warns(RuntimeWarning, match="thrashing"):
    variants(frozenset({"block0"}), params, state, x, y)


@pytest.mark.slow
def test_detach_costs_warn_when_a_component_saves_nothing():
  """Heads share one einsum: detaching one alone saves nothing, and that is said."""

  class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(y, y)
      return nn.Dense(3, name="head")(x.mean(1))

  attn = Attn()
  x = jnp.ones((4, 5, 8))
  y = jnp.array([0, 1, 2, 0])
  params = attn.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(attn, select="heads")
  comps = tracker.components(params, x)
  tx = rgft_jax.rgft(1e-2, comps)
  step = rgft_jax.detachable_step(tracker, tx, _loss(attn), comps)
  with pytest.warns(RuntimeWarning) as record:
    rgft_jax.detach_costs(step, comps.names, params, tx.init(params), x, y)
  said = " ".join(str(w.message) for w in record)
  assert "saves nothing" in said and "do not add up" in said
