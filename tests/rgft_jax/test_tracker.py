"""ErrorTracker against attributions computed by hand, example by example."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny_linen import CLASSES
from _tiny_linen import HEADS
from _tiny_linen import WIDTH
from _tiny_linen import MlpBlock
from _tiny_linen import _combine
from _tiny_linen import _data
from _tiny_linen import _loss_fn
from _tiny_linen import _reference_cheap_map
from _tiny_linen import _reference_forward
from _tiny_linen import _setup

import rgft_jax


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["branches", "heads"])
@pytest.mark.parametrize("method", ["norm_product", "taylor"])
def test_cheap_methods_match_per_example_vmap(granularity, method):
  model, params, x, y = _setup()
  tracker = rgft_jax.ErrorTracker(model, select=granularity, method=method)
  loss, grads, error_map = jax.jit(tracker.value_and_grad(_loss_fn(model)))(
    params, x, y
  )
  expected = _reference_cheap_map(params, x, y, granularity, method)
  assert sorted(error_map) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(error_map[name], value, rtol=2e-4, err_msg=name)
  ref_loss, ref_grads = jax.value_and_grad(_loss_fn(model))(params, x, y)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("granularity", ["branches", "heads"])
@pytest.mark.slow
def test_ablation_matches_masked_forwards(granularity):
  model, params, x, y = _setup()
  tracker = rgft_jax.ErrorTracker(model, select=granularity, method="ablation")
  loss, _, error_map = jax.jit(tracker.value_and_grad(_loss_fn(model)))(params, x, y)
  full = _reference_forward(params, x, y, lambda n, v: v, granularity).mean()
  for name, value in error_map.items():
    if granularity == "heads":
      module, head = name.rsplit("/head", 1)

      def zero(n, v, module=module, head=int(head)):
        return v.at[:, :, head].set(0.0) if n == module else v
    else:

      def zero(n, v, name=name):
        return jnp.zeros_like(v) if n == name else v

    ablated = _reference_forward(params, x, y, zero, granularity).mean()
    np.testing.assert_allclose(
      value, full - ablated, rtol=1e-4, atol=1e-6, err_msg=name
    )
  assert len(error_map) == (4 if granularity == "branches" else 2 * HEADS)
  np.testing.assert_allclose(loss, full, rtol=1e-6)


def test_components_own_the_right_parameters():
  model, params, x, _ = _setup()
  branches = rgft_jax.ErrorTracker(model, select="branches").components(params, x)
  attn, mlp = "MultiHeadDotProductAttention_1", "MlpBlock_3"
  names = [f"encoderblock_{i}/{m}" for i in range(2) for m in (attn, mlp)]
  assert branches.names == tuple(names)  # In call order.
  owned = branches.owned_paths()
  for i in range(2):
    blk = f"encoderblock_{i}"
    assert sorted(owned[f"{blk}/{attn}"]) == sorted(
      [f"{blk}/LayerNorm_0/{v}" for v in ("bias", "scale")]
      + [
        f"{blk}/{attn}/{d}/{v}"
        for d in ("query", "key", "value", "out")
        for v in ("kernel", "bias")
      ]
    )
    assert sorted(owned[f"{blk}/{mlp}"]) == sorted(
      [f"{blk}/LayerNorm_2/{v}" for v in ("bias", "scale")]
      + [f"{blk}/{mlp}/Dense_{j}/{v}" for j in range(2) for v in ("kernel", "bias")]
    )
  assert branches.unassigned(params) == [
    "embedding/bias",
    "embedding/kernel",
    "head/bias",
    "head/kernel",
  ]

  heads = rgft_jax.ErrorTracker(model, select="heads").components(params, x)
  assert len(heads) == 2 * HEADS
  idx = heads.index["encoderblock_1"][attn]
  for h in range(HEADS):
    c = heads.names.index(f"encoderblock_1/{attn}/head{h}")
    np.testing.assert_array_equal(
      np.asarray(idx["query"]["kernel"])[0, :, 0] == c, np.arange(HEADS) == h
    )
    np.testing.assert_array_equal(
      np.asarray(idx["value"]["bias"])[:, 0] == c, np.arange(HEADS) == h
    )
    np.testing.assert_array_equal(
      np.asarray(idx["out"]["kernel"])[:, 0, 0] == c, np.arange(HEADS) == h
    )
  assert int(idx["out"]["bias"]) == -1
  assert int(heads.index["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"]) == -1


@pytest.mark.slow
def test_any_batch_size_under_jit():
  model, params, _, _ = _setup()
  tracker = rgft_jax.ErrorTracker(model)
  step = jax.jit(tracker.value_and_grad(_loss_fn(model)))
  for batch in (3, 7):
    x, y = _data(batch, seed=batch)
    _, _, error_map = step(params, x, y)
    expected = _reference_cheap_map(params, x, y, "branches", "norm_product")
    for name, value in expected.items():
      np.testing.assert_allclose(error_map[name], value, rtol=2e-4)


class ResBranch(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3, 3))(nn.relu(nn.Conv(4, (3, 3))(x)))


class ResCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    for i in range(2):
      x = x + ResBranch(name=f"res{i}")(x)
    return nn.Dense(CLASSES, name="head")(x.mean(axis=(1, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["norm_product", "taylor"])
def test_residual_cnn_with_predicate(method):
  model = ResCNN()
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(5, 6, 6, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, size=5))
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(
    model, select=lambda path, m: isinstance(m, ResBranch), method=method
  )
  assert tracker.components(params, x).names == ("res0", "res1")
  _, _, error_map = jax.jit(tracker.value_and_grad(_loss_fn(model)))(params, x, y)

  def forward(deltas, xb, yb):
    h = nn.Conv(4, (3, 3)).apply({"params": params["stem"]}, xb)
    outs = {}
    for i in range(2):
      r = ResBranch().apply({"params": params[f"res{i}"]}, h)
      outs[f"res{i}"] = r
      h = h + r + deltas[f"res{i}"]
    logits = nn.Dense(CLASSES).apply({"params": params["head"]}, h.mean(axis=(1, 2)))
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb)[0], outs

  zeros = {f"res{i}": jnp.zeros((1, 6, 6, 4)) for i in range(2)}
  g, outs = jax.vmap(
    lambda xb, yb: jax.grad(forward, has_aux=True)(zeros, xb[None], yb[None])
  )(x, y)
  for name in ("res0", "res1"):
    expected = _combine(g[name][:, 0], outs[name][:, 0], method, axes=(1, 2, 3))
    np.testing.assert_allclose(error_map[name], expected, rtol=2e-4)


def test_has_aux_and_mutable_collections_pass_through():
  class WithStats(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(WIDTH)(x)
      x = x + MlpBlock()(nn.BatchNorm(use_running_average=not train)(x))
      return nn.Dense(CLASSES)(nn.Dropout(0.5, deterministic=not train)(x))

  model = WithStats()
  x, y = _data(4)
  x = x[:, 0]
  variables = model.init(jax.random.key(0), x, train=False)

  def loss_fn(params, x, y, key):
    logits, updates = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

  tracker = rgft_jax.ErrorTracker(model)
  (loss, updates), grads, error_map = jax.jit(
    tracker.value_and_grad(loss_fn, has_aux=True)
  )(variables["params"], x, y, jax.random.key(5))
  (ref_loss, ref_updates), ref_grads = jax.value_and_grad(loss_fn, has_aux=True)(
    variables["params"], x, y, jax.random.key(5)
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert list(error_map) == ["MlpBlock_0"]


def test_select_matching_nothing_names_submodules():
  model, params, x, _ = _setup()
  tracker = rgft_jax.ErrorTracker(model, select=lambda path, m: False)
  with pytest.raises(
    ValueError, match=r"matched no submodule.*encoderblock_0/MlpBlock_3"
  ):
    tracker.components(params, x)


def test_untappable_output_is_a_clear_error():
  class IntOut(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.argmax(nn.Dense(3)(x), -1)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(x) * IntOut(name="picker")(x)[:, None]

  model = Net()
  x = jnp.ones((2, 3))
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model, select=lambda path, m: path == ("picker",))
  with pytest.raises(
    ValueError, match=r"Cannot tap the output of 'picker'.*int32\[2\]"
  ):
    tracker.components(params, x)


def test_tuple_outputs_are_tapped_leaf_by_leaf():
  class Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x), {"b": nn.Dense(3)(x)}

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      a, d = Pair(name="pair")(x)
      return (a * d["b"]).sum(-1)

  model = Net()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model, select=lambda path, m: path == ("pair",))

  def loss_fn(p, x):
    return jnp.mean(model.apply({"params": p}, x) ** 2)

  _, _, error_map = tracker.value_and_grad(loss_fn)(params, x)
  a, d = Pair().apply({"params": params["pair"]}, x)
  b = d["b"]
  f = (a * b).sum(-1)
  # Per-example loss f_b^2: gradients 2 f b and 2 f a for the two leaves.
  ga, gb = 2 * f[:, None] * b, 2 * f[:, None] * a
  g_norm = jnp.sqrt((ga**2).sum(-1) + (gb**2).sum(-1))
  h_norm = jnp.sqrt((a**2).sum(-1) + (b**2).sum(-1))
  np.testing.assert_allclose(error_map["pair"], jnp.mean(g_norm * h_norm), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["norm_product", "ablation"])
def test_measure_limits_the_attribution(method):
  model, params, x, y = _setup()
  tracker = rgft_jax.ErrorTracker(model, method=method)
  upper = {
    "encoderblock_1/MultiHeadDotProductAttention_1",
    "encoderblock_1/MlpBlock_3",
  }
  _, _, everything = jax.jit(tracker.value_and_grad(_loss_fn(model)))(params, x, y)
  loss, grads, some = jax.jit(tracker.value_and_grad(_loss_fn(model), measure=upper))(
    params, x, y
  )
  assert list(some) == list(everything)
  for name, value in some.items():
    if name in upper:
      np.testing.assert_allclose(value, everything[name], rtol=1e-5)
    else:
      assert np.isnan(value)
  ref_loss, ref_grads = jax.value_and_grad(_loss_fn(model))(params, x, y)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match=r"unknown components.*nope"):
    tracker.value_and_grad(_loss_fn(model), measure={"nope"})(params, x, y)


def test_components_from_abstract_params_and_inputs():
  model, params, x, _ = _setup()
  tracker = rgft_jax.ErrorTracker(model, select="heads")
  concrete = tracker.components(params, x)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
  abstract = tracker.components(*shapes)
  assert abstract.names == concrete.names
  assert abstract.owned_paths() == concrete.owned_paths()


def test_components_of_a_model_with_batch_stats_need_only_params():
  class WithStats(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(WIDTH)(x)
      x = x + MlpBlock()(nn.BatchNorm(use_running_average=True)(x))
      return nn.Dense(CLASSES)(x)

  model = WithStats()
  x = _data(4)[0][:, 0]
  variables = model.init(jax.random.key(0), x)
  comps = rgft_jax.ErrorTracker(model).components(variables["params"], x)
  assert comps.names == ("MlpBlock_0",)
  # The pre-norm feeding the branch is its own, by hand: BatchNorm_0 and MlpBlock_0.
  assert sorted(comps.owned_paths()["MlpBlock_0"]) == [
    "BatchNorm_0/bias",
    "BatchNorm_0/scale",
    "MlpBlock_0/Dense_0/bias",
    "MlpBlock_0/Dense_0/kernel",
    "MlpBlock_0/Dense_1/bias",
    "MlpBlock_0/Dense_1/kernel",
  ]


def test_a_tap_that_owns_nothing_is_left_out_of_the_error_map():
  class WithDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(WIDTH)(x)
      x = x + nn.Dropout(0.5, deterministic=True)(MlpBlock()(x))
      return nn.Dense(CLASSES)(x)

  model = WithDropout()
  x, y = _data(4)
  x = x[:, 0]
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(
    model, select=lambda path, m: isinstance(m, (MlpBlock, nn.Dropout))
  )
  comps = tracker.components(params, x)
  assert comps.names == ("MlpBlock_0",)  # The dropout owns no parameter.

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  _, grads, error_map = tracker.value_and_grad(loss_fn)(params, x, y)
  assert list(error_map) == ["MlpBlock_0"]
  tx = rgft_jax.rgft(1e-3, comps)
  tx.update(grads, tx.init(params), params, error_map=error_map)  # No key error.


def test_errors_say_what_was_looked_for():
  class NoAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  model = NoAttention()
  x = jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)["params"]
  with pytest.raises(
    ValueError, match=r"'heads' \(looks for attention output projections"
  ):
    rgft_jax.ErrorTracker(model, select="heads").components(params, x)
  with pytest.raises(
    ValueError, match=r"'branches' \(looks for .*MultiHeadDotProductAttention"
  ):
    rgft_jax.ErrorTracker(model, select="branches").components(params, x)

  def only_convs(path, module):
    return isinstance(module, nn.Conv)

  with pytest.raises(
    ValueError, match=r"the predicate .*isinstance\(module, nn.Conv\)"
  ):
    rgft_jax.ErrorTracker(model, select=only_convs).components(params, x)

  class Wrapper:  # What a Hugging Face Flax model looks like from here.
    def __init__(self, module, params):
      self.module, self.params = module, params

  with pytest.raises(TypeError, match=r"pass its `.module`"):
    rgft_jax.ErrorTracker(Wrapper(model, params))


class PostNormSelfOutput(nn.Module):
  """Hugging Face's `FlaxBertSelfOutput`: the residual is added inside."""

  @nn.compact
  def __call__(self, h, x):
    return nn.LayerNorm(name="LayerNorm")(nn.Dense(WIDTH, name="dense")(h) + x)


class PostNormAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(HEADS, out_features=WIDTH, name="self")(x)
    return PostNormSelfOutput(name="output")(h, x)


class PostNormNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embedding")(x)
    for i in range(2):
      x = PostNormAttention(name=f"layer_{i}")(x)
    return nn.Dense(CLASSES, name="head")(x.mean(axis=1))


@pytest.mark.slow
def test_owns_scales_what_select_does_not_measure():
  model = PostNormNet()
  x, y = _data(4)
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = _loss_fn(model)

  def is_dense(path, module):  # Measure the branch before the residual joins.
    return path[-2:] == ("output", "dense")

  plain = rgft_jax.ErrorTracker(model, select=is_dense)
  assert plain.components(params, x).owned_paths()["layer_0/output/dense"] == [
    "layer_0/output/dense/bias",
    "layer_0/output/dense/kernel",
  ]
  tracker = rgft_jax.ErrorTracker(model, select=is_dense, owns=lambda p, m: [p[:-2]])
  comps = tracker.components(params, x)
  assert comps.names == ("layer_0/output/dense", "layer_1/output/dense")
  owned = comps.owned_paths()
  for i in range(2):
    expected = sorted(
      "/".join(k.key for k in p)
      for p, _ in jax.tree_util.tree_flatten_with_path(params[f"layer_{i}"])[0]
    )
    assert sorted(owned[f"layer_{i}/output/dense"]) == [
      f"layer_{i}/{p}" for p in expected
    ]
  assert comps.unassigned(params) == [
    "embedding/bias",
    "embedding/kernel",
    "head/bias",
    "head/kernel",
  ]
  # The attribution is still measured at the dense output: the same map as
  # without owns, checked against an independent per-example computation.
  _, _, error_map = jax.jit(tracker.value_and_grad(loss_fn))(params, x, y)

  def example_loss(delta, name, xb, yb):
    def add(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if "/".join(context.module.scope.path) == name:
        out = out + delta
      return out

    with nn.intercept_methods(add):
      return loss_fn(params, xb[None], yb[None])

  for name, value in error_map.items():
    expected = []
    for b in range(len(y)):
      h = {}

      def grab(next_fun, args, kwargs, context, h=h):
        out = next_fun(*args, **kwargs)
        h["/".join(context.module.scope.path)] = out
        return out

      with nn.intercept_methods(grab):
        model.apply({"params": params}, x[b : b + 1])
      g = jax.grad(example_loss)(jnp.zeros_like(h[name]), name, x[b], y[b])
      expected.append(np.linalg.norm(g) * np.linalg.norm(h[name]))
    np.testing.assert_allclose(value, np.mean(expected), rtol=1e-4, err_msg=name)


def test_owns_errors_name_the_problem():
  model = PostNormNet()
  x, _ = _data(2)
  params = model.init(jax.random.key(0), x)["params"]

  def is_dense(path, module):
    return path[-2:] == ("output", "dense")

  with pytest.raises(ValueError, match="holds no parameter"):
    rgft_jax.ErrorTracker(
      model, select=is_dense, owns=lambda p, m: ["layer_0/nothing"]
    ).components(params, x)
  with pytest.raises(ValueError, match="claimed by the components of"):
    rgft_jax.ErrorTracker(
      model, select=is_dense, owns=lambda p, m: ["layer_0"]
    ).components(params, x)
  with pytest.raises(TypeError, match="must return module paths"):
    rgft_jax.ErrorTracker(model, select=is_dense, owns=lambda p, m: 3).components(
      params, x
    )
  with pytest.raises(ValueError, match="heads own their slices"):
    rgft_jax.ErrorTracker(model, select="heads", owns=lambda p, m: [p])
