"""`select="branches"` from the dataflow, on models whose class names say nothing.

Every expected component and owner below is written out by hand from the
model's code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rgft_jax

WIDTH = 8


class Mixer(nn.Module):
  """Self-attention written out by hand (no flax attention class)."""

  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.Dense(WIDTH, name=n)(x) for n in ("q", "k", "v"))
    w = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(WIDTH))
    return nn.Dense(WIDTH, name="o")(jnp.einsum("bqk,bkd->bqd", w, v))


class Widget(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(WIDTH, name="down")(nn.relu(nn.Dense(2 * WIDTH, name="up")(x)))


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.ones, (1, 1, WIDTH))  # A layer scale.
    x = x + gamma * Mixer(name="mix")(nn.RMSNorm(name="n1")(x))
    return x + 0.5 * Widget(name="ff")(nn.RMSNorm(name="n2")(x))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embed")(x)
    x = nn.RMSNorm(name="stem_norm")(x)
    for i in range(2):
      x = Layer(name=f"layer{i}")(x)
    return nn.Dense(3, name="head")(x.mean(1))


def _owned(comps):
  """{component: sorted module paths of the leaves it owns}."""
  return {
    n: sorted({p.rsplit("/", 1)[0] for p in ps})
    for n, ps in comps.owned_paths().items()
  }


def test_pre_norm_branches_with_unknown_class_names():
  model = Net()
  x = jnp.ones((2, 5, 4))
  params = model.init(jax.random.key(0), x)["params"]
  comps = rgft_jax.ErrorTracker(model, select="branches").components(params, x)
  # Scaled outputs (a layer scale, a constant) still join the stream.
  assert comps.names == ("layer0/mix", "layer0/ff", "layer1/mix", "layer1/ff")
  owned = _owned(comps)
  for i in range(2):
    assert owned[f"layer{i}/mix"] == [
      f"layer{i}{m}" for m in ("", "/mix/k", "/mix/o", "/mix/q", "/mix/v", "/n1")
    ]
    assert comps.owned_paths()[f"layer{i}/mix"][0] == f"layer{i}/gamma"
    assert owned[f"layer{i}/ff"] == [
      f"layer{i}/{m}" for m in ("ff/down", "ff/up", "n2")
    ]
  assert sorted({p.rsplit("/", 1)[0] for p in comps.unassigned(params)}) == [
    "embed",
    "head",
    "stem_norm",
  ]


class Unit(nn.Module):
  """A residual unit: conv-BN-relu-conv-BN plus a projection when shapes change."""

  features: int
  stride: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), self.stride, name="c1")(x)
    y = nn.relu(nn.BatchNorm(use_running_average=True, name="b1")(y))
    y = nn.Conv(self.features, (3, 3), name="c2")(y)
    y = nn.BatchNorm(use_running_average=True, name="b2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), self.stride, name="proj")(x)
    return nn.relu(x + y)


class TinyResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="stem_bn")(x))
    x = Unit(4, 1, name="unit0")(x)
    x = Unit(8, 2, name="unit1")(x)
    return nn.Dense(3, name="head")(x.mean((1, 2)))


@pytest.mark.slow
def test_residual_units_and_projection_shortcuts():
  model = TinyResNet()
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  params = variables["params"]
  comps = rgft_jax.ErrorTracker(model, select="branches").components(params, x)
  # Each unit adds its conv path (ending in b2) to its input, or to a
  # projection of its input; the path owns what it computes beyond that. The
  # projection is the stream's own path (it reads the unit's input, not what
  # the conv path's last module read), in no branch; the stem is below all.
  assert comps.names == ("unit0/b2", "unit1/b2")
  owned = _owned(comps)
  for u in ("unit0", "unit1"):
    assert owned[f"{u}/b2"] == [f"{u}/b1", f"{u}/b2", f"{u}/c1", f"{u}/c2"]
  assert sorted({p.rsplit("/", 1)[0] for p in comps.unassigned(params)}) == [
    "head",
    "stem",
    "stem_bn",
    "unit1/proj",
  ]


def test_without_residual_adds_class_names_are_the_fallback():
  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(x)

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Mlp(name="mlp")(nn.Dense(4, name="a")(x))

  model = Plain()
  x = jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)["params"]
  comps = rgft_jax.ErrorTracker(model, select="branches").components(params, x)
  assert comps.names == ("mlp",)


class NnxMix(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.v = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    w = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", self.q(x), x))
    return jnp.einsum("bqk,bkd->bqd", w, self.v(x))


class NnxThing(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.b = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.gelu(self.a(x)))


class NnxLayer(nnx.Module):
  def __init__(self, rngs):
    self.norm1 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.mix = NnxMix(rngs)
    self.norm2 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.thing = NnxThing(rngs)

  def __call__(self, x):
    x = x + self.mix(self.norm1(x))
    return x + self.thing(self.norm2(x))


class NnxStack(nnx.Module):
  def __init__(self, rngs, scan):
    self.scan = scan
    if scan:

      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return NnxLayer(rngs)

      self.layers = make(rngs)
    else:
      self.layers = nnx.List([NnxLayer(rngs) for _ in range(3)])

  def __call__(self, x):
    if self.scan:
      x, _ = nnx.scan(
        nnx.remat(lambda x, layer: (layer(x), None)),
        in_axes=(nnx.Carry, 0),
        out_axes=(nnx.Carry, 0),
      )(x, self.layers)
      return x
    for layer in self.layers:
      x = layer(x)
    return x


@pytest.mark.parametrize("scan", [False, True])
def test_nnx_branches_per_layer_in_a_scan(scan):
  model = NnxStack(nnx.Rngs(0), scan)
  x = jnp.ones((2, 5, WIDTH))
  comps = rgft_jax.ErrorTracker(model, select="branches").components(model, x)
  assert comps.names == tuple(
    f"layers/{i}/{m}" for i in range(3) for m in ("mix", "thing")
  )
  params = nnx.state(model, nnx.Param)
  owned = _owned(comps)
  if not scan:
    assert owned["layers/1/mix"] == [
      f"layers/1/{m}" for m in ("mix/q", "mix/v", "norm1")
    ]
    assert owned["layers/2/thing"] == [
      f"layers/2/{m}" for m in ("norm2", "thing/a", "thing/b")
    ]
  else:  # Each layer owns its slice of the stacked leaves.
    assert owned["layers/1/mix"] == ["layers/mix/q", "layers/mix/v", "layers/norm1"]
    ones = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(params))
    alpha = jnp.zeros(len(comps)).at[comps.names.index("layers/1/mix")].set(1.0)
    scaled = comps.scale(ones, alpha)
    np.testing.assert_array_equal(
      scaled["layers"]["mix"]["q"]["kernel"][:, 0, 0], [0, 1, 0]
    )
    np.testing.assert_array_equal(
      scaled["layers"]["thing"]["a"]["kernel"][:, 0, 0], [0, 0, 0]
    )
  assert comps.unassigned(params) == []
