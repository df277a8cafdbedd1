"""RGFT steps on the tiny transformer, and the single-device run that
data-parallel runs must equal."""

import functools

import jax
import numpy as np
import optax
from _tiny_linen import _data
from _tiny_linen import _loss_fn
from _tiny_linen import _setup

import rgft_jax

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
  for key in ("ema", "alpha"):
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
