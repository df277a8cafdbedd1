"""The optax contract: rgft() behaves inside the wrappers optax users reach for."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import ReferenceRGFT
from _transform_problem import OWNERS
from _transform_problem import RULES
from _transform_problem import SHAPES
from _transform_problem import as_dict
from _transform_problem import error_maps
from _transform_problem import grads_at
from _transform_problem import make_components
from _transform_problem import make_params
from _transform_problem import run_and_compare

import rgft_jax
from rgft_jax._transform import residual_error_state as rgft_jax_state


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
      optax.tree.get(state, "ema"), ref.ema, rtol=1e-5, atol=1e-7
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
  assert optax.tree.get(state, "ema").dtype == jnp.float32


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


_ROW = np.array([0.5, 1.5, 0.1, 0.0])  # One error map without NaN.


def _body_and_head(params):
  body = {k: v for k, v in params.items() if k != "emb"}
  return body, {"emb": params["emb"]}


def test_multi_transform_rgft_on_the_body_adam_on_the_head():
  params = make_params()
  comps = make_components(params)  # emb is in no component.
  labels = {k: "head" if k == "emb" else "body" for k in params}
  tx = optax.multi_transform(
    {"body": rgft_jax.rgft(1e-2, comps, warmup_steps=5), "head": optax.adam(3e-3)},
    labels,
  )
  # By hand: RGFT on the body alone (its own components), Adam on the head.
  body, head = _body_and_head(params)
  body_tx = rgft_jax.rgft(
    1e-2, rgft_jax.Components.from_regex(body, RULES[:2]), warmup_steps=5
  )
  head_tx = optax.adam(3e-3)
  state, body_state, head_state = (
    tx.init(params),
    body_tx.init(body),
    head_tx.init(head),
  )
  step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, error_map=m))
  for t in range(3):
    grads = grads_at(t, params)
    error_map = as_dict(error_maps(3)[t])
    updates, state = step(grads, state, params, error_map)
    body_grads, head_grads = _body_and_head(grads)
    body_updates, body_state = body_tx.update(
      body_grads, body_state, body, error_map=error_map
    )
    head_updates, head_state = head_tx.update(head_grads, head_state, head)
    for k, u in {**body_updates, **head_updates}.items():
      np.testing.assert_allclose(updates[k], u, rtol=1e-6, atol=1e-9, err_msg=k)
    params = optax.apply_updates(params, updates)
    body, head = _body_and_head(params)
  np.testing.assert_array_equal(
    rgft_jax_state(state).alpha, rgft_jax_state(body_state).alpha
  )


def test_multi_transform_names_a_component_left_without_parameters():
  params = make_params()
  labels = {k: "head" if k == "w1" else "body" for k in params}  # All of block1.
  tx = optax.multi_transform(
    {"body": rgft_jax.rgft(1e-2, make_components(params)), "head": optax.adam(3e-3)},
    labels,
  )
  with pytest.raises(ValueError, match=r"'block1' own no entry.*masked out"):
    tx.init(params)


def test_masked_scale_by_residual_error_leaves_masked_updates_alone():
  params = make_params()
  comps = make_components(params)
  mask = {k: k not in ("emb", "b0") for k in params}
  tx = optax.masked(rgft_jax.scale_by_residual_error(comps, thresh=0.5), mask)
  row = _ROW
  updates, _ = tx.update(params, tx.init(params), params, error_map=as_dict(row))
  alpha = np.clip(row / (0.5 * row.max()), 0.01, 1.0)  # The formula, by hand.
  ref = ReferenceRGFT(params, OWNERS, n=4)
  for k in SHAPES:
    scale = 1.0 if not mask[k] else ref.alpha_of_leaf(k, alpha)
    np.testing.assert_allclose(updates[k], scale * params[k], rtol=1e-6, err_msg=k)


# residual_error_state: RGFT's state wherever it sits.


def _stepped(tx, params):
  state = tx.init(params)
  _, state = tx.update(grads_at(0, params), state, params, error_map=as_dict(_ROW))
  return state


def _expected_alpha():
  # First map: the EMA is the map; threshold 0.1.
  return np.clip(_ROW / (0.1 * _ROW.max()), 0.01, 1.0)


def test_residual_error_state_inside_rgft_and_wrappers():
  params = make_params()
  comps = make_components(params)
  inner = rgft_jax.rgft(1e-2, comps, warmup_steps=5)
  labels = {k: "head" if k == "emb" else "body" for k in params}
  cases = {
    "rgft": (inner, lambda s: s[1]),  # (adam, rgft, lr)
    "inject": (
      optax.inject_hyperparams(rgft_jax.rgft)(1e-2, comps, warmup_steps=5),
      lambda s: s.inner_state[2],  # weight_decay is an array: a decay step.
    ),
    "multi_transform": (
      optax.multi_transform({"body": inner, "head": optax.sgd(1e-2)}, labels),
      lambda s: s.inner_states["body"].inner_state[1],
    ),
    "multi_steps": (optax.MultiSteps(inner, 1), lambda s: s.inner_opt_state[1]),
  }
  for name, (tx, by_hand) in cases.items():
    state = _stepped(tx, params)
    found = rgft_jax_state(state)
    assert isinstance(found, rgft_jax.ScaleByResidualErrorState), name
    assert found is by_hand(state), name
    assert int(found.count) == 1, name
    np.testing.assert_allclose(found.alpha, _expected_alpha(), rtol=1e-6)
    # The old field names still work where they are unique.
    np.testing.assert_array_equal(optax.tree.get(state, "alpha"), found.alpha)


def test_residual_error_state_errors():
  params = make_params()
  comps = make_components(params)
  with pytest.raises(ValueError, match="found 0"):
    rgft_jax_state(optax.adam(1e-3).init(params))
  twice = optax.chain(
    rgft_jax.scale_by_residual_error(comps), rgft_jax.scale_by_residual_error(comps)
  )
  with pytest.raises(ValueError, match=r"found 2 at \['\[0\]', '\[1\]'\]"):
    rgft_jax_state(twice.init(params))
