"""The tiny transformer of `_tiny_linen` in Flax NNX.

It computes exactly what `_tiny_linen.TinyTransformer` does and gets the same
parameters, so the per-example `vmap` references written for the Linen model
apply unchanged.
"""

import optax
from _tiny_linen import CLASSES
from _tiny_linen import HEADS
from _tiny_linen import WIDTH
from _tiny_linen import _setup
from flax import nnx


class MlpBlock(nnx.Module):
  # Linen's compact `nn.Dense(W)(gelu(nn.Dense(2W)(x)))` names the outer Dense first.
  def __init__(self, rngs):
    self.Dense_0 = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)
    self.Dense_1 = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)

  def __call__(self, x):
    return self.Dense_0(nnx.gelu(self.Dense_1(x)))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.LayerNorm_0 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.MultiHeadDotProductAttention_1 = nnx.MultiHeadAttention(
      HEADS, WIDTH, decode=False, rngs=rngs
    )
    self.LayerNorm_2 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.MlpBlock_3 = MlpBlock(rngs)

  def __call__(self, x):
    x = x + self.MultiHeadDotProductAttention_1(self.LayerNorm_0(x))
    return x + self.MlpBlock_3(self.LayerNorm_2(x))


class TinyTransformer(nnx.Module):
  def __init__(self, rngs):
    self.embedding = nnx.Linear(4, WIDTH, rngs=rngs)
    self.encoderblock_0 = Block(rngs)
    self.encoderblock_1 = Block(rngs)
    self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.embedding(x)
    x = self.encoderblock_1(self.encoderblock_0(x))
    return self.head(x.mean(axis=1))


def _nnx_setup():
  _, params, x, y = _setup()
  model = TinyTransformer(nnx.Rngs(0))
  nnx.update(model, nnx.State(params))
  return model, params, x, y


def _loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
