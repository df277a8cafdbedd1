"""A tiny Linen transformer, its data and loss, and its per-example references:

attributions computed by hand, example by example (`vmap` of the gradient with
respect to each tapped value)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

HEADS, WIDTH, SEQ, CLASSES = 2, 8, 5, 3


class MlpBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(WIDTH)(nn.gelu(nn.Dense(2 * WIDTH)(x)))


class Block(nn.Module):
  """Pre-norm transformer block with vision_transformer's child names."""

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, name="MultiHeadDotProductAttention_1"
    )(y, y)
    x = x + y
    y = nn.LayerNorm(name="LayerNorm_2")(x)
    return x + MlpBlock(name="MlpBlock_3")(y)


class TinyTransformer(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embedding")(x)
    for i in range(2):
      x = Block(name=f"encoderblock_{i}")(x)
    return nn.Dense(CLASSES, name="head")(x.mean(axis=1))


def _data(batch, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, SEQ, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, size=batch))
  return x, y


def _setup():
  model = TinyTransformer()
  x, y = _data(6)
  params = model.init(jax.random.key(0), x)["params"]
  # Move off the initialisation so that no gradient is trivially zero.
  params = jax.tree.map(
    lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params
  )
  return model, params, x, y


def _loss_fn(model):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def _heads_by_hand(p, y):
  """Per-head attention outputs [B, L, H, K] from the weights, written out."""
  q, k, v = (
    jnp.einsum("bld,dhk->blhk", y, p[n]["kernel"]) + p[n]["bias"][None, None]
    for n in ("query", "key", "value")
  )
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(q.shape[-1])
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqs,bshk->bqhk", weights, v)


def _reference_forward(params, x, y, edit, granularity):
  """Loss of the tiny transformer with each tapped value passed through `edit`.

  Branch outputs and per-head outputs are computed from the sub-modules' own
  parameters, outside any interception.
  """
  ln = nn.LayerNorm()
  h = nn.Dense(WIDTH).apply({"params": params["embedding"]}, x)
  for i in range(2):
    p = params[f"encoderblock_{i}"]
    name = f"encoderblock_{i}/MultiHeadDotProductAttention_1"
    a_in = ln.apply({"params": p["LayerNorm_0"]}, h)
    pa = p["MultiHeadDotProductAttention_1"]
    if granularity == "heads":
      o = _heads_by_hand(pa, a_in)
      o = edit(name, o)
      a = (
        jnp.einsum("blhk,hkd->bld", o, pa["out"]["kernel"])
        + pa["out"]["bias"][None, None]
      )
    else:
      a = nn.MultiHeadDotProductAttention(num_heads=HEADS).apply(
        {"params": pa}, a_in, a_in
      )
      a = edit(name, a)
    h = h + a
    m_in = ln.apply({"params": p["LayerNorm_2"]}, h)
    m = MlpBlock().apply({"params": p["MlpBlock_3"]}, m_in)
    if granularity != "heads":
      m = edit(f"encoderblock_{i}/MlpBlock_3", m)
    h = h + m
  logits = nn.Dense(CLASSES).apply({"params": params["head"]}, h.mean(axis=1))
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


@functools.partial(jax.jit, static_argnames=("granularity", "method"))
def _reference_cheap_map(params, x, y, granularity, method):
  """Per-example vmap of the gradient with respect to each tapped value."""
  values = {}

  def record(name, v):
    values[name] = v
    return v

  _reference_forward(params, x, y, record, granularity)
  names = list(values)

  def example_loss(deltas, xb, yb):
    def add(name, v):
      return v + deltas[name]

    return _reference_forward(params, xb[None], yb[None], add, granularity)[0]

  deltas = {n: jnp.zeros_like(values[n]) for n in names}
  per_example_grads = jax.vmap(
    lambda d, xb, yb: jax.grad(example_loss)(
      jax.tree.map(lambda t: t[None], d), xb, yb
    ),
  )(deltas, x, y)
  out = {}
  for n in names:
    g = per_example_grads[n][:, 0]  # [B, ...] one example's gradient each.
    h = values[n]
    if granularity == "heads":  # One value per head: sum over sequence and head_dim.
      for head in range(HEADS):
        out[f"{n}/head{head}"] = _combine(
          g[:, :, head], h[:, :, head], method, axes=(1, 2)
        )
    else:
      out[n] = _combine(g, h, method, axes=(1, 2))
  return out


def _combine(g, h, method, axes):
  if method == "norm_product":
    per = jnp.sqrt(jnp.sum(g**2, axes)) * jnp.sqrt(jnp.sum(h**2, axes))
  else:
    per = jnp.abs(jnp.sum(g * h, axes))
  return jnp.mean(per)
