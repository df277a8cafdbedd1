"""One of two processes of a data-parallel RGFT run over `jax.distributed` (CPU).

  python tests/rgft_jax/_multihost_worker.py PROCESS_ID PORT OUT.npz

Each process has 4 CPU devices; the mesh spans all 8. Process 0 writes the
final parameters, error map and multipliers to OUT.npz.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _parallel_steps import BATCH  # noqa: E402
from _parallel_steps import STEPS  # noqa: E402
from _parallel_steps import _make  # noqa: E402
from _parallel_steps import _rgft_step  # noqa: E402
from _tiny_linen import _data  # noqa: E402


def global_array(value, sharding):
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


mesh = jax.make_mesh((8,), ("data",))
replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
model, params, tracker, tx = _make()
state = tx.init(params)
params = jax.tree.map(lambda a: global_array(a, replicated), params)
state = jax.tree.map(lambda a: global_array(a, replicated), state)
step = jax.jit(_rgft_step(model, tracker, tx))
for t in range(STEPS):
  x, y = _data(BATCH, seed=t)  # Every process builds the batch; each feeds its shards.
  params, state = step(params, state, global_array(x, batch), global_array(y, batch))


def local(a):
  return np.asarray(a.addressable_data(0))


if process_id == 0:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  arrays = {
    jax.tree_util.keystr(p, simple=True, separator="/"): local(v) for p, v in flat
  }
  arrays["ema"] = local(optax.tree.get(state, "ema"))
  arrays["alpha"] = local(optax.tree.get(state, "alpha"))
  np.savez(out, **arrays)
jax.distributed.shutdown()
