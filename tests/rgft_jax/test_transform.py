import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import ReferenceRGFT
from _transform_problem import NAMES
from _transform_problem import OWNERS
from _transform_problem import SHAPES
from _transform_problem import as_dict
from _transform_problem import error_maps
from _transform_problem import grads_at
from _transform_problem import make_components
from _transform_problem import make_params
from _transform_problem import run_and_compare

import rgft_jax


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
  found = rgft_jax.residual_error_state(state)
  # The spike at step 9 and the negative at step 15 went through the rules.
  assert found.clipped[0] >= 1 and found.negative[2] == 1
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
  np.testing.assert_allclose(state.ema, [0.2, 0.1, 0.01, 0.0], rtol=1e-6)
  np.testing.assert_allclose(state.alpha, [1.0, 1.0, 0.1, 0.01], rtol=1e-6)


def test_deprecated_error_map_field_reads_the_ema_and_warns():
  params = make_params()
  tx = rgft_jax.scale_by_residual_error(make_components(params), beta=0.9, thresh=0.5)
  m = {"block0": 2.0, "head0": 1.0, "head1": 0.1, "block1": 0.0}
  _, state = tx.update(params, tx.init(params), error_map=m)
  with pytest.warns(DeprecationWarning, match=r"use \.ema"):
    old = state.error_map
  assert old is state.ema
  np.testing.assert_array_equal(old, np.float32([2.0, 1.0, 0.1, 0.0]))  # ema_1 = m.
  # A lookup by the old name finds nothing now (optax.tree.get's default).
  assert optax.tree.get(state, "error_map") is None


def test_all_nan_maps_leave_state_and_give_one():
  params = make_params()
  tx = rgft_jax.scale_by_residual_error(make_components(params))
  state = tx.init(params)
  nan = {n: jnp.nan for n in NAMES}
  updates, state = tx.update(params, state, error_map=nan)
  np.testing.assert_array_equal(state.alpha, np.ones(4))
  np.testing.assert_array_equal(state.ema, np.zeros(4))
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


# Nothing silent: multipliers stay finite, hyperparameters are checked by name.


def _two(n=2):
  params = {k: jnp.ones(2) for k in "abc"[:n]}
  return params, rgft_jax.Components.from_regex(params, [(r"(\w)", r"\1")])


def _formula(values, thresh, min_scale):
  """DESIGN.md's multiplier in float64, every value observed."""
  m = np.asarray(values, np.float64)
  return np.clip(m / (thresh * m.max()), min_scale, 1.0)


@pytest.mark.parametrize(
  "kwargs, thresh",
  [(dict(), 0.1), (dict(thresh_init=1e-38, thresh_final=1e-38), 1e-38)],
)
def test_tiny_errors_and_thresholds_give_finite_multipliers(kwargs, thresh):
  # thresh * max underflows float32: the formula in float64 still holds.
  params, comps = _two(3)
  tx = rgft_jax.rgft(1e-3, comps, **kwargs)
  values = [5e-38, 0.0, 2e-38] if thresh == 0.1 else [1.0, 0.0, 1e-30]
  error_map = dict(zip("abc", values, strict=True))
  updates, state = tx.update(params, tx.init(params), params, error_map=error_map)
  alpha = optax.tree.get(state, "alpha")
  np.testing.assert_allclose(alpha, _formula(values, thresh, 0.01), rtol=1e-6)
  for k, a in zip("abc", np.asarray(alpha), strict=True):
    # Adam's first step is sign(g) (up to eps), times -lr and the multiplier.
    np.testing.assert_allclose(updates[k], -1e-3 * a * np.ones(2), rtol=1e-5)


@pytest.mark.parametrize(
  "value, thresh", [(0.0, 1e-30), (-1.0, 1e-30), (np.nan, 1e-30), (5.0, 1.0)]
)
def test_threshold_schedule_outside_zero_one_is_clipped(value, thresh):
  # At or below 0 (or NaN): the limit thresh -> 0+; above 1: thresh = 1.
  params, comps = _two(3)
  schedule = lambda count: jnp.where(count == 0, 0.5, value)  # noqa: E731
  tx = rgft_jax.scale_by_residual_error(comps, thresh=schedule, min_scale=0.05)
  state = tx.init(params)
  values = [1.0, 0.2, 0.0]
  error_map = dict(zip("abc", values, strict=True))
  _, state = tx.update(params, state, error_map=error_map)
  np.testing.assert_allclose(state.alpha, _formula(values, 0.5, 0.05), rtol=1e-6)
  _, state = tx.update(params, state, error_map=error_map)  # Schedule at `value`.
  np.testing.assert_allclose(state.alpha, _formula(values, thresh, 0.05), rtol=1e-6)


def test_the_largest_error_gets_exactly_one():
  # 414.26166 / (1.0 * 414.26166) was 0.99999994 (a reciprocal, then a product).
  params, comps = _two(3)
  tx = rgft_jax.scale_by_residual_error(comps, thresh=1.0)
  values = [414.26165771484375, 203.27813720703125, 92.9320068359375]
  error_map = dict(zip("abc", values, strict=True))
  _, state = jax.jit(lambda s: tx.update(params, s, error_map=error_map))(
    tx.init(params)
  )
  assert float(state.alpha[0]) == 1.0
  np.testing.assert_allclose(state.alpha, _formula(values, 1.0, 0.01), rtol=1e-6)


def test_huge_error_values_stay_finite():
  params, comps = _two(3)
  tx = rgft_jax.scale_by_residual_error(
    comps, beta=0.5, thresh=0.5, outlier_ratio=np.inf
  )
  values = [1e300, 1.0, 0.0]  # Beyond float32, finite: clipped, still largest.
  _, state = tx.update(
    params, tx.init(params), error_map=dict(zip("abc", values, strict=True))
  )
  np.testing.assert_allclose(state.alpha, _formula(values, 0.5, 0.01), rtol=1e-6)
  # Folding in maxima again: beta * max + (1 - beta) * max rounds past float32.
  big = np.finfo(np.float32).max
  for _ in range(3):
    _, state = tx.update(params, state, error_map={"a": big, "b": big, "c": 0.0})
  assert np.all(np.isfinite(state.ema))
  np.testing.assert_array_equal(state.alpha[:2], [1.0, 1.0])


def test_ema_of_values_above_half_float32s_range_does_not_overflow():
  # Under jit, XLA turned 0.5 * e + 0.5 * m into 0.5 * (e + m): inf, then max.
  params, comps = _two(3)
  tx = rgft_jax.scale_by_residual_error(comps, beta=0.5)
  step = jax.jit(lambda s, m: tx.update(params, s, error_map=m)[1])
  big = [2.0**127, 1.5 * 2.0**127]
  state = step(tx.init(params), {"a": big[0], "b": big[1], "c": 1.0})
  state = step(state, {"a": big[1], "b": big[0], "c": 1.0})
  np.testing.assert_allclose(state.ema, [1.25 * 2.0**127] * 2 + [1.0])


# Numbers entering the EMA: the documented rules, against hand computations.


def _ema_after(first, later, beta, steps):
  """EMA of `first` followed by `steps` maps of `later`, in closed form."""
  return later + (first - later) * beta**steps


def test_a_huge_first_value_is_clipped_and_fades():
  # Was: ema_a = 3e38 * 0.9**t, the others at min_scale for ~800 steps.
  params, comps = _two(3)
  tx = rgft_jax.scale_by_residual_error(comps, beta=0.9, thresh=0.5)
  state = tx.init(params)
  _, state = tx.update(params, state, error_map={"a": 3e38, "b": 0.5, "c": 0.4})
  # No EMA yet: a is clipped to 10 times the largest other entry (0.5).
  np.testing.assert_allclose(state.ema, [5.0, 0.5, 0.4], rtol=1e-6)
  np.testing.assert_allclose(state.alpha, [1.0, 0.2, 0.16], rtol=1e-6)
  np.testing.assert_array_equal(state.clipped, [1, 0, 0])
  normal = {"a": 0.5, "b": 0.5, "c": 0.4}
  for _ in range(30):
    _, state = tx.update(params, state, error_map=normal)
  ema_a = _ema_after(5.0, 0.5, 0.9, 30)  # 0.69
  np.testing.assert_allclose(state.ema, [ema_a, 0.5, 0.4], rtol=1e-5)
  expected = np.clip(np.array([ema_a, 0.5, 0.4]) / (0.5 * ema_a), 0.01, 1.0)
  np.testing.assert_allclose(state.alpha, expected, rtol=1e-5)
  assert np.all(state.alpha[1:] > 0.9)  # Back near 1, not pinned at 0.01.
  np.testing.assert_array_equal(state.clipped, [1, 0, 0])


def test_a_spike_raises_the_largest_ema_by_at_most_beta_plus_one_minus_beta_k():
  params, comps = _two(3)
  tx = rgft_jax.scale_by_residual_error(comps, beta=0.9, thresh=0.5, outlier_ratio=4)
  state = tx.init(params)
  steady = {"a": 1.0, "b": 0.5, "c": 0.2}
  for _ in range(3):
    _, state = tx.update(params, state, error_map=steady)
  _, state = tx.update(params, state, error_map={**steady, "a": 1e6})
  # Clipped to 4 * max(largest EMA 1.0, largest other entry 0.5) = 4.
  np.testing.assert_allclose(state.ema[0], 0.9 * 1.0 + 0.1 * 4.0, rtol=1e-6)
  np.testing.assert_allclose(state.alpha[2], 0.2 / (0.5 * 1.3), rtol=1e-6)
  np.testing.assert_array_equal(state.clipped, [1, 0, 0])
  # Two components rising together are a change of scale: not clipped.
  _, state = tx.update(params, state, error_map={"a": 1e3, "b": 1e3, "c": 0.2})
  np.testing.assert_allclose(state.ema[:2], [1.17 + 100.0, 0.45 + 100.0])
  np.testing.assert_array_equal(state.clipped, [1, 0, 0])


@pytest.mark.parametrize(
  "value", [-5.0, np.float32(-1e-30), np.float64(-3e38), jnp.float32(-2.0)]
)
def test_a_negative_error_value_is_refused_eagerly_naming_it(value):
  params, comps = _two(3)
  tx = rgft_jax.rgft(1e-3, comps)
  state = tx.init(params)
  error_map = {"a": value, "b": 1.0, "c": 0.5}
  with pytest.raises(ValueError, match=r"error_map\['a'\] = -.*>= 0|>= 0.*\['a'\]"):
    tx.update(params, state, params, error_map=error_map)


def test_negative_error_values_under_jit_are_clipped_to_zero_and_counted():
  # Was: ema_a = -4.4 after -5 then 1, and alpha_a = min_scale.
  params, comps = _two(3)
  tx = rgft_jax.scale_by_residual_error(comps, beta=0.9, thresh=0.5)
  step = jax.jit(lambda s, m: tx.update(params, s, error_map=m)[1])
  state = step(tx.init(params), {"a": -5.0, "b": 1.0, "c": 0.5})
  np.testing.assert_allclose(state.ema, [0.0, 1.0, 0.5])
  state = step(state, {"a": 1.0, "b": 1.0, "c": -0.0})
  np.testing.assert_allclose(state.ema, [0.1, 1.0, 0.45], rtol=1e-6)
  np.testing.assert_allclose(state.alpha, [0.2, 1.0, 0.9], rtol=1e-6)
  np.testing.assert_array_equal(state.negative, [1, 0, 0])  # -0.0 is not < 0.


def test_ignored_non_finite_values_are_counted_per_component():
  params, comps = _two(3)
  tx = rgft_jax.scale_by_residual_error(comps)
  state = tx.init(params)
  for m in ([np.nan, 1.0, np.inf], [1.0, 1.0, -np.inf], [np.nan, 2.0, 1.0]):
    _, state = tx.update(params, state, error_map=dict(zip("abc", m, strict=True)))
  np.testing.assert_array_equal(state.nonfinite, [2, 0, 2])
  np.testing.assert_array_equal(state.negative + state.clipped, [0, 0, 0])


@pytest.mark.parametrize("ratio", [1.0, 0.5, -1.0, np.nan, "10"])
def test_outlier_ratio_is_checked(ratio):
  _, comps = _two(3)
  error = TypeError if isinstance(ratio, str) else ValueError
  with pytest.raises(error, match="outlier_ratio must"):
    rgft_jax.scale_by_residual_error(comps, outlier_ratio=ratio)
  with pytest.raises(error, match="outlier_ratio must"):
    rgft_jax.rgft(1e-3, comps, outlier_ratio=ratio)


def test_a_state_from_another_optimizer_is_refused():
  params, comps = _two(3)
  tx = rgft_jax.rgft(1e-3, comps)
  error_map = {"a": 1.0, "b": 0.5, "c": 0.1}
  for other in (optax.adam(1e-3), optax.adamw(1e-3), optax.sgd(1e-3)):
    with pytest.raises(TypeError, match=r"ScaleByResidualErrorState.*tx.init"):
      tx.update(params, other.init(params), params, error_map=error_map)
  bare = rgft_jax.scale_by_residual_error(comps)
  with pytest.raises(TypeError, match=r"ScaleByAdamState.*own init"):
    bare.update(params, optax.scale_by_adam().init(params), error_map=error_map)
  # The state of RGFT over other components.
  small, small_comps = _two(2)
  theirs = rgft_jax.scale_by_residual_error(small_comps).init(small)
  with pytest.raises(ValueError, match=r"shape \(2,\).*3 components \['a', 'b', 'c'\]"):
    bare.update(params, theirs, error_map=error_map)


@pytest.mark.parametrize(
  "schedule, error",
  [
    (lambda c: jnp.nan, ValueError),
    (lambda c: jnp.inf, ValueError),
    (lambda c: -1.0, ValueError),
    (lambda c: jnp.ones(2) * 1e-3, ValueError),
    (lambda c: "0.1", TypeError),
    # Fine at 0, NaN from the end of the threshold's warmup on.
    (lambda c: jnp.where(c < 10, 1e-3, jnp.nan), ValueError),
  ],
)
def test_a_learning_rate_schedule_is_checked_when_made(schedule, error):
  _, comps = _two(3)
  with pytest.raises(error, match=r"learning_rate \(a schedule, at update count"):
    rgft_jax.rgft(schedule, comps, warmup_steps=10)


@pytest.mark.parametrize(
  "schedule",
  [lambda c: jnp.nan, lambda c: -0.1, lambda c: 1.5, lambda c: jnp.full(3, 0.2)],
)
def test_a_threshold_schedule_is_checked_when_made(schedule):
  _, comps = _two(3)
  with pytest.raises(ValueError, match=r"thresh \(a schedule, at update count 0"):
    rgft_jax.scale_by_residual_error(comps, thresh=schedule)


def test_a_threshold_schedule_that_turns_into_a_vector_is_refused_when_run():
  params, comps = _two(3)
  schedule = lambda c: 0.5 if int(c) == 0 else jnp.full(3, 0.5)  # noqa: E731
  tx = rgft_jax.scale_by_residual_error(comps, thresh=schedule)
  error_map = {"a": 1.0, "b": 0.5, "c": 0.1}
  _, state = tx.update(params, tx.init(params), error_map=error_map)
  with pytest.raises(ValueError, match=r"thresh must be a scalar.*shape \(3,\)"):
    tx.update(params, state, error_map=error_map)


def test_rgft_takes_a_constant_threshold():
  comps = make_components(make_params())
  tx = rgft_jax.rgft(1e-2, comps, thresh_init=0.5, thresh_final=0.5, min_scale=0.05)
  run_and_compare(tx, 12, lambda t: dict(lr=1e-2, beta=0.9, thresh=0.5, min_scale=0.05))


def test_a_threshold_schedule_goes_in_a_chain_like_rgfts():
  comps = make_components(make_params())
  schedule = optax.linear_schedule(0.2, 0.6, transition_steps=8)
  tx = optax.chain(
    optax.scale_by_adam(),
    rgft_jax.scale_by_residual_error(comps, thresh=schedule, min_scale=0.05),
    optax.scale_by_learning_rate(1e-2),
  )

  def hyper(t):
    thresh = 0.2 + 0.4 * min(1.0, t / 8)
    return dict(lr=1e-2, beta=0.9, thresh=thresh, min_scale=0.05)

  run_and_compare(tx, 12, hyper)


def _updates(tx, steps):
  """The updates of `tx` at each of `steps` steps of the transform problem."""
  params, maps, out = make_params(), error_maps(steps), []
  state = tx.init(params)
  for t in range(steps):
    updates, state = tx.update(
      grads_at(t, params), state, params, error_map=as_dict(maps[t])
    )
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


@pytest.mark.parametrize(
  "thresh, linear",
  [
    (0.5, dict(thresh_init=0.5, thresh_final=0.5)),
    (
      optax.linear_schedule(0.2, 0.6, transition_steps=8),
      dict(thresh_init=0.2, thresh_final=0.6, warmup_steps=8),
    ),
  ],
  ids=["constant", "schedule"],
)
def test_deprecated_rgft_thresh_warns_and_gives_the_same_updates(thresh, linear):
  comps = make_components(make_params())
  with pytest.warns(DeprecationWarning, match=r"rgft\(thresh=\.\.\.\) is deprecated"):
    old = rgft_jax.rgft(1e-2, comps, thresh=thresh, min_scale=0.05)
  low, high = linear["thresh_init"], linear["thresh_final"]
  warmup = linear.get("warmup_steps", 1)

  def hyper(t):
    thresh = low + (high - low) * min(1.0, t / warmup)
    return dict(lr=1e-2, beta=0.9, thresh=thresh, min_scale=0.05)

  run_and_compare(old, 12, hyper)  # The float64 reference.
  new = rgft_jax.rgft(1e-2, comps, min_scale=0.05, **linear)
  for a, b in zip(_updates(old, 12), _updates(new, 12), strict=True):
    for k in SHAPES:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-12, err_msg=k)


def test_deprecated_thresh_is_checked_before_it_warns():
  comps = make_components(make_params())
  with pytest.raises(ValueError, match=r"\bthresh\b"):  # No warning (an error here).
    rgft_jax.rgft(1e-3, comps, thresh=np.nan)


@pytest.mark.parametrize("other", ["thresh_init", "thresh_final", "warmup_steps"])
def test_deprecated_thresh_with_its_parts_is_an_error(other):
  comps = make_components(make_params())
  value = 10 if other == "warmup_steps" else 0.2
  with pytest.raises(ValueError, match=f"thresh replaces .*{other}"):
    rgft_jax.rgft(1e-3, comps, thresh=0.5, **{other: value})


@pytest.mark.parametrize(
  "lr, error",
  [
    (None, TypeError),
    ("0.1", TypeError),
    (True, TypeError),
    (-1e-3, ValueError),
    (np.nan, ValueError),
    (np.inf, ValueError),
    (np.ones(2), ValueError),
  ],
)
def test_learning_rate_is_checked(lr, error):
  comps = make_components(make_params())
  with pytest.raises(error, match="learning_rate"):
    rgft_jax.rgft(lr, comps)


def test_learning_rate_schedule_and_arrays_are_accepted():
  params = make_params()
  comps = make_components(params)
  for lr in (
    0,
    1e-3,
    np.float32(1e-3),
    jnp.asarray(1e-3),
    optax.constant_schedule(1e-3),
  ):
    rgft_jax.rgft(lr, comps).init(params)


_NUMERIC = {
  "beta": 0.9,
  "thresh_init": 0.1,
  "thresh_final": 0.3,
  "warmup_steps": 10,
  "min_scale": 0.01,
  "b1": 0.9,
  "b2": 0.999,
  "eps": 1e-8,
  "weight_decay": 0.0,
}


def _build(name, value):
  """`rgft` with `name=value`; a whole threshold goes to the transform that
  takes it, `scale_by_residual_error` (`rgft(thresh=...)` is deprecated)."""
  comps = make_components(make_params())
  if name == "thresh":
    return rgft_jax.scale_by_residual_error(comps, thresh=value)
  return rgft_jax.rgft(1e-3, comps, **{name: value})


@pytest.mark.parametrize("name", [*_NUMERIC, "thresh"])
@pytest.mark.parametrize("bad", ["0.5", True, np.bool_(False), 1j, [0.5]])
def test_non_numbers_are_a_type_error_naming_the_hyperparameter(name, bad):
  error = ValueError if isinstance(bad, list) else TypeError  # A list: an array.
  with pytest.raises(error, match=rf"\b{name}\b"):
    _build(name, bad)


@pytest.mark.parametrize(
  "name", ["beta", "min_scale", "b1", "b2", "eps", "weight_decay"]
)
def test_none_is_a_type_error_naming_the_hyperparameter(name):
  comps = make_components(make_params())
  with pytest.raises(TypeError, match=rf"\b{name}\b"):
    rgft_jax.rgft(1e-3, comps, **{name: None})


@pytest.mark.parametrize("name", [*_NUMERIC, "thresh"])
def test_nan_is_a_value_error_naming_the_hyperparameter(name):
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    _build(name, np.nan)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(warmup_steps=10.5),
    dict(warmup_steps=np.inf),
    dict(eps=np.inf),
    dict(eps=1e300),  # Finite, but inf as a float32.
    dict(weight_decay=1e39),
    dict(learning_rate=1e300),
    dict(b1=1 - 1e-9),  # Below 1, but 1.0 as a float32: Adam divides by 0.
    dict(beta=1 - 1e-9),
    dict(min_scale=1e-46),  # Above 0, but 0.0 as a float32.
  ],
)
def test_integers_and_values_float32_can_hold(kwargs):
  (name,) = kwargs
  comps = make_components(make_params())
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    rgft_jax.rgft(**{"learning_rate": 1e-3, "components": comps, **kwargs})


@pytest.mark.parametrize(
  "kwargs, error",
  [
    (dict(beta="0.9"), TypeError),
    (dict(thresh=None), TypeError),
    (dict(thresh=np.nan), ValueError),
    (dict(min_scale=False), TypeError),
    (dict(lagged=1), TypeError),
  ],
)
def test_scale_by_residual_error_names_bad_hyperparameters(kwargs, error):
  comps = make_components(make_params())
  with pytest.raises(error, match=next(iter(kwargs))):
    rgft_jax.scale_by_residual_error(comps, **kwargs)


def test_traced_hyperparameters_are_not_checked_eagerly():
  params = make_params()
  comps = make_components(params)
  grads = grads_at(0, params)
  error_map = as_dict(error_maps(2)[1])

  @jax.jit
  def step(lr, beta, thresh, warmup):
    tx = rgft_jax.rgft(lr, comps, beta=beta, thresh_init=thresh, warmup_steps=warmup)
    updates, state = tx.update(grads, tx.init(params), params, error_map=error_map)
    return updates, state

  updates, _ = step(jnp.float32(1e-2), jnp.float32(0.8), jnp.float32(0.1), 5)
  ref = ReferenceRGFT(params, OWNERS, n=4)
  ref.step(
    {k: np.asarray(g) for k, g in grads.items()},
    error_maps(2)[1],
    lr=1e-2,
    beta=0.8,
    thresh=0.1,
    min_scale=0.01,
  )
  for k in SHAPES:
    np.testing.assert_allclose(
      params[k] + updates[k], ref.params[k], rtol=1e-4, atol=1e-5
    )
