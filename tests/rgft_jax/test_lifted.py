"""Taps inside scans over layers and remat, against the same model unrolled.

The scanned models here compute exactly what `_tiny_linen.TinyTransformer`
does, with its two blocks' parameters stacked on a leading layer axis, so the
per-example `vmap` references written for the unrolled model apply: layer `i`
of the scanned module `encoderblock` is the unrolled `encoderblock_i`.
"""

import _tiny_nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny_linen import HEADS
from _tiny_linen import WIDTH
from _tiny_linen import _loss_fn
from _tiny_linen import _reference_cheap_map
from _tiny_linen import _reference_forward
from _tiny_linen import _setup
from _tiny_scanned import LAYERS
from _tiny_scanned import CarryBlock
from _tiny_scanned import NnxScanned
from _tiny_scanned import RematTransformer
from _tiny_scanned import ScannedTransformer
from _tiny_scanned import _stack
from _tiny_scanned import _unroll_name
from _tiny_scanned import _unstack
from flax import nnx

import rgft_jax


@pytest.mark.slow
@pytest.mark.parametrize(
  "remat,granularity,method",
  [
    (False, "branches", "norm_product"),
    (False, "heads", "taylor"),
    (True, "heads", "norm_product"),
    (True, "branches", "taylor"),
  ],
)
def test_scanned_linen_matches_the_per_example_reference(remat, granularity, method):
  _, params, x, y = _setup()
  model = ScannedTransformer(remat=remat)
  stacked = _stack(params)
  tracker = rgft_jax.ErrorTracker(model, select=granularity, method=method)
  comps = tracker.components(stacked, x)
  loss, grads, error_map = jax.jit(tracker.value_and_grad(_loss_fn(model)))(
    stacked, x, y
  )
  expected = _reference_cheap_map(params, x, y, granularity, method)
  # Layer by layer, in call order, named like the unrolled list.
  unrolled = rgft_jax.ErrorTracker(_setup()[0], select=granularity)
  assert [_unroll_name(n) for n in comps.names] == list(
    unrolled.components(params, x).names
  )
  assert sorted(_unroll_name(n) for n in comps.names) == sorted(expected)
  assert set(error_map) == set(comps.names)
  for name, value in error_map.items():
    np.testing.assert_allclose(
      value, expected[_unroll_name(name)], rtol=1e-4, atol=1e-7, err_msg=name
    )
  full = lambda p: _reference_forward(p, x, y, lambda n, v: v, "branches").mean()  # noqa: E731
  ref_loss, ref_grads = jax.value_and_grad(full)(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    _unstack(grads),
    ref_grads,
  )


def _owned_masks(comps, params):
  """For each component name, a 0/1 tree marking the parameter entries it owns."""
  ones = jax.tree.map(jnp.ones_like, params)
  out = {}
  for i, name in enumerate(comps.names):
    alpha = jnp.zeros(len(comps)).at[i].set(1.0)
    scaled = comps.scale(ones, alpha)  # Unowned entries stay 1: subtract them.
    base = comps.scale(ones, jnp.zeros(len(comps)))
    out[name] = jax.tree.map(jnp.subtract, scaled, base)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["branches", "heads"])
def test_scanned_components_own_each_layers_slice(granularity):
  model_u, params, x, _ = _setup()
  unrolled = rgft_jax.ErrorTracker(model_u, select=granularity).components(params, x)
  stacked = _stack(params)
  comps = rgft_jax.ErrorTracker(ScannedTransformer(), select=granularity).components(
    stacked, x
  )
  assert [_unroll_name(n) for n in comps.names] == list(unrolled.names)
  mine, theirs = _owned_masks(comps, stacked), _owned_masks(unrolled, params)
  for name in comps.names:
    jax.tree.map(
      np.testing.assert_array_equal, _unstack(mine[name]), theirs[_unroll_name(name)]
    )


@pytest.mark.slow
def test_per_layer_remat_matches_the_per_example_reference():
  _, params, x, y = _setup()
  model = RematTransformer()
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(params, x)
  _, _, error_map = jax.jit(tracker.value_and_grad(_loss_fn(model)))(params, x, y)
  expected = _reference_cheap_map(params, x, y, "branches", "norm_product")
  assert sorted(comps.names) == sorted(expected)
  for name, value in error_map.items():
    np.testing.assert_allclose(value, expected[name], rtol=1e-4, err_msg=name)


@pytest.mark.slow
def test_scanned_ablation_matches_masked_forwards():
  _, params, x, y = _setup()
  model = ScannedTransformer()
  tracker = rgft_jax.ErrorTracker(model, select="heads", method="ablation")
  _, _, error_map = jax.jit(tracker.value_and_grad(_loss_fn(model)))(
    _stack(params), x, y
  )
  full = _reference_forward(params, x, y, lambda n, v: v, "heads").mean()
  assert len(error_map) == LAYERS * HEADS
  for name, value in error_map.items():
    module, head = _unroll_name(name).rsplit("/head", 1)

    def zero(n, v, module=module, head=int(head)):
      return v.at[:, :, head].set(0.0) if n == module else v

    ablated = _reference_forward(params, x, y, zero, "heads").mean()
    np.testing.assert_allclose(value, full - ablated, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
  "detach",
  [
    ["encoderblock/0/MlpBlock_3"],  # One layer: a mask inside the scan.
    ["encoderblock/0/MlpBlock_3", "encoderblock/1/MlpBlock_3"],  # Every layer.
  ],
)
def test_scanned_detach_gives_the_detached_models_gradients(detach):
  _, params, x, y = _setup()
  model = ScannedTransformer()
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  tracker.components(_stack(params), x)
  _, grads, error_map = jax.jit(tracker.value_and_grad(_loss_fn(model), detach=detach))(
    _stack(params), x, y
  )
  cut = {_unroll_name(n) for n in detach}

  def detached(p):
    edit = lambda n, v: jax.lax.stop_gradient(v) if n in cut else v  # noqa: E731
    return _reference_forward(p, x, y, edit, "branches").mean()

  ref_grads = jax.grad(detached)(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    _unstack(grads),
    ref_grads,
  )
  for name in cut:
    assert not np.any(
      np.asarray(ref_grads[name.split("/")[0]]["MlpBlock_3"]["Dense_0"]["kernel"])
    )
  # The detached components are still measured, as the undetached model would be
  # when nothing above them is detached (here: the last layer, or the lower one
  # with only itself detached).
  expected = _reference_cheap_map(params, x, y, "branches", "norm_product")
  last = "encoderblock/1/MlpBlock_3"
  np.testing.assert_allclose(error_map[last], expected[_unroll_name(last)], rtol=1e-4)


@pytest.mark.slow
def test_rgft_steps_on_the_scanned_model_equal_the_unrolled_ones():
  model_u, params, x, y = _setup()
  model_s = ScannedTransformer()
  results = []
  for model, p in ((model_u, params), (model_s, _stack(params))):
    tracker = rgft_jax.ErrorTracker(model, select="branches")
    tx = rgft_jax.rgft(1e-2, tracker.components(p, x), warmup_steps=2)
    state = tx.init(p)

    @jax.jit
    def step(p, state, tracker=tracker, tx=tx, model=model):
      _, grads, error_map = tracker.value_and_grad(_loss_fn(model))(p, x, y)
      updates, state = tx.update(grads, state, p, error_map=error_map)
      return optax.apply_updates(p, updates), state

    for _ in range(3):
      p, state = step(p, state)
    results.append((p, rgft_jax.residual_error_state(state).alpha))
  (p_u, alpha_u), (p_s, alpha_s) = results
  np.testing.assert_allclose(alpha_s, alpha_u, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    _unstack(p_s),
    p_u,
  )


# NNX: nnx.scan over a stacked block, against the unrolled list of blocks.


@pytest.mark.slow
@pytest.mark.parametrize("remat,granularity", [(False, "branches"), (True, "heads")])
def test_nnx_scan_matches_the_per_example_reference(remat, granularity):
  _, params, x, y = _setup()
  model = NnxScanned(nnx.Rngs(0), remat=remat)
  nnx.update(model, nnx.State(_stack(params)))
  tracker = rgft_jax.ErrorTracker(model, select=granularity)
  comps = tracker.components(model, x)
  expected = _reference_cheap_map(params, x, y, granularity, "norm_product")
  assert sorted(_unroll_name(n) for n in comps.names) == sorted(expected)
  assert comps.names[0].startswith("encoderblock/0/")

  @nnx.jit
  def step(model):
    return tracker.value_and_grad(_tiny_nnx._loss_fn)(model, x, y)

  loss, grads, error_map = step(model)
  for name, value in error_map.items():
    np.testing.assert_allclose(
      value, expected[_unroll_name(name)], rtol=1e-4, atol=1e-7, err_msg=name
    )
  full = lambda p: _reference_forward(p, x, y, lambda n, v: v, "branches").mean()  # noqa: E731
  ref_loss, ref_grads = jax.value_and_grad(full)(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    _unstack(nnx.to_pure_dict(grads)),
    ref_grads,
  )


@pytest.mark.slow
def test_unsupported_lifts_are_refused_when_components_are_made():
  class VmapNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      ensemble = nn.vmap(
        CarryBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, None),
        out_axes=0,
        axis_size=2,
      )
      x, _ = ensemble()(jnp.stack([x, x]), None)
      return x

  class NestedScan(nn.Module):
    @nn.compact
    def __call__(self, x):
      inner = nn.scan(
        CarryBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
      )

      class Outer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
          return inner()(x, None)[0], None

      outer = nn.scan(
        Outer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
      )
      return outer()(x, None)[0]

  x = jnp.ones((2, 3, WIDTH))
  for model, what in ((VmapNet(), r"\['Vmap'\]"), (NestedScan(), "nested scans")):
    params = model.init(jax.random.key(0), x)["params"]
    tracker = rgft_jax.ErrorTracker(model, select="branches")
    with pytest.raises(ValueError, match=what):
      tracker.components(params, x)
