"""Discovery on models that reuse modules, share parameters, return tuples,
flatten the batch, draw random numbers or write their shortcuts inline.

Expected names and owners are written out by hand; gradients are checked
against `jax.grad` of hand-written functional models (with `stop_gradient`
where a component is detached) and error maps against a per-example
reference computed here with `jax.vmap` over single examples.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rgft_jax

W = 8
B, T = 4, 3
NEG = float(jnp.finfo(jnp.float32).min)


@pytest.fixture(autouse=True)
def allow_rank_promotion():
  """The hand-written models broadcast biases and scales as NumPy does."""
  with jax.numpy_rank_promotion("allow"):
    yield


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def _ln(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _owned(comps):
  return {n: sorted(ps) for n, ps in comps.owned_paths().items()}


def _leaves(prefix, names=("bias", "kernel")):
  return [f"{prefix}/{n}" for n in names]


def _allclose(a, b):
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-6), a, b
  )


def _per_example(loss_one, params, batch, deltas):
  """{name: mean_b ||dL_b/dd|| ||h_b||}: `loss_one(params, deltas, *example)`
  returns `(loss, {name: h})` for one example (leading axis 1)."""

  def one(*example):
    example = [e[None] for e in example]
    zeros = jax.tree.map(lambda d: d[None], deltas)
    g, hs = jax.grad(lambda d: loss_one(params, d, *example), has_aux=True)(zeros)
    return {n: jnp.linalg.norm(g[n]) * jnp.linalg.norm(hs[n]) for n in hs}

  return {n: float(v.mean()) for n, v in jax.vmap(one)(*batch).items()}


# 1. One parameterless module reused for several residual adds.


class DropPath(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x


class DpBlock(nn.Module):
  def setup(self):
    self.ln1, self.ln2 = nn.LayerNorm(epsilon=1e-6), nn.LayerNorm(epsilon=1e-6)
    self.attn, self.fc1, self.fc2 = nn.Dense(W), nn.Dense(2 * W), nn.Dense(W)
    self.drop_path = DropPath()  # One instance after both branches.

  def __call__(self, x):
    x = x + self.drop_path(self.attn(self.ln1(x)))
    return x + self.drop_path(self.fc2(nn.gelu(self.fc1(self.ln2(x)))))


class DpNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = DpBlock(name=f"block{i}")(x)
    return x


def _dp_forward(p, x, deltas=None, stop=()):
  """DpNet by hand: `deltas` added to, `stop` detached at, each branch output."""
  hs = {}
  for i in range(2):
    q = p[f"block{i}"]
    for name, f in (
      ("attn", lambda y, q=q: _dense(q["attn"], _ln(q["ln1"], y))),
      (
        "fc2",
        lambda y, q=q: _dense(q["fc2"], nn.gelu(_dense(q["fc1"], _ln(q["ln2"], y)))),
      ),
    ):
      key = f"block{i}/{name}"
      h = f(x)
      hs[key] = h
      if key in stop:
        h = jax.lax.stop_gradient(h)
      x = x + h + (0 if deltas is None else deltas[key])
  return x, hs


def _dp_setup():
  model = DpNet()
  x = jax.random.normal(jax.random.key(1), (B, W))
  y = jax.random.normal(jax.random.key(2), (B, W))
  params = model.init(jax.random.key(0), x)["params"]
  return model, params, x, y


DP_NAMES = ("block0/attn", "block0/fc2", "block1/attn", "block1/fc2")


def test_reused_drop_path_is_one_component_per_call():
  model, params, x, _ = _dp_setup()
  comps = rgft_jax.ErrorTracker(model).components(params, x)
  assert comps.names == DP_NAMES
  owned = _owned(comps)
  for i in range(2):
    b = f"block{i}"
    assert owned[f"{b}/attn"] == sorted(
      _leaves(f"{b}/attn") + _leaves(f"{b}/ln1", ("bias", "scale"))
    )
    assert owned[f"{b}/fc2"] == sorted(
      _leaves(f"{b}/fc1") + _leaves(f"{b}/fc2") + _leaves(f"{b}/ln2", ("bias", "scale"))
    )
  assert comps.unassigned(params) == []


@pytest.mark.parametrize("detach", [(), ("block0/attn",), ("block1/fc2",)])
@pytest.mark.slow
def test_detaching_one_call_of_a_reused_module(detach):
  model, params, x, y = _dp_setup()
  tracker = rgft_jax.ErrorTracker(model)
  tracker.components(params, x)

  def loss(p, x, y):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  _, grads, error_map = jax.jit(tracker.value_and_grad(loss, detach=detach))(
    params, x, y
  )
  want = jax.grad(lambda p: jnp.mean((_dp_forward(p, x, stop=detach)[0] - y) ** 2))(
    params
  )
  _allclose(grads, want)
  for name in detach:  # Its own parameters only: the other call still trains.
    b, m = name.split("/")
    assert not np.any(grads[b][m]["kernel"])
  assert np.all(np.abs(grads["block0"]["attn"]["kernel"]).sum() > 0) or detach
  assert np.abs(grads["block0"]["fc2"]["kernel"]).sum() > 0

  def loss_one(p, d, x, y):
    out, hs = _dp_forward(p, x, d)
    return jnp.mean((out - y) ** 2), hs

  zeros = {n: jnp.zeros((W,)) for n in DP_NAMES}
  want_map = _per_example(loss_one, params, (x, y), zeros)
  if not detach:
    np.testing.assert_allclose(
      [float(error_map[n]) for n in DP_NAMES],
      [want_map[n] for n in DP_NAMES],
      rtol=1e-4,
    )


class NnxDropPath(nnx.Module):
  def __call__(self, x):
    return x


class NnxDpBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(W, rngs=rngs)
    self.attn = nnx.Linear(W, W, rngs=rngs)
    self.ln2 = nnx.LayerNorm(W, rngs=rngs)
    self.fc1 = nnx.Linear(W, 2 * W, rngs=rngs)
    self.fc2 = nnx.Linear(2 * W, W, rngs=rngs)
    self.drop_path = NnxDropPath()

  def __call__(self, x):
    x = x + self.drop_path(self.attn(self.ln1(x)))
    return x + self.drop_path(self.fc2(nnx.gelu(self.fc1(self.ln2(x)))))


def test_nnx_reused_drop_path_is_one_component_per_call():
  model = NnxDpBlock(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, W))
  tracker = rgft_jax.ErrorTracker(model)
  comps = tracker.components(model, x)
  assert comps.names == ("attn", "fc2")
  assert _owned(comps)["attn"] == sorted(
    _leaves("attn") + _leaves("ln1", ("bias", "scale"))
  )

  def loss(m, x):
    return jnp.mean(m(x) ** 2)

  _, grads, _ = nnx.jit(tracker.value_and_grad(loss, detach={"attn"}))(model, x)
  grads = nnx.to_pure_dict(grads)
  assert not np.any(grads["attn"]["kernel"])
  assert np.abs(grads["fc2"]["kernel"]).sum() > 0
  assert np.abs(grads["ln1"]["scale"]).sum() == 0


# 2 and 3. A position bias computed in the first layer and passed on (in a
# tuple output, with a mask at float32's minimum), and a memory norm that
# every cross-attention reads.


class Attn(nn.Module):
  first: bool = False

  @nn.compact
  def __call__(self, x, bias=None, memory=None):
    kv = x if memory is None else memory
    if self.first:
      rel = self.param("rel", nn.initializers.normal(1.0), (T, T))
      causal = jnp.tril(jnp.ones((T, T), bool))
      bias = rel + jnp.where(causal, 0.0, NEG)
    q, k, v = (nn.Dense(W, name=n)(a) for n, a in (("q", x), ("k", kv), ("v", kv)))
    s = jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(W)
    if bias is not None:
      s = s + bias
    out = nn.Dense(W, name="o")(jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s), v))
    return out, bias


class Dec(nn.Module):
  first: bool

  @nn.compact
  def __call__(self, x, bias, memory):
    h, bias = Attn(self.first, name="attn")(nn.LayerNorm(name="n1")(x), bias)
    x = x + h
    x = x + Attn(name="cross")(nn.LayerNorm(name="nc")(x), memory=memory)[0]
    x = x + nn.Dense(W, name="mlp")(nn.LayerNorm(name="n2")(x))
    return x, bias


class SharedNet(nn.Module):
  @nn.compact
  def __call__(self, src, tgt):
    memory = nn.LayerNorm(name="enc_norm")(nn.Dense(W, name="enc_in")(src))
    x, bias = nn.Dense(W, name="embed")(tgt), None
    for i in range(2):
      x, bias = Dec(i == 0, name=f"block{i}")(x, bias, memory)
    return nn.Dense(1, name="head")(x).mean((1, 2))


def _attn_fn(p, x, bias=None, memory=None):
  kv = x if memory is None else memory
  if "rel" in p:
    bias = p["rel"] + jnp.where(jnp.tril(jnp.ones((T, T), bool)), 0.0, NEG)
  q, k, v = _dense(p["q"], x), _dense(p["k"], kv), _dense(p["v"], kv)
  s = jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(W)
  if bias is not None:
    s = s + bias
  return _dense(p["o"], jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s), v)), bias


SHARED_NAMES = tuple(
  f"block{i}/{m}" for i in range(2) for m in ("attn", "cross", "mlp")
)


def _shared_forward(p, src, tgt, deltas=None, stop=()):
  memory = _ln(p["enc_norm"], _dense(p["enc_in"], src))
  x, bias, hs = _dense(p["embed"], tgt), None, {}
  for i in range(2):
    q = p[f"block{i}"]

    def add(x, key, h):
      hs[key] = h
      h = jax.lax.stop_gradient(h) if key in stop else h
      return x + h + (0 if deltas is None else deltas[key])

    h, bias = _attn_fn(q["attn"], _ln(q["n1"], x), bias)
    x = add(x, f"block{i}/attn", h)
    x = add(
      x, f"block{i}/cross", _attn_fn(q["cross"], _ln(q["nc"], x), memory=memory)[0]
    )
    x = add(x, f"block{i}/mlp", _dense(q["mlp"], _ln(q["n2"], x)))
  return _dense(p["head"], x).mean((1, 2)), hs


def _shared_setup():
  model = SharedNet()
  src = jax.random.normal(jax.random.key(1), (B, T, W))
  tgt = jax.random.normal(jax.random.key(2), (B, T, W))
  y = jax.random.normal(jax.random.key(3), (B,))
  params = model.init(jax.random.key(0), src, tgt)["params"]
  return model, params, src, tgt, y


def test_shared_parameters_belong_to_no_component():
  model, params, src, tgt, _ = _shared_setup()
  comps = rgft_jax.ErrorTracker(model).components(params, src, tgt)
  assert comps.names == SHARED_NAMES
  owned = _owned(comps)
  for i in range(2):
    b = f"block{i}"
    attn = [f"{b}/attn/{m}" for m in ("k", "o", "q", "v")]
    assert owned[f"{b}/attn"] == sorted(  # Not block0/attn/rel.
      [leaf for m in attn for leaf in _leaves(m)]
      + _leaves(f"{b}/n1", ("bias", "scale"))
    )
    cross = [f"{b}/cross/{m}" for m in ("k", "o", "q", "v")]
    assert owned[f"{b}/cross"] == sorted(  # Not the memory's norm.
      [leaf for m in cross for leaf in _leaves(m)]
      + _leaves(f"{b}/nc", ("bias", "scale"))
    )
  shared = [
    "block0/attn/rel",
    *_leaves("enc_in"),
    *_leaves("enc_norm", ("bias", "scale")),
  ]
  assert sorted(comps.shared) == sorted(shared)
  assert sorted(comps.unassigned(params)) == sorted(
    shared + _leaves("embed") + _leaves("head")
  )


@pytest.mark.parametrize(
  "detach", [(), ("block0/attn",), ("block0/cross", "block1/cross")]
)
@pytest.mark.slow
def test_shared_parameters_keep_their_gradients_and_the_map_is_finite(detach):
  model, params, src, tgt, y = _shared_setup()
  tracker = rgft_jax.ErrorTracker(model)
  tracker.components(params, src, tgt)

  def loss(p, src, tgt, y):
    return jnp.mean((model.apply({"params": p}, src, tgt) - y) ** 2)

  _, grads, error_map = jax.jit(tracker.value_and_grad(loss, detach=detach))(
    params, src, tgt, y
  )
  want = jax.grad(
    lambda p: jnp.mean((_shared_forward(p, src, tgt, stop=detach)[0] - y) ** 2)
  )(params)
  _allclose(grads, want)
  # Layer 1 still trains the bias layer 0 computes; cross-attentions the memory.
  assert np.abs(grads["block0"]["attn"]["rel"]).sum() > 0
  if len(detach) < 2:
    assert np.abs(grads["enc_norm"]["scale"]).sum() > 0

  def loss_one(p, d, src, tgt, y):
    out, hs = _shared_forward(p, src, tgt, d)
    return jnp.mean((out - y) ** 2), hs

  zeros = {n: jnp.zeros((T, W)) for n in SHARED_NAMES}
  want_map = _per_example(loss_one, params, (src, tgt, y), zeros)
  assert all(np.isfinite(float(v)) for v in error_map.values())
  if not detach:
    np.testing.assert_allclose(
      [float(error_map[n]) for n in SHARED_NAMES],
      [want_map[n] for n in SHARED_NAMES],
      rtol=1e-4,
    )


@pytest.mark.parametrize("runtime", [False, True])
def test_runtime_detach_of_a_tuple_output_leaves_the_rest(runtime):
  model, params, src, tgt, y = _shared_setup()
  tracker = rgft_jax.ErrorTracker(model)
  comps = tracker.components(params, src, tgt)

  def loss(p, src, tgt, y):
    return jnp.mean((model.apply({"params": p}, src, tgt) - y) ** 2)

  detach = ("block0/attn",)
  if runtime:
    detach = jnp.asarray([n in detach for n in comps.names])
  _, grads, _ = jax.jit(tracker.value_and_grad(loss, detach=detach))(
    params, src, tgt, y
  )
  want = jax.grad(
    lambda p: jnp.mean(
      (_shared_forward(p, src, tgt, stop=("block0/attn",))[0] - y) ** 2
    )
  )(params)
  _allclose(grads, want)


# 3. Non-finite values are never silent.


def test_non_finite_attribution_warns_once_naming_the_component():
  model, params, _, _ = _dp_setup()
  x = jnp.full((B, W), 1e30)  # Overflows ||h||^2 in float32.
  tracker = rgft_jax.ErrorTracker(model)
  tracker.components(params, x)

  def loss(p, x):
    return jnp.mean(jnp.tanh(model.apply({"params": p}, x) * 0.0))

  step = jax.jit(tracker.value_and_grad(loss))
  with pytest.warns(RuntimeWarning, match=r"non-finite values for \[.*'block0/attn'"):
    _, _, error_map = step(params, x)
    jax.effects_barrier()
  assert not np.isfinite(float(error_map["block0/attn"]))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    step(params, x)
    jax.effects_barrier()


# 4. Inline shortcuts, and what discovery cannot place.


class InlineUnit(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.BatchNorm(use_running_average=True, name="bn")(
      nn.Conv(8, (3, 3), name="conv")(x)
    )
    w = self.param("proj", nn.initializers.lecun_normal(), (x.shape[-1], 8))
    return nn.relu(y + x @ w)


class InlineNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = InlineUnit(name="unit")(x)
    return nn.Dense(3, name="head")(x.mean((1, 2)))


def test_inline_projection_shortcut_is_a_branch():
  model = InlineNet()
  x = jnp.ones((2, 8, 8, 3))
  params = model.init(jax.random.key(0), x)["params"]
  comps = rgft_jax.ErrorTracker(model).components(params, x)
  assert comps.names == ("unit/bn",)
  assert _owned(comps)["unit/bn"] == sorted(
    _leaves("unit/bn", ("bias", "scale")) + _leaves("unit/conv")
  )
  assert sorted(comps.unassigned(params)) == sorted(
    _leaves("head") + _leaves("stem") + ["unit/proj"]
  )


class Opaque(nn.Module):
  """A residual MLP written inline: no module output is added back."""

  @nn.compact
  def __call__(self, x):
    w1 = self.param("w1", nn.initializers.lecun_normal(), (W, W))
    w2 = self.param("w2", nn.initializers.lecun_normal(), (W, W))
    return x + jnp.tanh(x @ w1) @ w2


class OpaqueNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.Dense(W, name="mlp")(nn.LayerNorm(name="ln")(x))
    return Opaque(name="inline")(x)


def test_what_discovery_cannot_place_is_warned_about():
  model = OpaqueNet()
  x = jnp.ones((B, W))
  params = model.init(jax.random.key(0), x)["params"]
  with pytest.warns(
    UserWarning, match=r"'inline'.*\['inline/w1', 'inline/w2'\].*select=.*owns="
  ):
    comps = rgft_jax.ErrorTracker(model).components(params, x)
  assert comps.names == ("mlp",)


# 5. Batch x time flattened before a branch (as OPT does before its MLP).


class FlatBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.Dense(W, name="attn")(nn.LayerNorm(name="ln1")(x))
    shape = x.shape
    x = x.reshape(-1, W)
    h = nn.Dense(W, name="fc2")(
      nn.relu(nn.Dense(2 * W, name="fc1")(nn.LayerNorm(name="ln2")(x)))
    )
    return (x + h).reshape(shape)


def _flat_forward(p, x, deltas=None):
  h1 = _dense(p["attn"], _ln(p["ln1"], x))
  x = x + h1 + (0 if deltas is None else deltas["attn"])
  shape = x.shape
  x = x.reshape(-1, W)
  h2 = _dense(p["fc2"], jax.nn.relu(_dense(p["fc1"], _ln(p["ln2"], x))))
  d2 = 0 if deltas is None else deltas["fc2"].reshape(-1, W)
  return (x + h2 + d2).reshape(shape), {"attn": h1, "fc2": h2.reshape(shape)}


@pytest.mark.slow
def test_batch_flattened_with_time_is_measured_per_example():
  model = FlatBlock()
  x = jax.random.normal(jax.random.key(1), (B, T, W))
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model)
  assert tracker.components(params, x).names == ("attn", "fc2")

  def loss(p, x):
    return jnp.mean(jnp.sin(model.apply({"params": p}, x)).sum((1, 2)))

  _, grads, error_map = jax.jit(tracker.value_and_grad(loss))(params, x)
  _allclose(
    grads,
    jax.grad(lambda p: jnp.mean(jnp.sin(_flat_forward(p, x)[0]).sum((1, 2))))(params),
  )

  def loss_one(p, d, x):
    out, hs = _flat_forward(p, x, d)
    return jnp.mean(jnp.sin(out).sum((1, 2))), hs

  zeros = {n: jnp.zeros((T, W)) for n in ("attn", "fc2")}
  want = _per_example(loss_one, params, (x,), zeros)
  np.testing.assert_allclose(
    [float(error_map[n]) for n in ("attn", "fc2")],
    [want["attn"], want["fc2"]],
    rtol=1e-4,
  )


class Queries(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.Dense(W, name="learned")(self.param("q", nn.initializers.normal(), (3, W)))
    return x + nn.Dense(W, name="mlp")(x) + q.mean(0)


def test_a_tap_without_the_batch_leading_is_refused_naming_it():
  model = Queries()
  x = jnp.ones((B, W))
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(
    model, select=lambda path, m: path[-1] in ("learned", "mlp")
  )
  with pytest.raises(
    ValueError, match=r"'learned'.*leading axis has 3.*batch size 4.*select="
  ):
    tracker.components(params, x)


# 6. Models that draw random numbers.


class DropBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    drop = nn.Dropout(0.5, deterministic=False)  # One instance, reused.
    x = x + drop(nn.Dense(W, name="attn")(nn.LayerNorm(name="ln1")(x)))
    return x + drop(nn.Dense(W, name="fc2")(nn.relu(nn.Dense(2 * W, name="fc1")(x))))


def test_dropout_models_take_rngs():
  model = DropBlock()
  x = jax.random.normal(jax.random.key(1), (B, W))
  key = jax.random.key(7)
  params = model.init({"params": jax.random.key(0), "dropout": key}, x)["params"]
  tracker = rgft_jax.ErrorTracker(model)
  with pytest.raises(ValueError, match=r"dropout.*rngs=\{'dropout'"):
    tracker.components(params, x)
  comps = tracker.components(params, x, rngs={"dropout": jax.random.key(0)})
  assert comps.names == ("attn", "fc2")
  assert _owned(comps)["fc2"] == sorted(_leaves("fc1") + _leaves("fc2"))

  def loss(p, x, rngs):
    return jnp.mean(model.apply({"params": p}, x, rngs=rngs) ** 2)

  _, grads, error_map = jax.jit(tracker.value_and_grad(loss))(
    params, x, rngs={"dropout": key}
  )
  _allclose(grads, jax.grad(loss)(params, x, {"dropout": key}))
  assert all(float(v) > 0 for v in error_map.values())


# 7. A layer reused across depth (ALBERT), and parallel branches reading one
# norm (GPT-J): what several branches compute with belongs to none of them.


class Mlp(nn.Module):  # A class name the fallback by class names knows.
  @nn.compact
  def __call__(self, x):
    return nn.Dense(W, name="fc2")(nn.gelu(nn.Dense(2 * W, name="fc1")(x)))


class ReusedNet(nn.Module):
  """One pre-norm MLP layer applied at both depths; with `own`, a layer of
  its own on top."""

  own: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(W, name="embed")(x)
    ln, mlp = nn.LayerNorm(name="ln"), Mlp(name="mlp")
    for _ in range(2):
      x = x + mlp(ln(x))
    if self.own:
      x = x + Mlp(name="top")(nn.LayerNorm(name="top_ln")(x))
    return nn.Dense(1, name="head")(x)[:, 0]


def _mlp_fn(p, x):
  return _dense(p["fc2"], nn.gelu(_dense(p["fc1"], x)))


def _reused_forward(p, x, deltas=None, stop=()):
  x, hs = _dense(p["embed"], x), {}
  for _ in range(2):
    x = x + _mlp_fn(p["mlp"], _ln(p["ln"], x))
  if "top" in p:
    h = hs["top"] = _mlp_fn(p["top"], _ln(p["top_ln"], x))
    h = jax.lax.stop_gradient(h) if "top" in stop else h
    x = x + h + (0 if deltas is None else deltas["top"])
  return _dense(p["head"], x)[:, 0], hs


def _mlp_leaves(prefix):
  return _leaves(f"{prefix}/fc1") + _leaves(f"{prefix}/fc2")


@pytest.mark.parametrize("own", [True, False], ids=["and_own_layer", "only"])
@pytest.mark.slow
def test_a_layer_reused_across_depth_is_shared(own):
  """The reused layer's parameters (its norm too) are in no component and are
  listed as shared; with no layer of its own the model has no component
  (said in a warning) and the tracker still gives the loss's gradients."""
  model = ReusedNet(own)
  x = jax.random.normal(jax.random.key(1), (B, W))
  y = jax.random.normal(jax.random.key(2), (B,))
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model)
  shared = _mlp_leaves("mlp") + _leaves("ln", ("bias", "scale"))
  if own:
    comps = tracker.components(params, x)
    assert comps.names == ("top",)
    assert _owned(comps)["top"] == sorted(
      _mlp_leaves("top") + _leaves("top_ln", ("bias", "scale"))
    )
  else:
    with pytest.warns(UserWarning, match=r"no component.*shared.*'mlp/fc1/kernel'"):
      comps = tracker.components(params, x)
    assert comps.names == ()
  assert sorted(comps.shared) == sorted(shared)
  assert sorted(comps.unassigned(params)) == sorted(
    shared + _leaves("embed") + _leaves("head")
  )

  def loss(p, x, y):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  for detach in [()] + [(n,) for n in comps.names]:
    _, grads, error_map = jax.jit(tracker.value_and_grad(loss, detach=detach))(
      params, x, y
    )
    want = jax.grad(
      lambda p, detach=detach: jnp.mean(
        (_reused_forward(p, x, stop=detach)[0] - y) ** 2
      )
    )(params)
    _allclose(grads, want)

  def loss_one(p, d, x, y):
    out, hs = _reused_forward(p, x, d)
    return jnp.mean((out - y) ** 2), hs

  zeros = {n: jnp.zeros((W,)) for n in comps.names}
  want_map = _per_example(loss_one, params, (x, y), zeros) if own else {}
  _, _, error_map = jax.jit(tracker.value_and_grad(loss))(params, x, y)
  assert sorted(error_map) == sorted(want_map)
  for n in want_map:
    np.testing.assert_allclose(float(error_map[n]), want_map[n], rtol=1e-4)


class Parallel(nn.Module):
  """Attention and MLP read one norm; `summed`: their sum is added to the
  stream (GPT-J's `attn + mlp + x`), else each in turn (`x + attn + mlp`)."""

  summed: bool

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    attn, mlp = nn.Dense(W, name="attn")(h), Mlp(name="mlp")(h)
    return attn + mlp + x if self.summed else x + attn + mlp


class ParallelNet(nn.Module):
  summed: bool

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(W, name="embed")(x)
    for i in range(2):
      x = Parallel(self.summed, name=f"block{i}")(x)
    return nn.Dense(1, name="head")(x)[:, 0]


PARALLEL_NAMES = tuple(f"block{i}/{m}" for i in range(2) for m in ("attn", "mlp"))


def _parallel_forward(p, x, deltas=None, stop=()):
  x, hs = _dense(p["embed"], x), {}
  for i in range(2):
    q = p[f"block{i}"]
    h = _ln(q["ln"], x)
    new = x
    for name, f in (("attn", _dense), ("mlp", _mlp_fn)):
      key = f"block{i}/{name}"
      out = hs[key] = f(q[name], h)
      out = jax.lax.stop_gradient(out) if key in stop else out
      new = new + out + (0 if deltas is None else deltas[key])
    x = new
  return _dense(p["head"], x)[:, 0], hs


@pytest.mark.parametrize("summed", [True, False], ids=["summed", "in_turn"])
@pytest.mark.parametrize("detach", [(), ("block0/attn",), ("block1/mlp",)])
def test_parallel_branches_reading_one_norm_share_it(detach, summed):
  model = ParallelNet(summed)
  x = jax.random.normal(jax.random.key(1), (B, W))
  y = jax.random.normal(jax.random.key(2), (B,))
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Nothing is left unplaced.
    comps = tracker.components(params, x)
  assert comps.names == PARALLEL_NAMES
  owned = _owned(comps)
  for i in range(2):
    assert owned[f"block{i}/attn"] == _leaves(f"block{i}/attn")
    assert owned[f"block{i}/mlp"] == sorted(_mlp_leaves(f"block{i}/mlp"))
  shared = [
    leaf for i in range(2) for leaf in _leaves(f"block{i}/ln", ("bias", "scale"))
  ]
  assert sorted(comps.shared) == sorted(shared)
  assert sorted(comps.unassigned(params)) == sorted(
    shared + _leaves("embed") + _leaves("head")
  )

  def loss(p, x, y):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  _, grads, error_map = jax.jit(tracker.value_and_grad(loss, detach=detach))(
    params, x, y
  )
  want = jax.grad(
    lambda p: jnp.mean((_parallel_forward(p, x, stop=detach)[0] - y) ** 2)
  )(params)
  _allclose(grads, want)
  if not detach:

    def loss_one(p, d, x, y):
      out, hs = _parallel_forward(p, x, d)
      return jnp.mean((out - y) ** 2), hs

    zeros = {n: jnp.zeros((W,)) for n in PARALLEL_NAMES}
    want_map = _per_example(loss_one, params, (x, y), zeros)
    np.testing.assert_allclose(
      [float(error_map[n]) for n in PARALLEL_NAMES],
      [want_map[n] for n in PARALLEL_NAMES],
      rtol=1e-4,
    )
