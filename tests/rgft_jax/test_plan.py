"""ErrorTracker's plan: what discovery finds, explicit and immutable, so that
what `value_and_grad` returns never depends on what was called before."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny_linen import HEADS
from _tiny_linen import _loss_fn
from _tiny_linen import _setup
from flax import nnx

import rgft_jax

B, D, C = 4, 6, 3


class Branch(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D, name="down")(nn.relu(nn.Dense(D, name="up")(x)))


class Net(nn.Module):
  """A residual branch followed by a parameterless dropout."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    x = x + nn.Dropout(0.5, deterministic=True, name="drop")(Branch(name="branch")(x))
    return nn.Dense(C, name="head")(x)


def _in_branch(path, module):
  """The branch, its two Dense children and the dropout: the branch (a parent
  of tapped children) and the dropout own no parameter."""
  return path[:1] == ("branch",) or isinstance(module, nn.Dropout)


# Written out: the taps that own parameters, in call order.
OWNED = ("branch/up", "branch/down")


def _net():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, size=B))
  params = Net().init(jax.random.key(0), x)["params"]
  params = jax.tree.map(
    lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params
  )
  return params, x, y


def _net_loss(p, x, y):
  logits = Net().apply({"params": p}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _by_hand(p, x, y):
  """`(grads, error map)` of `_net_loss` written out: per example
  `||dL_b/dh_b|| ||h_b||` at the outputs of `up` and `down`, batch mean."""

  def losses(p, d_up, d_down):
    def dense(layer, v):
      return v @ layer["kernel"] + layer["bias"][None]

    e = dense(p["embed"], x)
    up = dense(p["branch"]["up"], e) + d_up
    down = dense(p["branch"]["down"], jax.nn.relu(up)) + d_down
    logits = dense(p["head"], e + down)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return per_example, (up, down)

  zeros = jnp.zeros((B, D))
  grads = jax.grad(lambda p: losses(p, zeros, zeros)[0].mean())(p)
  _, (up, down) = losses(p, zeros, zeros)
  # Each example's loss depends on its own rows only: the gradient of the sum
  # holds every per-example gradient.
  g_up, g_down = jax.grad(lambda a, b: losses(p, a, b)[0].sum(), (0, 1))(zeros, zeros)
  norm = lambda v: jnp.linalg.norm(v, axis=-1)  # noqa: E731
  error_map = {
    "branch/up": (norm(g_up) * norm(up)).mean(),
    "branch/down": (norm(g_down) * norm(down)).mean(),
  }
  return grads, error_map


def _assert_same(a, b, rtol=1e-6):
  (loss_a, grads_a, map_a), (loss_b, grads_b, map_b) = a, b
  assert list(map_a) == list(map_b)
  np.testing.assert_allclose(loss_a, loss_b, rtol=rtol)
  for name in map_a:
    np.testing.assert_allclose(map_a[name], map_b[name], rtol=rtol, err_msg=name)
  for u, v in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-7)


@pytest.mark.slow
def test_the_error_map_holds_the_owned_taps_whatever_ran_before():
  params, x, y = _net()
  fresh = rgft_jax.ErrorTracker(Net(), select=_in_branch)
  first = jax.jit(fresh.value_and_grad(_net_loss))(params, x, y)
  # The components, on a tracker of their own.
  names = rgft_jax.ErrorTracker(Net(), select=_in_branch).components(params, x).names
  assert names == OWNED
  assert sorted(first[2]) == sorted(OWNED)  # jit sorts a dict's keys.
  # components() first changes nothing.
  primed = rgft_jax.ErrorTracker(Net(), select=_in_branch)
  assert primed.components(params, x).names == OWNED
  _assert_same(jax.jit(primed.value_and_grad(_net_loss))(params, x, y), first)
  # Against the loss and the attribution written by hand.
  grads, error_map = _by_hand(params, x, y)
  np.testing.assert_allclose(first[0], _net_loss(params, x, y), rtol=1e-6)
  for name, value in error_map.items():
    np.testing.assert_allclose(first[2][name], value, rtol=1e-5, err_msg=name)
  for u, v in zip(jax.tree.leaves(first[1]), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def test_a_plan_gives_what_each_trace_finds():
  params, x, y = _net()
  tracker = rgft_jax.ErrorTracker(Net(), select=_in_branch)
  plan = tracker.plan(params, x)
  assert plan.names == OWNED and plan.components.names == OWNED
  assert plan.structure is None and plan.heads is None  # A predicate finds none.
  planned = jax.jit(tracker.value_and_grad(_net_loss, plan=plan))(params, x, y)
  _assert_same(planned, jax.jit(tracker.value_and_grad(_net_loss))(params, x, y))


@pytest.mark.parametrize("select", ["branches", "heads"])
@pytest.mark.slow
def test_order_does_not_matter_on_a_transformer(select):
  model, params, x, y = _setup()
  names = rgft_jax.ErrorTracker(model, select=select).components(params, x).names
  blocks = [f"encoderblock_{i}" for i in range(2)]
  if select == "heads":
    attention = "MultiHeadDotProductAttention_1"
    by_hand = tuple(f"{b}/{attention}/head{h}" for b in blocks for h in range(HEADS))
  else:
    by_hand = tuple(
      f"{b}/{m}"
      for b in blocks
      for m in ("MultiHeadDotProductAttention_1", "MlpBlock_3")
    )
  assert names == by_hand
  fresh = rgft_jax.ErrorTracker(model, select=select)
  first = jax.jit(fresh.value_and_grad(_loss_fn(model)))(params, x, y)
  assert sorted(first[2]) == sorted(by_hand)  # jit sorts a dict's keys.
  primed = rgft_jax.ErrorTracker(model, select=select)
  plan = primed.plan(params, x)
  assert plan.names == by_hand
  _assert_same(jax.jit(primed.value_and_grad(_loss_fn(model)))(params, x, y), first)
  _assert_same(
    jax.jit(primed.value_and_grad(_loss_fn(model), plan=plan))(params, x, y), first
  )
  _, ref_grads = jax.value_and_grad(_loss_fn(model))(params, x, y)
  for u, v in zip(jax.tree.leaves(first[1]), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


class NnxBranch(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(D, D, rngs=rngs)
    self.down = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(5, D, rngs=rngs)
    self.branch = NnxBranch(rngs)
    self.drop = nnx.Dropout(0.5, deterministic=True)
    self.head = nnx.Linear(D, C, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    return self.head(x + self.drop(self.branch(x)))


def _nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_order_does_not_matter():
  _, x, y = _net()
  select = lambda path, m: path[:1] == ("branch",) or isinstance(m, nnx.Dropout)  # noqa: E731

  def run(prime):
    model = NnxNet(nnx.Rngs(0))
    tracker = rgft_jax.ErrorTracker(model, select=select)
    if prime:
      assert tracker.components(model, x).names == OWNED
    step = nnx.jit(lambda m, x, y: tracker.value_and_grad(_nnx_loss)(m, x, y))
    return step(model, x, y), nnx.grad(_nnx_loss)(model, x, y)

  (first, ref_grads), (primed, _) = run(False), run(True)
  assert sorted(first[2]) == sorted(OWNED)  # jit sorts a dict's keys.
  _assert_same(primed, first)
  for u, v in zip(jax.tree.leaves(first[1]), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


class ScannedBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = x + nn.Dense(D, name="attn")(nn.LayerNorm(name="ln1")(x))
    return x + nn.Dense(D, name="mlp")(nn.LayerNorm(name="ln2")(x)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(
      ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )
    return layers(name="layers")(x, None)[0]


def test_layer_groups_of_a_scanned_model():
  x = jnp.ones((B, D))
  model = Scanned()
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  plan = tracker.plan(params, x)
  groups = (
    ("layers/0/attn", "layers/1/attn", "layers/2/attn"),
    ("layers/0/mlp", "layers/1/mlp", "layers/2/mlp"),
  )
  assert plan.layer_groups == groups and plan.scanned
  assert tracker.components(params, x).layer_groups == groups
  assert plan.names == tuple(
    f"layers/{i}/{m}" for i in range(3) for m in ("attn", "mlp")
  )
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)  # noqa: E731
  _, _, error_map = tracker.value_and_grad(loss)(params, x)
  assert tuple(error_map) == plan.names
  # A model with no scan has none.
  params, x, _ = _net()
  assert not rgft_jax.ErrorTracker(Net(), select=_in_branch).plan(params, x).scanned


def test_the_tracker_keeps_nothing():
  params, x, y = _net()
  tracker = rgft_jax.ErrorTracker(Net(), select=_in_branch)
  before = dict(vars(tracker))
  tracker.plan(params, x)
  tracker.components(params, x)
  jax.jit(tracker.value_and_grad(_net_loss))(params, x, y)
  after = vars(tracker)
  assert after.keys() == before.keys()
  assert all(after[k] is v for k, v in before.items())
  with pytest.raises(
    ValueError, match=r"tracker.plan\(params, \*inputs\).layer_groups"
  ):
    tracker.layer_groups  # noqa: B018
  with pytest.raises(ValueError, match="keeps no layer groups"):
    tracker.scanned  # noqa: B018


def test_a_plan_is_immutable():
  params, x, _ = _net()
  plan = rgft_jax.ErrorTracker(Net(), select="branches").plan(params, x)
  assert plan.names == ("branch",)  # The dropout carries the branch's output.
  with pytest.raises(dataclasses.FrozenInstanceError):
    plan.components = plan.components  # type: ignore[misc]
  with pytest.raises(dataclasses.FrozenInstanceError):
    plan.structure = None  # type: ignore[misc]
  with pytest.raises(TypeError):
    plan.branches[("x",), 0] = None  # type: ignore[index]
  model, params, x, _ = _setup()
  heads = rgft_jax.ErrorTracker(model, select="heads").plan(params, x)
  with pytest.raises(TypeError):
    heads.heads[("x",)] = None  # type: ignore[index]


def test_an_attention_owning_nothing_is_warned_about(monkeypatch):
  """Every head of an attention found owns its rows of the output projection;
  where the probe finds an attention owning nothing, `plan()` says that
  `value_and_grad` needs the plan to leave its heads out."""
  from rgft_jax import _tracker

  model, params, x, y = _setup()
  lost = [
    f"encoderblock_0/MultiHeadDotProductAttention_1/head{h}" for h in range(HEADS)
  ]
  probe = _tracker.head_owners

  def sharing_block0(*args):  # Every entry of block 0's attention shared.
    return {
      leaf: (
        attention,
        np.full_like(heads, -1) if "encoderblock_0" in attention else heads,
      )
      for leaf, (attention, heads) in probe(*args).items()
    }

  monkeypatch.setattr(_tracker, "head_owners", sharing_block0)
  tracker = rgft_jax.ErrorTracker(model, select="heads")
  with pytest.warns(UserWarning, match=re.escape(f"The heads {lost} own no parameter")):
    plan = tracker.plan(params, x)
  assert plan.names == tuple(n.replace("_0/", "_1/") for n in lost)
  _, _, every = tracker.value_and_grad(_loss_fn(model))(params, x, y)
  assert tuple(every) == (*lost, *plan.names)
  _, _, planned = tracker.value_and_grad(_loss_fn(model), plan=plan)(params, x, y)
  assert tuple(planned) == plan.names


@pytest.mark.slow
@pytest.mark.parametrize("runtime", [False, True])
def test_a_detachable_step_from_a_plan_finds_nothing_again(runtime, monkeypatch):
  """Built from the plan, each compiled step measures what the plan found
  (discovery is not traced again) and gives what a step from the components
  gives; the detached branch's parameters stay as they were."""
  model, params, x, y = _setup()
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  plan = tracker.plan(params, x)
  tx = rgft_jax.rgft(0.1, plan.components)
  state = tx.init(params)
  detached = frozenset({plan.names[0]})
  given = np.array([n in detached for n in plan.names]) if runtime else detached
  from_comps = rgft_jax.detachable_step(tracker, tx, _loss_fn(model), plan.components)
  want = from_comps(params, state, x, y, detached=given)

  def found_again(*args, **kwargs):
    raise AssertionError("discovery ran again")

  monkeypatch.setattr(type(tracker._selector), "find_structure", found_again)
  from_plan = rgft_jax.detachable_step(tracker, tx, _loss_fn(model), plan)
  assert from_plan.components is plan.components
  got = from_plan(params, state, x, y, detached=given)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for u, v in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(want[1:]), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
  # The detached branch's parameters (under its module's path) are held exactly.
  prefix = plan.names[0] + "/"
  old, new = (
    {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in leaves}
    for leaves in (
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree_util.tree_flatten_with_path(got[1])[0],
    )
  )
  under = [p for p in old if p.startswith(prefix)]
  assert under
  for p in under:
    np.testing.assert_array_equal(new[p], old[p], err_msg=p)
  assert any(not np.array_equal(new[p], old[p]) for p in old if p not in under)
  with pytest.raises(AssertionError, match="discovery ran again"):
    from_comps(params, state, x, y, detached=given)  # Without the plan it would.
