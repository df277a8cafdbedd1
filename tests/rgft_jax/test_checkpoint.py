import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from _transform_problem import as_dict
from _transform_problem import error_maps
from _transform_problem import grads_at
from _transform_problem import make_components
from _transform_problem import make_params

import rgft_jax


def _train(params, state, tx, steps):
  step = jax.jit(lambda p, s, g, m: tx.update(g, s, p, error_map=m))
  for t in steps:
    updates, state = step(
      params, state, grads_at(t, params), as_dict(error_maps(20)[t])
    )
    params = optax.apply_updates(params, updates)
  return params, state


def test_orbax_round_trip_resumes_exactly(tmp_path):
  params = make_params()
  tx = rgft_jax.rgft(1e-2, make_components(params), warmup_steps=5)
  straight = _train(params, tx.init(params), tx, range(12))

  first = _train(params, tx.init(params), tx, range(6))
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(6, args=ocp.args.StandardSave(first))
    mngr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, first)
  with ocp.CheckpointManager(tmp_path) as mngr:
    restored = mngr.restore(6, args=ocp.args.StandardRestore(abstract))
  assert jax.tree.structure(restored) == jax.tree.structure(first)
  np.testing.assert_array_equal(
    optax.tree.get(restored[1], "ema"), optax.tree.get(first[1], "ema")
  )
  resumed = _train(*restored, tx, range(6, 12))
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
    np.testing.assert_array_equal(a, b)
