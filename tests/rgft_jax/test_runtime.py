"""Detaching decided at run time, against hand-written stop_gradient models.

The runtime mode takes the detached set as a boolean array: its gradients,
error maps and updates must equal those of the same model with
`stop_gradient` written by hand on the detached outputs (the per-example
reference of `test_tracker`), and those of the static mode, for random sets,
in loops and scans (Linen and NNX, with and without remat), branches and
heads; and one compiled program must serve every set.
"""

import _tiny_nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_linen import _loss_fn
from _tiny_linen import _reference_forward
from _tiny_linen import _setup
from _tiny_scanned import NnxScanned
from _tiny_scanned import ScannedTransformer
from _tiny_scanned import _stack
from _tiny_scanned import _unroll_name
from _tiny_scanned import _unstack
from flax import nnx

import rgft_jax
from rgft_jax._gate import gated

LAYOUTS = ("loop", "scan", "scan_remat", "nnx_scan", "nnx_scan_remat")


def _model(layout):
  """(model, params or NNX model) of the tiny transformer in `layout`."""
  unrolled, params, _, _ = _setup()
  if layout == "loop":
    return unrolled, params
  if layout.startswith("scan"):
    return ScannedTransformer(remat=layout == "scan_remat"), _stack(params)
  if layout == "nnx_loop":
    model = _tiny_nnx._nnx_setup()[0]
    return model, model
  model = NnxScanned(nnx.Rngs(0), remat=layout == "nnx_scan_remat")
  nnx.update(model, nnx.State(_stack(params)))
  return model, model


def _grads_fn(layout, model, tracker):
  """jit `(params_or_model, x, y, detach) -> (loss, grads, error_map)`."""
  if layout.startswith("nnx"):

    @nnx.jit
    def run(m, x, y, detach):
      loss, grads, error_map = tracker.value_and_grad(
        _tiny_nnx._loss_fn, detach=detach
      )(m, x, y)
      return loss, nnx.to_pure_dict(grads), error_map

    return run
  return jax.jit(
    lambda p, x, y, detach: tracker.value_and_grad(_loss_fn(model), detach=detach)(
      p, x, y
    )
  )


def _as_unrolled(layout, grads):
  return grads if layout == "loop" else _unstack(grads)


def _reference_grads(params, x, y, granularity, cut):
  """Gradients of the unrolled model with `stop_gradient` on the cut outputs."""

  def edit(name, v):
    if granularity == "branches":
      return jax.lax.stop_gradient(v) if name in cut else v
    heads = np.array([f"{name}/head{h}" in cut for h in range(v.shape[-2])])
    return jnp.where(heads[:, None], jax.lax.stop_gradient(v), v)

  return jax.grad(lambda p: _reference_forward(p, x, y, edit, granularity).mean())(
    params
  )


def _close(a, b):
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), a, b
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "layout,granularity",
  [
    ("loop", "branches"),
    ("loop", "heads"),
    ("scan", "branches"),
    ("scan_remat", "branches"),
    ("scan_remat", "heads"),
    ("nnx_scan", "branches"),
    ("nnx_scan_remat", "heads"),
  ],
)
def test_runtime_gradients_equal_a_hand_written_stop_gradient(layout, granularity):
  _, params, x, y = _setup()
  model, bound = _model(layout)
  tracker = rgft_jax.ErrorTracker(model, select=granularity)
  names = tracker.components(bound, x).names
  run = _grads_fn(layout, model, tracker)
  rng = np.random.default_rng(0)
  sets = [rng.random(len(names)) < 0.5 for _ in range(3)]
  for flags in [np.ones(len(names), bool), *sets]:
    cut = {_unroll_name(n) for n, f in zip(names, flags, strict=True) if f}
    _, grads, error_map = run(bound, x, y, jnp.asarray(flags))
    _close(
      _as_unrolled(layout, grads), _reference_grads(params, x, y, granularity, cut)
    )
  # The same map and gradients as the static mode (stop_gradient chosen in Python).
  static = [n for n, f in zip(names, sets[0], strict=True) if f]
  if layout.startswith("nnx"):
    static_fn = nnx.jit(
      lambda m: tracker.value_and_grad(_tiny_nnx._loss_fn, detach=static)(m, x, y)
    )
    _, s_grads, s_map = static_fn(bound)
    s_grads = nnx.to_pure_dict(s_grads)
  else:
    s_fn = jax.jit(tracker.value_and_grad(_loss_fn(model), detach=static))
    _, s_grads, s_map = s_fn(bound, x, y)
  _, grads, error_map = run(bound, x, y, jnp.asarray(sets[0]))
  _close(grads, s_grads)
  _close(error_map, s_map)


def test_runtime_detach_is_checked():
  model, params, x, y = _setup()
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  n = len(tracker.components(params, x).names)
  for bad in (np.zeros(n + 1, bool), np.zeros(n, np.float32)):
    with pytest.raises(ValueError, match=f"boolean of shape \\({n},\\)"):
      tracker.value_and_grad(_loss_fn(model), detach=bad)(params, x, y)
  with pytest.raises(TypeError, match="detach must"):
    tracker.value_and_grad(_loss_fn(model), detach=None)(params, x, y)


def _train_steps(layout, sets, mode):
  """Params, optimizer states and error maps after one step per detached set."""
  _, _, x, y = _setup()
  model, bound = _model(layout)
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(bound, x)
  # eps well above float32 noise: a key bias's gradient is zero in exact
  # arithmetic (softmax ignores a shift of every logit), and Adam would turn
  # the rounding left in it, which differs between two compiled programs,
  # into a full-size step.
  tx = rgft_jax.rgft(1e-2, comps, warmup_steps=2, thresh_final=0.9, eps=1e-2)
  if layout.startswith("nnx"):
    optimizer = nnx.Optimizer(bound, tx, wrt=nnx.Param)
    step = rgft_jax.detachable_step(tracker, None, _tiny_nnx._loss_fn, comps)
    jitted = nnx.jit(step, static_argnames=() if mode == "runtime" else "detached")
    history = []
    for flags in sets:
      detached = (
        jnp.asarray(flags)
        if mode == "runtime"
        else frozenset(n for n, f in zip(comps.names, flags, strict=True) if f)
      )
      jitted(bound, optimizer, x, y, detached=detached)
      state = nnx.to_pure_dict(nnx.state(optimizer.opt_state))
      history.append((nnx.to_pure_dict(nnx.state(bound, nnx.Param)), state))
    return comps, history
  step = rgft_jax.detachable_step(tracker, tx, _loss_fn(model), comps)
  p, opt_state = bound, tx.init(bound)
  history = []
  for flags in sets:
    if mode == "runtime":
      _, p, opt_state = jax.jit(step)(p, opt_state, x, y, detached=jnp.asarray(flags))
    else:
      detached = frozenset(n for n, f in zip(comps.names, flags, strict=True) if f)
      _, p, opt_state = jax.jit(step, static_argnames="detached")(
        p, opt_state, x, y, detached=detached
      )
    history.append((p, opt_state))
  return comps, history


@pytest.mark.slow
# Looped, each leaf has one owner: held leaves skip the optimizer (a cond);
# scanned, a leaf holds every layer's entries: held entries are selected.
@pytest.mark.parametrize("layout", ["loop", "nnx_loop", "scan", "nnx_scan_remat"])
def test_runtime_updates_equal_the_static_ones_and_hold_moments(layout):
  n = 2 * 2  # Two blocks of two branches.
  rng = np.random.default_rng(1)
  sets = [rng.random(n) < 0.5 for _ in range(3)]
  sets[2] = sets[1]  # Detached for two steps running.
  comps, runtime = _train_steps(layout, sets, "runtime")
  _, static = _train_steps(layout, sets, "compiled")
  for (p_r, s_r), (p_s, s_s) in zip(runtime, static, strict=True):
    _close(p_r, p_s)
    _close(s_r, s_s)
  # Held moments are bit-identical while their component is detached.
  held = [i for i in range(n) if sets[1][i] and sets[2][i]]
  assert held
  before, after = runtime[0][1], runtime[2][1]
  after = dict(jax.tree_util.tree_leaves_with_path(after))
  compared = 0
  for path, a in jax.tree_util.tree_leaves_with_path(before):
    key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    owner = _owner(comps, key)
    if owner is None or np.ndim(a) == 0:
      continue
    held_entries = np.broadcast_to(np.isin(owner, held), np.shape(a))
    np.testing.assert_array_equal(
      np.asarray(a)[held_entries], np.asarray(after[path])[held_entries]
    )
    compared += int(held_entries.sum())
  assert compared > 0


def _owner(comps, key):
  """The component index array of the parameter whose path ends `key`."""
  for path, idx in comps._by_path.items():
    if key.endswith(path):
      return idx
  return None


@pytest.mark.slow
def test_twenty_detached_sets_compile_once():
  _, _, x, y = _setup()
  model, params = _model("scan")
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(params, x)
  assert comps.layer_groups  # Scanned.
  tx = rgft_jax.rgft(1e-2, comps)
  step = rgft_jax.detachable_step(tracker, tx, _loss_fn(model), comps)
  costs = rgft_jax.DetachCosts(comps.names, 10.0, np.full(len(comps.names), 1.0))
  budget = rgft_jax.Budget(costs, 0.8, total_steps=21, every=1, rule="uniform")
  sparse = rgft_jax.SparseTrainStep(step, budget)
  assert sparse.mode == "runtime"  # The default for a scanned model.
  opt_state, seen = tx.init(params), set()
  for t in range(21):
    seen.add(budget.variant(t))
    _, params, opt_state = sparse(t, params, opt_state, x, y)
  assert len(seen) >= 5
  assert sparse.compilations == 1


@pytest.mark.slow
def test_dropbp_draws_every_step_from_one_compilation():
  _, _, x, y = _setup()
  model, params = _model("scan")
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(params, x)
  tx = rgft_jax.rgft(1e-2, comps)
  loss = _loss_fn(model)
  step = rgft_jax.detachable_step(tracker, tx, loss, comps)
  costs = rgft_jax.DetachCosts(comps.names, 10.0, np.full(len(comps.names), 1.0))
  budget = rgft_jax.Budget(costs, 0.7, total_steps=30, every=1, rule="dropbp")
  calls = []

  def sensitivity(params, opt_state, x, y):
    calls.append(budget.steps)
    grads_of = lambda d: tracker.value_and_grad(loss, detach=d)(params, x, y)[1]  # noqa: E731
    return rgft_jax.dropbp_sensitivity(grads_of, comps.names)

  with pytest.raises(ValueError, match="sensitivity="):
    rgft_jax.SparseTrainStep(step, budget)
  sparse = rgft_jax.SparseTrainStep(step, budget, sensitivity=sensitivity)
  opt_state, seen = tx.init(params), set()
  for t in range(30):
    _, params, opt_state = sparse(t, params, opt_state, x, y)
    seen.add(budget.detached)
  assert calls == [budget.allocation_step]
  assert budget.rates is not None and len(seen) >= 5
  assert sparse.compilations == 1
  assert budget.spent <= 0.7 * 30 * 10.0 + 1e-9


def test_a_looped_model_defaults_to_compiled_variants():
  model, params, x, _ = _setup()
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(params, x)
  assert not comps.layer_groups  # Not scanned.
  step = rgft_jax.detachable_step(
    tracker, rgft_jax.rgft(1e-2, comps), _loss_fn(model), comps
  )
  costs = rgft_jax.DetachCosts(comps.names, 10.0, np.full(len(comps.names), 1.0))
  budget = rgft_jax.Budget(costs, 0.8, total_steps=4)
  assert rgft_jax.SparseTrainStep(step, budget).mode == "compiled"
  with pytest.raises(ValueError, match="mode must be"):
    rgft_jax.SparseTrainStep(step, budget, mode="gated")


def test_recompute_gives_the_same_gradients():
  _, _, x, y = _setup()
  model, bound = _model("scan")
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  names = tracker.components(bound, x).names
  flags = jnp.asarray(np.arange(len(names)) % 2 == 0)
  plain, again = (
    jax.jit(tracker.value_and_grad(_loss_fn(model), detach=flags, recompute=recompute))(
      bound, x, y
    )
    for recompute in (False, True)
  )
  _close(plain, again)


def test_gated_call_equals_stop_gradient_on_a_dense():
  dense = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (4, 3))
  params = dense.init(jax.random.key(1), x)["params"]

  def loss(p, x, detached, use_gate):
    h = (
      gated(lambda x: dense.apply({"params": p}, x), detached, x)
      if use_gate
      else dense.apply({"params": p}, x)
    )
    if not use_gate and detached:
      h = jax.lax.stop_gradient(h)
    return jnp.sum(jnp.sin(x + h))

  for detached in (False, True):
    got = jax.grad(loss, argnums=(0, 1))(params, x, jnp.asarray(detached), True)
    want = jax.grad(loss, argnums=(0, 1))(params, x, detached, False)
    _close(got, want)


def test_step_variants_and_sparse_steps_check_their_arguments():
  make = lambda variant: lambda x: x  # noqa: E731
  for bad in (2.5, 0, True):
    with pytest.raises((TypeError, ValueError), match="max_variants"):
      rgft_jax.StepVariants(make, max_variants=bad)
  for bad in (-1, 1.5):
    with pytest.raises((TypeError, ValueError), match="warn_after"):
      rgft_jax.StepVariants(make, warn_after=bad)
  model, params, x, y = _setup()
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(params, x)
  tx = rgft_jax.rgft(1e-2, comps)
  step = rgft_jax.detachable_step(tracker, tx, _loss_fn(model), comps)
  with pytest.raises(TypeError, match="got None"):
    step(params, tx.init(params), x, y, detached=None)
  costs = rgft_jax.DetachCosts(comps.names, 10.0, np.full(len(comps.names), 1.0))
  sparse = rgft_jax.SparseTrainStep(step, rgft_jax.Budget(costs, 0.9, total_steps=1))
  state = tx.init(params)
  _, params, state = sparse(0, params, state, x, y)
  with pytest.raises(ValueError, match="outside the budget's run of 1 steps"):
    sparse(1, params, state, x, y)


def test_an_empty_batch_is_refused_naming_it():
  model, params, x, y = _setup()
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  with pytest.raises(ValueError, match="batch is empty"):
    tracker.components(params, x[:0])
  tracker.components(params, x)
  with pytest.raises(ValueError, match="batch is empty"):
    tracker.value_and_grad(_loss_fn(model))(params, x[:0], y[:0])


@pytest.mark.slow
def test_exact_runtime_measures_only_at_and_above_the_topmost_detached():
  _, _, x, y = _setup()
  model, params = _model("scan")
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(params, x)
  tx = rgft_jax.rgft(1e-2, comps)
  names = comps.names
  step = rgft_jax.detachable_step(tracker, tx, _loss_fn(model), comps, exact=True)
  detached = frozenset({names[1]})
  _, _, s_static = jax.jit(step, static_argnames="detached")(
    params, tx.init(params), x, y, detached=detached
  )
  _, _, s_runtime = jax.jit(step)(
    params, tx.init(params), x, y, detached=jnp.asarray([n in detached for n in names])
  )
  ema_static = rgft_jax.residual_error_state(s_static).ema
  ema_runtime = rgft_jax.residual_error_state(s_runtime).ema
  # Below the detached one: not measured (the EMA keeps its initial value).
  np.testing.assert_allclose(ema_runtime, ema_static, rtol=1e-5)
  assert ema_runtime[0] == 0 and (np.asarray(ema_runtime[1:]) > 0).all()
