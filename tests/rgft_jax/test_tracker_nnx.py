"""ErrorTracker on Flax NNX models, against the same hand-written references.

The NNX model here computes exactly what `_tiny_linen.TinyTransformer` does and
gets the same parameters, so the per-example `vmap` references written for the
Linen model apply unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny_linen import CLASSES
from _tiny_linen import WIDTH
from _tiny_linen import _data
from _tiny_linen import _reference_cheap_map
from _tiny_linen import _reference_forward
from _tiny_linen import _setup
from _tiny_nnx import MlpBlock
from _tiny_nnx import _loss_fn
from _tiny_nnx import _nnx_setup
from flax import nnx

import rgft_jax


def test_same_function_as_the_linen_reference():
  model, params, x, y = _nnx_setup()
  expected = _reference_forward(params, x, y, lambda n, v: v, "branches").mean()
  np.testing.assert_allclose(_loss_fn(model, x, y), expected, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
  "granularity,method", [("branches", "norm_product"), ("heads", "taylor")]
)
def test_cheap_methods_match_per_example_vmap(granularity, method):
  model, params, x, y = _nnx_setup()
  tracker = rgft_jax.ErrorTracker(model, select=granularity, method=method)
  step = nnx.jit(tracker.value_and_grad(_loss_fn))
  for batch in (6, 3):  # A second batch size, same jitted function.
    x, y = _data(batch, seed=batch)
    loss, grads, error_map = step(model, x, y)
    expected = _reference_cheap_map(params, x, y, granularity, method)
    assert sorted(error_map) == sorted(expected)
    for name, value in expected.items():
      np.testing.assert_allclose(error_map[name], value, rtol=2e-4, err_msg=name)
  ref_loss, ref_grads = nnx.value_and_grad(_loss_fn)(model, x, y)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ablation_matches_masked_forwards():
  model, params, x, y = _nnx_setup()
  tracker = rgft_jax.ErrorTracker(model, select="branches", method="ablation")
  _, _, error_map = nnx.jit(tracker.value_and_grad(_loss_fn))(model, x, y)
  full = _reference_forward(params, x, y, lambda n, v: v, "branches").mean()
  assert len(error_map) == 4
  for name, value in error_map.items():

    def zero(n, v, name=name):
      return jnp.zeros_like(v) if n == name else v

    ablated = _reference_forward(params, x, y, zero, "branches").mean()
    np.testing.assert_allclose(value, full - ablated, rtol=1e-4, atol=1e-6)


def test_components_match_the_linen_ownership():
  """Same layout, same owners: the Linen tracker's components, path by path."""
  linen_model, params, x, _ = _setup()
  model, _, _, _ = _nnx_setup()
  for select in ("branches", "heads"):
    ours = rgft_jax.ErrorTracker(model, select=select).components(
      nnx.state(model, nnx.Param), x
    )
    linen = rgft_jax.ErrorTracker(linen_model, select=select).components(params, x)
    assert ours.names == linen.names
    assert ours.owned_paths() == linen.owned_paths()
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    for a, b in zip(
      jax.tree.leaves(ours.index), jax.tree.leaves(linen.index), strict=True
    ):
      np.testing.assert_array_equal(a, b)
    assert ours.unassigned(pure) == linen.unassigned(params)


def test_optimizer_loop_with_state_and_rngs():
  """nnx.Optimizer + rgft under nnx.jit; BatchNorm stats and Dropout RNGs advance."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      # No bias before BatchNorm: its gradient would be float noise, which Adam
      # amplifies to a full step in either direction.
      self.inp = nnx.Linear(4, WIDTH, use_bias=False, rngs=rngs)
      self.norm = nnx.BatchNorm(WIDTH, rngs=rngs)
      self.mlp_a = MlpBlock(rngs)
      self.mlp_b = MlpBlock(rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.out = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
      x = self.inp(x)
      x = x + self.mlp_a(self.norm(x))
      x = x + self.mlp_b(x)
      return self.out(self.drop(x))

  x, y = _data(4)
  x = x[:, 0]
  model, twin = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  tracker = rgft_jax.ErrorTracker(model)
  comps = tracker.components(model, x)
  assert comps.names == ("mlp_a", "mlp_b")
  assert sorted(comps.owned_paths()["mlp_a"])[-2:] == ["norm/bias", "norm/scale"]
  tx = rgft_jax.rgft(1e-2, comps, thresh_init=0.9, thresh_final=0.9)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads, error_map = tracker.value_and_grad(_loss_fn)(model, x, y)
    optimizer.update(model, grads, error_map=error_map)
    return loss, grads, error_map

  # The twin follows the same steps by hand: plain nnx gradients, the tracker's
  # error map, and `tx.update` on pure arrays.
  state = tx.init(nnx.as_pure(nnx.state(twin, nnx.Param)))
  alphas = []
  for _ in range(3):
    loss, _, error_map = step(model, optimizer, x, y)
    alphas.append(optimizer.opt_state[1].alpha[...])
    ref_loss, ref_grads = nnx.value_and_grad(_loss_fn)(twin, x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    params = nnx.as_pure(nnx.state(twin, nnx.Param))
    updates, state = tx.update(
      nnx.as_pure(ref_grads), state, params, error_map=error_map
    )
    nnx.update(twin, optax.apply_updates(params, updates))
  arrays = nnx.Not(nnx.RngKey)  # Parameters, statistics, RNG counters.
  for a, b in zip(
    jax.tree.leaves(nnx.state(model, arrays)),
    jax.tree.leaves(nnx.state(twin, arrays)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(model.norm.mean[...]).sum()) > 0  # Statistics moved.
  assert int(model.drop.rngs.count[...]) == 3  # One dropout key per step.
  np.testing.assert_allclose(optimizer.opt_state[1].alpha[...], state[1].alpha)
  assert min(float(a.min()) for a in alphas) < 1.0  # The scaling took part.


def test_other_instances_and_classes_are_left_alone():
  model, _, x, y = _nnx_setup()
  other = MlpBlock(nnx.Rngs(3))
  original = MlpBlock.__call__
  tracker = rgft_jax.ErrorTracker(model)

  def loss_fn(model, x, y):
    # The same class outside the tracked model: not a tap.
    return _loss_fn(model, x, y) + 0.0 * other(jnp.ones((1, WIDTH))).sum()

  _, _, error_map = nnx.jit(tracker.value_and_grad(loss_fn))(model, x, y)
  assert len(error_map) == 4
  assert MlpBlock.__call__ is original
  assert nnx.MultiHeadAttention.__call__.__qualname__ == "MultiHeadAttention.__call__"


def test_loss_fn_must_take_the_model():
  model, params, x, y = _nnx_setup()
  tracker = rgft_jax.ErrorTracker(model)
  with pytest.raises(TypeError, match="first argument is the model"):
    tracker.value_and_grad(_loss_fn)(params, x, y)
