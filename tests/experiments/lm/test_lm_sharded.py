"""RGFT on the LM with FSDP-sharded parameters over 8 CPU devices equals 1 device.

conftest.py forces 8 host devices before jax is imported. The sharded run
splits the batch and every parameter (and Adam's moments) over the mesh axis
"data" under `jax.jit`; the reference is the same step, same initial weights
and batches, on one device.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rgft_jax
from experiments.lm import data
from experiments.lm import model as lm
from experiments.lm import sharding

pytestmark = pytest.mark.slow  # Several devices or processes.

STEPS, BATCH, CONTEXT, DEVICES = 10, 16, 16, 8
CFG = lm.Config(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=16)


@functools.cache
def _batches():
  ds = data.train_batches(
    data.load("pydoc").splits["train"], context=CONTEXT, batch_size=BATCH, seed=0
  )
  return tuple(ds[t] for t in range(STEPS))


def _train(scan_layers, mesh=None, put=lambda a: a):
  model = lm.Transformer(
    dataclasses.replace(CFG, scan_layers=scan_layers), rngs=nnx.Rngs(0)
  )
  tracker = rgft_jax.ErrorTracker(model, select=sharding.branch_select)
  comps = tracker.components(model, jnp.zeros((2, CONTEXT), jnp.int32))
  if mesh is not None:
    sharding.shard_model(model, mesh)
  # thresh=1: every multiplier but the largest-error one is below 1.
  tx = rgft_jax.rgft(1e-2, comps, thresh_init=1.0, thresh_final=1.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if mesh is not None:
    sharding.shard_model(optimizer, mesh)
  step = sharding.rgft_train_step(model, optimizer, tracker, comps, mesh)
  losses = [step(model, optimizer, put(tokens)) for tokens in _batches()]
  return model, optimizer, comps, np.array(losses)


@functools.cache
def _single_device(scan_layers):
  model, optimizer, _, losses = _train(scan_layers)
  params = nnx.state(model, nnx.Param)
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves(params))
  return params, optimizer.opt_state, losses


def _leaves(state):
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in flat}


def _assert_fsdp_sharded(mesh, name, x):
  spec = sharding.fsdp_spec(x.shape, DEVICES)
  assert "data" in spec, (name, x.shape)  # Every leaf of this config splits.
  want = jax.sharding.NamedSharding(mesh, spec)
  assert x.sharding.is_equivalent_to(want, x.ndim), (name, x.sharding, spec)
  axis = spec.index("data")
  shard_shape = (*x.shape[:axis], x.shape[axis] // DEVICES, *x.shape[axis + 1 :])
  shards = x.addressable_shards
  assert len(shards) == DEVICES, name
  assert len({s.device for s in shards}) == DEVICES, name
  assert all(s.data.shape == shard_shape for s in shards), (name, shard_shape)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
def test_fsdp_rgft_steps_equal_the_single_device_run(scan_layers):
  assert jax.device_count() == DEVICES
  mesh = sharding.make_mesh(DEVICES)
  batches = sharding.batch_sharding(mesh)

  def put(tokens):
    tokens = jax.device_put(tokens, batches)
    shapes = {s.data.shape for s in tokens.addressable_shards}
    assert shapes == {(BATCH // DEVICES, CONTEXT + 1)}, shapes
    return tokens

  model, optimizer, comps, losses = _train(scan_layers, mesh, put)
  ref_params, ref_opt_state, ref_losses = _single_device(scan_layers)
  if scan_layers:
    assert comps.names == (
      "layers/0/attn",
      "layers/0/mlp",
      "layers/1/attn",
      "layers/1/mlp",
    )

  # Parameters and Adam's moments are really split 8 ways, the same way.
  params = _leaves(nnx.state(model, nnx.Param))
  adam = optimizer.opt_state[0]
  for name, x in params.items():
    _assert_fsdp_sharded(mesh, name, x)
    for moment in (_leaves(adam.mu)[name], _leaves(adam.nu)[name]):
      assert moment.sharding.is_equivalent_to(x.sharding, x.ndim), name

  # Same losses, error map EMA, multipliers and parameters as one device.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  rgft, ref_rgft = (
    rgft_jax.residual_error_state(s) for s in (optimizer.opt_state, ref_opt_state)
  )
  assert int(rgft.count) == int(ref_rgft.count) == STEPS
  for key in ("ema", "alpha"):
    got, want = np.asarray(getattr(rgft, key)), np.asarray(getattr(ref_rgft, key))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=key)
  assert np.ptp(np.asarray(ref_rgft.alpha)) > 0.05  # RGFT did scale updates.
  ref = _leaves(ref_params)
  assert params.keys() == ref.keys()
  for name, x in params.items():
    np.testing.assert_allclose(x, ref[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_fsdp_spec_picks_the_largest_divisible_axis():
  assert sharding.fsdp_spec((256, 32), 8) == jax.sharding.PartitionSpec("data", None)
  assert sharding.fsdp_spec((2, 64, 32), 8) == jax.sharding.PartitionSpec(
    None, "data", None
  )
  assert sharding.fsdp_spec((12, 8), 8) == jax.sharding.PartitionSpec(None, "data")
  assert sharding.fsdp_spec((16, 16), 8, "x") == jax.sharding.PartitionSpec("x", None)
  for shape in ((), (4,), (2, 12), (0, 3)):
    assert sharding.fsdp_spec(shape, 8) == jax.sharding.PartitionSpec(), shape


def test_explicit_mesh_axes_are_refused():
  mesh = jax.make_mesh(
    (DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)
  )
  with pytest.raises(ValueError, match=r"AxisType\.Auto"):
    sharding.batch_sharding(mesh)
