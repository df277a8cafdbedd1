"""The optax contract: rgft() behaves inside the wrappers optax users reach for."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _reference import ReferenceRGFT
from test_transform import OWNERS
from test_transform import SHAPES
from test_transform import as_dict
from test_transform import error_maps
from test_transform import grads_at
from test_transform import make_components
from test_transform import make_params
from test_transform import run_and_compare

import rgft_jax


def _hyper(lr=1e-2, beta=0.9, min_scale=0.05, warmup=5):
  def hyper(t):
    return dict(
      lr=lr, beta=beta, min_scale=min_scale, thresh=0.1 + 0.2 * min(1.0, t / warmup)
    )

  return hyper


def test_inject_hyperparams_changes_take_effect():
  params = make_params()
  comps = make_components(params)
  tx = optax.inject_hyperparams(rgft_jax.rgft)(
    learning_rate=1e-2, components=comps, beta=0.9, min_scale=0.05, warmup_steps=5
  )
  state = tx.init(params)
  ref = ReferenceRGFT(params, OWNERS, n=4)
  maps = error_maps(20)

  @jax.jit
  def step(params, state, grads, error_map):
    updates, state = tx.update(grads, state, params, error_map=error_map)
    return optax.apply_updates(params, updates), state

  for t in range(20):
    if t == 10:  # Change every injected hyperparameter mid-run.
      state.hyperparams["learning_rate"] = jnp.float32(3e-2)
      state.hyperparams["beta"] = jnp.float32(0.5)
      state.hyperparams["min_scale"] = jnp.float32(0.3)
    hyper = _hyper() if t < 10 else _hyper(lr=3e-2, beta=0.5, min_scale=0.3)
    grads = grads_at(t, params)
    params, state = step(params, state, grads, as_dict(maps[t]))
    alpha = ref.step({k: np.asarray(g) for k, g in grads.items()}, maps[t], **hyper(t))
    np.testing.assert_allclose(optax.tree.get(state, "alpha"), alpha, rtol=1e-5)
    for k in SHAPES:
      np.testing.assert_allclose(params[k], ref.params[k], rtol=1e-4, atol=1e-5)
  assert float(np.min(optax.tree.get(state, "alpha"))) >= 0.3 - 1e-7


def test_after_clip_by_global_norm():
  comps = make_components(make_params())
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    rgft_jax.rgft(1e-2, comps, min_scale=0.05, warmup_steps=5),
  )
  run_and_compare(tx, 15, _hyper(), clip=1.0)


def test_multi_steps_uses_mean_gradient_and_last_map():
  params = make_params()
  comps = make_components(params)
  k = 3
  tx = optax.MultiSteps(rgft_jax.rgft(1e-2, comps, min_scale=0.05, warmup_steps=5), k)
  state = tx.init(params)
  ref = ReferenceRGFT(params, OWNERS, n=4)
  maps = error_maps(4 * k)
  step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, error_map=m))
  acc = []
  for t in range(4 * k):
    grads = grads_at(t, params)
    updates, state = step(grads, state, params, as_dict(maps[t]))
    params = optax.apply_updates(params, updates)
    acc.append(grads)
    if len(acc) == k:
      mean = {n: np.mean([np.asarray(g[n]) for g in acc], axis=0) for n in SHAPES}
      alpha = ref.step(mean, maps[t], **_hyper()(t // k))
      acc = []
      np.testing.assert_allclose(optax.tree.get(state, "alpha"), alpha, rtol=1e-5)
    for n in SHAPES:
      np.testing.assert_allclose(params[n], ref.params[n], rtol=1e-4, atol=1e-5)


def test_apply_if_finite_skips_bad_step_without_poisoning_state():
  params = make_params()
  comps = make_components(params)
  tx = optax.apply_if_finite(
    rgft_jax.rgft(1e-2, comps, min_scale=0.05, warmup_steps=5), 3
  )
  state = tx.init(params)
  ref = ReferenceRGFT(params, OWNERS, n=4)
  maps = error_maps(14)
  step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, error_map=m))
  applied = 0
  for t in range(14):
    grads = grads_at(t, params)
    if t == 4:
      grads["w0"] = grads["w0"].at[0, 0].set(jnp.nan)
    updates, state = step(grads, state, params, as_dict(maps[t]))
    params = optax.apply_updates(params, updates)
    if t != 4:
      ref.step(
        {k: np.asarray(g) for k, g in grads.items()}, maps[t], **_hyper()(applied)
      )
      applied += 1
    for n in SHAPES:
      np.testing.assert_allclose(params[n], ref.params[n], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
      optax.tree.get(state, "error_map"), ref.ema, rtol=1e-5, atol=1e-7
    )
  assert int(state.total_notfinite) == 1


def test_dtypes_are_kept():
  params = make_params()
  params["w0"] = params["w0"].astype(jnp.bfloat16)
  params["q"] = params["q"].astype(jnp.bfloat16)
  comps = make_components(params)
  tx = rgft_jax.rgft(1e-2, comps, warmup_steps=5)
  state = tx.init(params)
  m = as_dict(error_maps(2)[1])
  updates, state = jax.jit(lambda g, s: tx.update(g, s, params, error_map=m))(
    params, state
  )
  for k in SHAPES:
    assert updates[k].dtype == params[k].dtype, k
  assert optax.tree.get(state, "alpha").dtype == jnp.float32
  assert optax.tree.get(state, "error_map").dtype == jnp.float32


def test_jit_compiles_once_and_state_shapes_are_stable():
  params = make_params()
  comps = make_components(params)
  tx = rgft_jax.rgft(1e-2, comps, warmup_steps=5)
  traces = []

  @jax.jit
  def step(params, state, grads, error_map):
    traces.append(1)
    updates, state = tx.update(grads, state, params, error_map=error_map)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  spec = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for t, row in enumerate(error_maps(6)):
    params, state = step(params, state, grads_at(t, params), as_dict(row))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == spec
  assert len(traces) == 1


def test_converges_on_quadratic():
  # Components with very different curvature; min_scale > 0 everywhere.
  targets = {"a": jnp.arange(3.0), "b": -jnp.ones(4), "c": jnp.full(2, 5.0)}
  weights = {"a": 1.0, "b": 10.0, "c": 0.1}
  params = jax.tree.map(jnp.zeros_like, targets)
  comps = rgft_jax.Components.from_regex(params, [(r"(\w)", r"\1")])
  tx = rgft_jax.rgft(0.05, comps, min_scale=0.05, warmup_steps=50)

  def losses(p):
    return {k: weights[k] * jnp.sum((p[k] - targets[k]) ** 2) for k in p}

  @jax.jit
  def step(params, state):
    per = losses(params)
    grads = jax.grad(lambda p: sum(losses(p).values()))(params)
    updates, state = tx.update(grads, state, params, error_map=per)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  start = {k: float(v) for k, v in losses(params).items()}
  for _ in range(2000):
    params, state = step(params, state)
  for k, v in losses(params).items():
    assert float(v) < 1e-4 * start[k], (k, float(v))
