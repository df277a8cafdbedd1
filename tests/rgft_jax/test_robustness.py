"""Bad numbers and low precision: the error map and the multipliers stay sound."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgft_jax

W, CLASSES = 16, 3


class MlpBlock(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype)  # noqa: E731
    return dense(W)(nn.gelu(dense(2 * W)(x)))


class Net(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(W, dtype=self.dtype, param_dtype=self.dtype)(x)
    for _ in range(2):
      x = x + MlpBlock(self.dtype)(x)
    return nn.Dense(CLASSES, dtype=self.dtype, param_dtype=self.dtype)(x)


def _loss(model):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
    jnp.asarray(rng.integers(0, CLASSES, 8)),
  )


@pytest.mark.slow
def test_bf16_model_attributions_are_float32_and_close():
  x, y = _data()
  f32 = Net(jnp.float32)
  params = f32.init(jax.random.key(0), x)["params"]
  bf16 = Net(jnp.bfloat16)
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  _, grads, error_map = jax.jit(
    rgft_jax.ErrorTracker(bf16).value_and_grad(_loss(bf16))
  )(params16, x.astype(jnp.bfloat16), y)
  _, _, reference = jax.jit(rgft_jax.ErrorTracker(f32).value_and_grad(_loss(f32)))(
    jax.tree.map(lambda p: p.astype(jnp.float32), params16), x, y
  )
  assert all(v.dtype == jnp.float32 for v in error_map.values())
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  for name, value in reference.items():
    np.testing.assert_allclose(error_map[name], value, rtol=5e-2, err_msg=name)


@pytest.mark.slow
def test_a_nan_batch_leaves_the_state_unpoisoned():
  x, y = _data()
  model = Net()
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model)
  comps = tracker.components(params, x)
  tx = optax.apply_if_finite(rgft_jax.rgft(1e-2, comps), max_consecutive_errors=5)

  @jax.jit
  def step(params, state, x, y):
    _, grads, error_map = tracker.value_and_grad(_loss(model))(params, x, y)
    updates, state = tx.update(grads, state, params, error_map=error_map)
    return optax.apply_updates(params, updates), state, error_map

  state = tx.init(params)
  params, state, _ = step(params, state, x, y)
  bad_x = x.at[3, 1].set(jnp.nan)  # One example's activations go NaN.
  with pytest.warns(RuntimeWarning, match="non-finite values for"):
    new_params, new_state, error_map = jax.block_until_ready(
      step(params, state, bad_x, y)
    )
  assert not any(np.isfinite(v) for v in error_map.values())
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)  # apply_if_finite rejected the update.
  for key in ("ema", "alpha"):
    np.testing.assert_array_equal(
      optax.tree.get(new_state.inner_state, key), optax.tree.get(state.inner_state, key)
    )
  assert int(new_state.notfinite_count) == 1
  # Without apply_if_finite, RGFT alone still ignores the non-finite map.
  bare = rgft_jax.rgft(1e-2, comps)
  s = bare.init(params)
  _, s = bare.update(
    jax.tree.map(jnp.zeros_like, params),
    s,
    params,
    error_map={n: 1.0 for n in comps.names},
  )
  _, s2 = bare.update(
    jax.tree.map(jnp.zeros_like, params), s, params, error_map=error_map
  )
  np.testing.assert_array_equal(s2[1].ema, s[1].ema)
  assert np.all(np.isfinite(s2[1].alpha))
