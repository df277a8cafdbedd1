"""Data-parallel RGFT under `jax.pmap` equals the single-device run."""

import jax
import jax.numpy as jnp
import pytest
from _parallel_steps import _assert_same
from _parallel_steps import _make
from _parallel_steps import _rgft_step
from _parallel_steps import _train

pytestmark = pytest.mark.slow  # Several devices or processes.


@pytest.mark.parametrize("devices", [2, 4])
def test_pmap_with_axis_name(devices):
  model, params, tracker, tx = _make()
  step = jax.pmap(
    _rgft_step(model, tracker, tx, axis_name="data"),
    axis_name="data",
    devices=jax.devices()[:devices],
  )

  def replicate(tree):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (devices, *a.shape)), tree)

  def split(a):  # The batch, cut into one equal slice per device.
    return a.reshape(devices, a.shape[0] // devices, *a.shape[1:])

  params, state = _train(step, replicate(params), replicate(tx.init(params)), split)
  for tree in (params, state):  # Every device holds the same values.
    for leaf in jax.tree.leaves(tree):
      assert (leaf == leaf[:1]).all()
  _assert_same(jax.tree.map(lambda a: a[0], (params, state)))
