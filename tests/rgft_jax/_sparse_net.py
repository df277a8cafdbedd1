"""A residual MLP with its loss and an RGFT setup, for detached-output steps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rgft_jax

B, D_IN, W, H, DEPTH, CLASSES = 16, 6, 32, 64, 3, 4


class MlpBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(W)(nn.relu(nn.Dense(H)(x)))


class Net(nn.Module):
  """Residual MLP: embed, DEPTH branches, head; `detach` puts branches behind stop_gradient."""

  detach: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(W, name="embed")(x)
    for i in range(DEPTH):
      h = MlpBlock(name=f"block{i}")(x)
      x = x + (jax.lax.stop_gradient(h) if i in self.detach else h)
    return nn.Dense(CLASSES, name="head")(x)


def _loss(model):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def _setup():
  model = Net()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, B))
  params = model.init(jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model)
  comps = tracker.components(params, x)
  tx = rgft_jax.rgft(1e-2, comps, warmup_steps=10)
  return model, params, x, y, tracker, comps, tx
