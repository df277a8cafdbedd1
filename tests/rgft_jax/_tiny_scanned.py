"""The tiny transformer of `_tiny_linen` with its blocks scanned over layers.

Its two blocks' parameters are stacked on a leading layer axis: layer `i` of
the scanned module `encoderblock` is the unrolled `encoderblock_i`.
"""

import _tiny_nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
from _tiny_linen import CLASSES
from _tiny_linen import HEADS
from _tiny_linen import WIDTH
from _tiny_linen import MlpBlock
from flax import nnx

LAYERS = 2


class CarryBlock(nn.Module):
  """`_tiny_linen.Block` with the `(carry, x) -> (carry, y)` call of a scan body."""

  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, name="MultiHeadDotProductAttention_1"
    )(y, y)
    x = x + y
    y = nn.LayerNorm(name="LayerNorm_2")(x)
    return x + MlpBlock(name="MlpBlock_3")(y), None


class ScannedTransformer(nn.Module):
  """big_vision's `scan=True` layout: one scanned block, optionally remat."""

  remat: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embedding")(x)
    block = nn.remat(CarryBlock) if self.remat else CarryBlock
    x, _ = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=LAYERS,
    )(name="encoderblock")(x, None)
    return nn.Dense(CLASSES, name="head")(x.mean(axis=1))


class RematTransformer(nn.Module):
  """Hugging Face's `gradient_checkpointing=True` layout: each layer remat."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embedding")(x)
    for i in range(LAYERS):
      x, _ = nn.remat(CarryBlock)(name=f"encoderblock_{i}")(x, None)
    return nn.Dense(CLASSES, name="head")(x.mean(axis=1))


def _stack(params):
  """The unrolled parameters with the blocks stacked under `encoderblock`."""
  params = dict(params)
  blocks = [params.pop(f"encoderblock_{i}") for i in range(LAYERS)]
  params["encoderblock"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  return params


def _unroll_name(name):
  parts = name.split("/")
  if parts[0] == "encoderblock" and parts[1].isdigit():
    return "/".join([f"encoderblock_{parts[1]}", *parts[2:]])
  return name


def _unstack(tree):
  tree = dict(tree)
  stacked = tree.pop("encoderblock")
  for i in range(LAYERS):
    tree[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return tree


class NnxScanned(nnx.Module):
  def __init__(self, rngs, remat=False):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _tiny_nnx.Block(rngs)

    self.embedding = nnx.Linear(4, WIDTH, rngs=rngs)
    self.encoderblock = make(rngs)
    self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)
    self.remat = remat

  def __call__(self, x):
    def body(x, block):
      return block(x), None

    if self.remat:
      body = nnx.remat(body)
    x, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(
      self.embedding(x), self.encoderblock
    )
    return self.head(x.mean(axis=1))
