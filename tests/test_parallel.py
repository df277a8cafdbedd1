"""Data-parallel RGFT on 8 CPU devices equals the single-device run."""

import functools
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_tracker import _data
from test_tracker import _loss_fn
from test_tracker import _setup

import rgft_jax

pytestmark = pytest.mark.slow  # Several devices or processes.

STEPS, BATCH = 20, 16


def _train(step, params, state, put=lambda a: a):
  for t in range(STEPS):
    x, y = _data(BATCH, seed=t)
    params, state = step(params, state, put(x), put(y))
  return params, state


def _make(select="heads"):
  model, params, _, _ = _setup()
  tracker = rgft_jax.ErrorTracker(model, select=select)
  comps = tracker.components(params, _data(2)[0])
  tx = rgft_jax.rgft(1e-2, comps, warmup_steps=10)
  return model, params, tracker, tx


def _rgft_step(model, tracker, tx, axis_name=None):
  def step(params, state, x, y):
    _, grads, error_map = tracker.value_and_grad(_loss_fn(model), axis_name=axis_name)(
      params, x, y
    )
    updates, state = tx.update(grads, state, params, error_map=error_map)
    return optax.apply_updates(params, updates), state

  return step


@functools.cache
def _single_device():
  model, params, tracker, tx = _make()
  return _train(jax.jit(_rgft_step(model, tracker, tx)), params, tx.init(params))


def _assert_same(result):
  ref_params, ref_state = _single_device()
  params, state = result
  for key in ("error_map", "alpha"):
    np.testing.assert_allclose(
      optax.tree.get(state, key), optax.tree.get(ref_state, key), rtol=1e-4, atol=1e-6
    )
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, a), b in zip(flat, jax.tree.leaves(ref_params), strict=True):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if name.endswith("key/bias"):
      # Softmax ignores a bias shared by every key: its gradient is rounding
      # noise, which Adam turns into full-size steps of either sign.
      continue
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=name)


def test_jit_with_a_sharded_batch():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  model, params, tracker, tx = _make()
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  state = jax.device_put(tx.init(params), replicated)
  result = _train(
    jax.jit(_rgft_step(model, tracker, tx)),
    params,
    state,
    put=lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))),
  )
  assert result[0]["head"]["kernel"].sharding.is_fully_replicated
  _assert_same(result)


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_with_axis_name(check_vma):
  mesh = jax.make_mesh((8,), ("data",))
  model, params, tracker, tx = _make()
  step = jax.jit(
    jax.shard_map(
      _rgft_step(model, tracker, tx, axis_name="data"),
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P()),
      check_vma=check_vma,
    )
  )
  replicated = NamedSharding(mesh, P())
  result = _train(
    step,
    jax.device_put(params, replicated),
    jax.device_put(tx.init(params), replicated),
    put=lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))),
  )
  _assert_same(result)


def test_two_processes_equal_one():
  """`jax.distributed` on localhost, 2 processes x 4 CPU devices, gloo collectives."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  worker = pathlib.Path(__file__).parent / "_multihost_worker.py"
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "result.npz"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
      subprocess.Popen(
        [sys.executable, str(worker), str(i), str(port), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    result = dict(np.load(out))
  ref_params, ref_state = _single_device()
  np.testing.assert_allclose(
    result.pop("error_map"), optax.tree.get(ref_state, "error_map"), rtol=1e-4
  )
  np.testing.assert_allclose(
    result.pop("alpha"), optax.tree.get(ref_state, "alpha"), rtol=1e-4
  )
  flat = jax.tree_util.tree_flatten_with_path(ref_params)[0]
  assert len(flat) == len(result)
  for path, ref in flat:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if not name.endswith("key/bias"):  # Rounding noise, see _assert_same.
      np.testing.assert_allclose(result[name], ref, rtol=1e-4, atol=2e-5, err_msg=name)
