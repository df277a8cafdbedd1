"""A small parameter tree with hand-written owners, changing error maps, and a
run of an RGFT transformation compared step by step with `ReferenceRGFT`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _reference import ReferenceRGFT

import rgft_jax

NAMES = ("block0", "head0", "head1", "block1")
# Owner of each parameter, written by hand: the reference's view of the rules.
OWNERS = {"b0": 0, "emb": -1, "q": (1, [1, 2]), "w0": 0, "w1": 3}
RULES = [("q", "head{head}", 1), (r"[wb](\d)", r"block\1"), ("emb", None)]
SHAPES = {"b0": (4,), "emb": (5,), "q": (4, 2, 3), "w0": (3, 4), "w1": (4, 4)}


def make_params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}


def make_components(params):
  comps = rgft_jax.Components.from_regex(params, RULES)
  assert comps.names == NAMES
  return comps


def error_maps(steps, seed=1):
  """Changing maps with a zero start, NaN/inf entries and a late component."""
  rng = np.random.default_rng(seed)
  maps = rng.uniform(0.0, 1.0, size=(max(steps, 20), 4)) * np.array(
    [1.0, 3.0, 0.5, 2.0]
  )
  maps[0] = 0.0
  maps[3, 1] = np.nan
  maps[7, 2] = np.inf
  maps[12] = np.nan
  maps[:5, 3] = np.nan  # block1 unobserved for 5 steps: multiplier 1.
  maps[9, 0] = 1e6  # An outlier: clipped (only jitted steps read rows past 2).
  maps[15, 2] = -0.5  # Negative: clipped to 0 under jit.
  return maps[:steps]


def grads_at(step, params):
  rng = np.random.default_rng(100 + step)
  return {k: jnp.asarray(rng.normal(size=v.shape), v.dtype) for k, v in params.items()}


def as_dict(row):
  return {n: jnp.float32(v) for n, v in zip(NAMES, row, strict=True)}


def run_and_compare(tx, steps, hyper, wrap_update=None, clip=None):
  params = make_params()
  ref = ReferenceRGFT(params, OWNERS, n=4)
  state = tx.init(params)
  maps = error_maps(steps)

  @jax.jit
  def step(params, state, grads, error_map):
    updates, state = tx.update(grads, state, params, error_map=error_map)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    grads = grads_at(t, params)
    params, state = step(params, state, grads, as_dict(maps[t]))
    ref_grads = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    if clip is not None:
      norm = np.sqrt(sum((g**2).sum() for g in ref_grads.values()))
      ref_grads = {k: g * min(1.0, clip / norm) for k, g in ref_grads.items()}
    alpha = ref.step(ref_grads, maps[t], **hyper(t))
    np.testing.assert_allclose(optax.tree.get(state, "alpha"), alpha, rtol=1e-5)
    np.testing.assert_allclose(
      optax.tree.get(state, "ema"), ref.ema, rtol=1e-5, atol=1e-7
    )
    for key, counts in ref.counts.items():
      np.testing.assert_array_equal(
        getattr(rgft_jax.residual_error_state(state), key), counts, err_msg=key
      )
    for k in SHAPES:
      np.testing.assert_allclose(params[k], ref.params[k], rtol=1e-4, atol=1e-5)
  return state
