"""A branch whose output reaches the stream through a parameterless module
(a dropout after attention, as in ViT) inside a scan over layers: one
component per layer, named as in the unrolled model, and detaching one layer
at run time equals a hand-written `stop_gradient` on the unrolled model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rgft_jax

D, LAYERS, B, T = 8, 3, 4, 5


class Block(nn.Module):
  cut: tuple[bool, bool] = (False, False)  # stop_gradient on (attn, mlp).
  carry: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    y = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, x)
    y = nn.Dropout(0.0)(y, deterministic=True)
    x = x + (jax.lax.stop_gradient(y) if self.cut[0] else y)
    h = nn.Dense(D, name="mlp")(nn.gelu(x))
    x = x + (jax.lax.stop_gradient(h) if self.cut[1] else h)
    return (x, None) if self.carry else x


class Looped(nn.Module):
  cuts: tuple = ((False, False),) * LAYERS

  @nn.compact
  def __call__(self, x):
    for i in range(LAYERS):
      x = Block(self.cuts[i], name=f"blocks_{i}")(x)
    return x.sum(-1)


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      Block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=LAYERS,
    )
    x, _ = stack(carry=True, name="blocks")(x, None)
    return x.sum(-1)


def _stack(looped):
  layers = [looped[f"blocks_{i}"] for i in range(LAYERS)]
  return {"blocks": jax.tree.map(lambda *a: jnp.stack(a), *layers)}


def _loss(model):
  return lambda params, x, y: ((model.apply({"params": params}, x) - y) ** 2).mean()


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  params = Looped().init(jax.random.key(0), x)["params"]
  return params, x, y


def test_scanned_components_are_per_layer(setup):
  params, x, _ = setup
  looped = rgft_jax.ErrorTracker(Looped(), select="branches")
  scanned = rgft_jax.ErrorTracker(Scanned(), select="branches")
  loop_names = looped.components(params, x).names
  scan_comps = scanned.components(_stack(params), x)
  scan_names = scan_comps.names
  assert loop_names == tuple(
    f"blocks_{i}/{m}" for i in range(LAYERS) for m in ("attn", "mlp")
  )
  assert scan_names == tuple(
    f"blocks/{i}/{m}" for i in range(LAYERS) for m in ("attn", "mlp")
  )
  assert scan_comps.layer_groups == (
    tuple(f"blocks/{i}/attn" for i in range(LAYERS)),
    tuple(f"blocks/{i}/mlp" for i in range(LAYERS)),
  )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.slow
def test_runtime_detaching_one_layer_equals_stop_gradient(setup, seed):
  params, x, y = setup
  tracker = rgft_jax.ErrorTracker(Scanned(), select="branches")
  names = tracker.components(_stack(params), x).names
  flags = np.random.default_rng(seed).random(len(names)) < 0.5
  run = jax.jit(
    lambda p, f: tracker.value_and_grad(_loss(Scanned()), detach=f)(p, x, y)
  )
  _, grads, error_map = run(_stack(params), jnp.asarray(flags))
  cuts = tuple(tuple(bool(f) for f in flags[2 * i : 2 * i + 2]) for i in range(LAYERS))
  want = jax.grad(_loss(Looped(cuts)))(params, x, y)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    grads,
    _stack(want),
  )
  # The error map equals the looped model's with the same set detached.
  looped = rgft_jax.ErrorTracker(Looped(), select="branches")
  loop_names = looped.components(params, x).names
  cut = [n for n, f in zip(loop_names, flags, strict=True) if f]
  _, _, loop_map = looped.value_and_grad(_loss(Looped()), detach=cut)(params, x, y)
  for i in range(LAYERS):
    for m in ("attn", "mlp"):
      np.testing.assert_allclose(
        error_map[f"blocks/{i}/{m}"], loop_map[f"blocks_{i}/{m}"], rtol=1e-4
      )


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(2, D, D, decode=False, rngs=rngs)
    self.drop = nnx.Dropout(0.0, rngs=rngs)
    self.mlp = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    x = x + self.drop(self.attn(x), deterministic=True)
    return x + self.mlp(nnx.gelu(x))


class NnxScanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NnxBlock(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.blocks).sum(-1)


def test_nnx_scanned_dropout_site_is_per_layer(setup):
  _, x, y = setup
  model = NnxScanned(nnx.Rngs(0))
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  names = tracker.components(model, x).names
  assert names == tuple(
    f"blocks/{i}/{m}" for i in range(LAYERS) for m in ("attn", "mlp")
  )
  # Detaching every layer's attention at run time leaves the attention
  # weights without gradient, and the MLP's as without detaching.
  flags = jnp.asarray([n.endswith("attn") for n in names])

  def loss(m, x, y):
    return ((m(x) - y) ** 2).mean()

  _, cut, _ = nnx.jit(lambda m, f: tracker.value_and_grad(loss, detach=f)(m, x, y))(
    model, flags
  )
  _, full, _ = nnx.jit(lambda m: tracker.value_and_grad(loss)(m, x, y))(model)
  cut, full = nnx.to_pure_dict(cut), nnx.to_pure_dict(full)
  assert all((g == 0).all() for g in jax.tree.leaves(cut["blocks"]["attn"]))
  assert any((g != 0).any() for g in jax.tree.leaves(full["blocks"]["attn"]))
