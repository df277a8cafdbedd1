import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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
      optax.tree.get(state, "error_map"), ref.ema, rtol=1e-5, atol=1e-7
    )
    for k in SHAPES:
      np.testing.assert_allclose(params[k], ref.params[k], rtol=1e-4, atol=1e-5)
  return state


def test_rgft_matches_reference_over_30_steps():
  comps = make_components(make_params())
  tx = rgft_jax.rgft(
    1e-2,
    comps,
    beta=0.8,
    thresh_init=0.1,
    thresh_final=0.5,
    warmup_steps=10,
    min_scale=0.05,
    weight_decay=0.1,
  )

  def hyper(t):
    thresh = 0.1 + 0.4 * min(1.0, t / 10)
    return dict(lr=1e-2, beta=0.8, thresh=thresh, min_scale=0.05, wd=0.1)

  state = run_and_compare(tx, 30, hyper)
  count = optax.tree.get(
    state,
    "count",
    filtering=lambda p, v: p[-1].tuple_name == "ScaleByResidualErrorState",
  )
  assert int(count) == 30


def test_lagged_multipliers_match_reference():
  comps = make_components(make_params())
  tx = rgft_jax.rgft(
    1e-2,
    comps,
    beta=0.8,
    thresh_init=0.2,
    thresh_final=0.2,
    min_scale=0.05,
    lagged=True,
  )

  def hyper(t):
    return dict(lr=1e-2, beta=0.8, thresh=0.2, min_scale=0.05, lagged=True)

  run_and_compare(tx, 12, hyper)


def test_first_map_initialises_ema_and_zero_map_gives_one():
  params = make_params()
  tx = rgft_jax.scale_by_residual_error(make_components(params), beta=0.9, thresh=0.5)
  state = tx.init(params)
  zero = {n: 0.0 for n in NAMES}
  _, state = tx.update(params, state, error_map=zero)
  np.testing.assert_array_equal(state.alpha, np.ones(4))
  m = {"block0": 2.0, "head0": 1.0, "head1": 0.1, "block1": 0.0}
  _, state = tx.update(params, state, error_map=m)
  # Second map folds into the zeros the first one set: ema = 0.1 * m.
  np.testing.assert_allclose(state.error_map, [0.2, 0.1, 0.01, 0.0], rtol=1e-6)
  np.testing.assert_allclose(state.alpha, [1.0, 1.0, 0.1, 0.01], rtol=1e-6)


def test_all_nan_maps_leave_state_and_give_one():
  params = make_params()
  tx = rgft_jax.scale_by_residual_error(make_components(params))
  state = tx.init(params)
  nan = {n: jnp.nan for n in NAMES}
  updates, state = tx.update(params, state, error_map=nan)
  np.testing.assert_array_equal(state.alpha, np.ones(4))
  np.testing.assert_array_equal(state.error_map, np.zeros(4))
  assert not np.asarray(state.observed).any()
  for k in SHAPES:
    np.testing.assert_array_equal(updates[k], params[k])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(beta=1.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(min_scale=0.0), "min_scale"),
    (dict(min_scale=1.5), "min_scale"),
    (dict(thresh=0.0), "thresh"),
    (dict(thresh=1.5), "thresh"),
  ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
  comps = make_components(make_params())
  with pytest.raises(ValueError, match=match):
    rgft_jax.scale_by_residual_error(comps, **kwargs)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(thresh_init=0.4, thresh_final=0.2), "must not exceed"),
    (dict(thresh_init=-0.1), "thresh_init"),
    (dict(thresh_final=2.0), "thresh_final"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(min_scale=0.0), "min_scale"),
  ],
)
def test_rgft_invalid_hyperparameters_raise(kwargs, match):
  comps = make_components(make_params())
  with pytest.raises(ValueError, match=match):
    rgft_jax.rgft(1e-3, comps, **kwargs)


def test_error_map_with_wrong_keys_lists_them():
  params = make_params()
  tx = rgft_jax.scale_by_residual_error(make_components(params))
  state = tx.init(params)
  bad = {"block0": 1.0, "head0": 1.0, "head1": 1.0, "blokc1": 1.0}
  with pytest.raises(ValueError, match=r"missing: \['block1'\], unknown: \['blokc1'\]"):
    tx.update(params, state, error_map=bad)
  with pytest.raises(ValueError, match="needs the batch's error map"):
    tx.update(params, state)
  with pytest.raises(ValueError, match="must be a scalar"):
    tx.update(params, state, error_map={n: jnp.ones(2) for n in NAMES})


def test_params_that_do_not_match_components_are_named():
  params = make_params()
  tx = rgft_jax.rgft(1e-3, make_components(params))
  other = dict(params)
  del other["w1"]
  other["w2"] = jnp.ones(3)
  with pytest.raises(ValueError, match=r"lack: \['w1'\].*lack: \['w2'\]"):
    tx.init(other)
