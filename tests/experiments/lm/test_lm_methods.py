"""The language-model study's methods, one step at a time on a tiny decoder."""

import dataclasses

import jax
import numpy as np
import pytest

import rgft_jax
from experiments.lm import methods
from experiments.lm import model as lm
from experiments.lm import study

TINY = lm.Config(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_len=8)


@pytest.fixture(scope="module")
def setup():
  looped = methods.Decoder(dataclasses.replace(TINY, scan_layers=False))
  params = looped.init(0)
  rng = np.random.default_rng(0)
  example = rng.integers(0, 256, (4, TINY.max_len + 1)).astype(np.int32)
  return methods.Setup(
    looped, params, example, study.get_config("quick"), scanned=methods.Decoder(TINY)
  )


def _steps(method, batch, seed: int, steps: int):
  tree, state = method.init(1e-3, seed)
  step = jax.jit(method.make_step(frozenset()))
  for _ in range(steps):
    tree, state, metrics = step(tree, state, batch)
  return tree, state, metrics


@pytest.mark.slow
def test_the_random_error_map_is_a_seeded_uniform_draw_not_the_tracker_s(setup):
  method = methods.build("rgft_random", setup)
  names = method.components.names
  assert names == methods.build("rgft_blocks", setup).components.names
  batch = setup.example
  _, state, _ = _steps(method, batch, seed=4, steps=1)
  ema = np.asarray(rgft_jax.residual_error_state(state).ema)  # The first map.
  drawn = jax.random.uniform(jax.random.fold_in(jax.random.key(4), 0), (len(names),))
  np.testing.assert_array_equal(ema, drawn)
  # Not the tracker's map: the branches' measured errors, normalised, differ.
  _, tracked, _ = _steps(methods.build("rgft_blocks", setup), batch, seed=4, steps=1)
  real = np.asarray(rgft_jax.residual_error_state(tracked).ema)
  assert np.all(real > 0) and not np.allclose(real / real.max(), ema / ema.max())
  # Another seed draws another map; the next step draws afresh.
  _, other, _ = _steps(method, batch, seed=5, steps=1)
  assert not np.array_equal(rgft_jax.residual_error_state(other).ema, ema)
  _, two, _ = _steps(method, batch, seed=4, steps=2)
  second = jax.random.uniform(jax.random.fold_in(jax.random.key(4), 1), (len(names),))
  beta = setup.cfg.beta
  np.testing.assert_allclose(
    rgft_jax.residual_error_state(two).ema,
    beta * drawn + (1 - beta) * second,
    rtol=1e-6,
  )


def test_the_random_map_control_trains_on_plain_gradients(setup):
  """Every branch's multiplier 1 (`min_scale` 1): the step is Adam on
  `jax.grad` of the loss, the decoder unrolled (the looped layout)."""
  cfg = dataclasses.replace(setup.cfg, min_scale=1.0)
  method = methods.build("rgft_random", dataclasses.replace(setup, cfg=cfg))
  batch = setup.example
  tree, _, metrics = _steps(method, batch, seed=0, steps=1)

  def loss(p):
    return lm.loss(setup.decoder(p), batch)[0]

  value, grads = jax.value_and_grad(loss)(setup.params)
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
  # Adam's first step moves every entry by -lr * g / (|g| + eps).
  after = method.to_params(tree)
  for (path, g), p0, p1 in zip(
    jax.tree_util.tree_leaves_with_path(grads),
    jax.tree.leaves(setup.params),
    jax.tree.leaves(after),
    strict=True,
  ):
    want = p0 - 1e-3 * np.asarray(g) / (np.abs(np.asarray(g)) + 1e-8)
    np.testing.assert_allclose(p1, want, rtol=1e-4, atol=1e-7, err_msg=str(path))
