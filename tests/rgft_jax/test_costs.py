"""FLOPs with scans counted in full, against the same model unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_linen import _loss_fn
from _tiny_linen import _setup
from _tiny_scanned import ScannedTransformer
from _tiny_scanned import _stack
from _tiny_scanned import _unroll_name

import rgft_jax


def test_a_scan_counts_every_iteration_like_the_loop():
  w = jax.random.normal(jax.random.key(0), (5, 16, 16))
  x = jax.random.normal(jax.random.key(1), (3, 16))

  def scanned(w, x):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

  def looped(w, x):
    for i in range(w.shape[0]):
      x = jnp.tanh(x @ w[i])
    return x.sum()

  want = float(jax.jit(looped).lower(w, x).cost_analysis()["flops"])
  assert rgft_jax.flops_of(scanned, w, x) == pytest.approx(want, rel=0.02)
  # The gradient: three [3, 16] x [16, 16] matmuls a layer (forward, dx, dw),
  # by hand; XLA alone counts about one layer's.
  matmuls = 5 * 3 * 2 * 3 * 16 * 16
  grad = jax.grad(scanned)
  assert matmuls <= rgft_jax.flops_of(grad, w, x) <= 1.1 * matmuls
  assert float(jax.jit(grad).lower(w, x).cost_analysis()["flops"]) < 0.4 * matmuls


@pytest.mark.slow
def test_scanned_detach_costs_equal_the_unrolled_models():
  model, params, x, y = _setup()
  costs = {}
  for name, m, p in (
    ("loop", model, params),
    ("scan", ScannedTransformer(), _stack(params)),
  ):
    tracker = rgft_jax.ErrorTracker(m, select="branches")
    comps = tracker.components(p, x)
    tx = rgft_jax.rgft(1e-2, comps)
    step = rgft_jax.detachable_step(tracker, tx, _loss_fn(m), comps)
    costs[name] = rgft_jax.detach_costs(step, comps.names, p, tx.init(p), x, y)
  loop, scan = costs["loop"], costs["scan"]
  assert scan.full == pytest.approx(loop.full, rel=0.02)
  by_name = dict(zip(loop.names, loop.saving, strict=True))
  want = np.array([by_name[_unroll_name(n)] for n in scan.names])
  np.testing.assert_allclose(scan.saving, want, rtol=0.03)
  assert scan.floor == pytest.approx(loop.floor, rel=0.03)
