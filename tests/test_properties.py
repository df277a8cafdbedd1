"""Invariants of the RGFT transformation, on inputs drawn by hypothesis."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import rgft_jax

_settings = settings(max_examples=40, deadline=None)
# Zero or normal float32 magnitudes: scaled by up to 1e3 either way, none underflows.
_maps = st.lists(
  st.one_of(st.just(0.0), st.floats(2**-10, 2**10, width=32)), min_size=1, max_size=8
)
_min_scale = st.floats(2**-10, 1.0, width=32)
_thresh = st.floats(2**-4, 1.0, width=32)


def _setup(n, thresh, min_scale, beta=0.9):
  params = {f"c{i}": jnp.ones(2) for i in range(n)}
  comps = rgft_jax.Components.from_regex(params, [(r"(c\d+)", r"\1")])
  tx = rgft_jax.scale_by_residual_error(
    comps, beta=beta, thresh=thresh, min_scale=min_scale
  )
  return params, tx


def _step(params, tx, state, values):
  error_map = {f"c{i}": v for i, v in enumerate(values)}
  return tx.update(params, state, error_map=error_map)


@_settings
@given(_maps, _thresh, _min_scale)
def test_alpha_is_within_min_scale_and_one(values, thresh, min_scale):
  params, tx = _setup(len(values), thresh, min_scale)
  updates, state = _step(params, tx, tx.init(params), values)
  alpha = np.asarray(state.alpha)
  assert np.all(alpha >= np.float32(min_scale)) and np.all(alpha <= 1.0)
  for i in range(len(values)):  # Updates are the parameters (ones) scaled.
    np.testing.assert_array_equal(updates[f"c{i}"], alpha[i] * np.ones(2, np.float32))


@_settings
@given(_maps, _thresh, _min_scale)
def test_the_largest_error_gets_one(values, thresh, min_scale):
  params, tx = _setup(len(values), thresh, min_scale)
  _, state = _step(params, tx, tx.init(params), values)
  assert state.alpha[int(np.argmax(values))] == 1.0


@_settings
@given(_maps, _thresh, _min_scale, st.floats(1e-3, 1e3))
def test_alpha_is_invariant_to_scaling_the_map(values, thresh, min_scale, c):
  params, tx = _setup(len(values), thresh, min_scale)
  _, a = _step(params, tx, tx.init(params), values)
  _, b = _step(params, tx, tx.init(params), [np.float32(c) * v for v in values])
  np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-5)


@_settings
@given(_maps, st.floats(0.0, 0.99), st.integers(1, 6))
def test_ema_of_a_constant_map_is_the_map(values, beta, steps):
  params, tx = _setup(len(values), 0.5, 0.01, beta=beta)
  state = tx.init(params)
  for _ in range(steps):
    _, state = _step(params, tx, state, values)
  np.testing.assert_allclose(state.error_map, np.float32(values), rtol=1e-5, atol=1e-30)


@_settings
@given(_maps, st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=1))
def test_non_finite_entries_leave_the_ema_alone(values, bad):
  params, tx = _setup(len(values), 0.5, 0.01)
  _, first = _step(params, tx, tx.init(params), values)
  poisoned = [bad[i % len(bad)] if i % 2 == 0 else v for i, v in enumerate(values)]
  _, second = _step(params, tx, first, poisoned)
  ema = np.asarray(second.error_map)
  assert np.all(np.isfinite(ema)) and np.all(np.isfinite(second.alpha))
  np.testing.assert_array_equal(ema[::2], np.asarray(first.error_map)[::2])
