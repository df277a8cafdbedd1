"""Data-parallel RGFT on 8 CPU devices equals the single-device run."""

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
from _parallel_steps import _assert_same
from _parallel_steps import _make
from _parallel_steps import _rgft_step
from _parallel_steps import _single_device
from _parallel_steps import _train
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

pytestmark = pytest.mark.slow  # Several devices or processes.


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
    result.pop("ema"), optax.tree.get(ref_state, "ema"), rtol=1e-4
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
