"""A byte-level decoder-only transformer in Flax NNX.

Pre-norm blocks (RMSNorm), rotary position embeddings, causal grouped-query
attention and a gated-SiLU (or GELU) MLP; an untied `lm_head`. Parameter paths:

* `embed/embedding` [V, D]
* `layers/{attn,mlp,attn_norm,mlp_norm}/...`, each leaf with a leading layer
  axis [L, ...] when `scan_layers`, or `layers/<i>/...` (a list) otherwise:
  `attn/q_proj/kernel` [D, N, H], `attn/{k,v}_proj/kernel` [D, K, H],
  `attn/o_proj/kernel` [N, H, D] (head `n` is index `n` of the head axis; it
  reads key/value head `n // (N // K)`), `mlp/{gate,up}_proj/kernel` [D, F],
  `mlp/down_proj/kernel` [F, D], `{attn,mlp}_norm/scale` [D]
* `final_norm/scale` [D], `lm_head/kernel` [D, V], `lm_head/bias` [V]

`stack_layers` / `unstack_layers` move parameters between the two layer
layouts and `with_layout` rebuilds a model in the other one, same weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

_LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of `Transformer`; the defaults train on 2 CPU cores."""

  vocab_size: int = 256  # Bytes.
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2  # Grouped-query attention; `n_heads` gives MHA, 1 MQA.
  d_ff: int = 384
  max_len: int = 128  # Longest input; the data pipeline's context.
  rope_theta: float = 10_000.0
  mlp: str = "swiglu"  # Or "gelu".
  norm_eps: float = 1e-6
  dtype: str = "float32"  # Computation (and residual stream); params are f32.
  scan_layers: bool = True  # One block with a leading layer axis, `nnx.scan`.
  remat: bool = False  # `nnx.remat` around each scanned block call.

  def __post_init__(self):
    positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads")
    for name in (*positive, "d_ff", "max_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
    if self.d_model % self.n_heads:
      raise ValueError(
        f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})."
      )
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
        f"({self.n_kv_heads})."
      )
    if self.head_dim % 2:
      raise ValueError(f"Rotary embeddings need an even head_dim, got {self.head_dim}.")
    if self.mlp not in ("swiglu", "gelu"):
      raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}.")
    if self.remat and not self.scan_layers:
      raise ValueError("remat applies to scanned layers; set scan_layers=True.")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


def _init(in_axis, out_axis):
  """Fan-in truncated normal over `in_axis` (an Einsum kernel's input axes)."""
  return nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
  )


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of `x` [B, T, N, H] at `positions` [B, T].

  Channel `i < H/2` and channel `i + H/2` form a pair rotated by the angle
  `position * theta ** (-2i / H)` (the "rotate half" layout of Llama and Gemma),
  so `<rope(q, m), rope(k, n)>` depends on `m - n` only.
  """
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, :, None] * freq[None, None, :]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.rope_theta = cfg.rope_theta
    into_heads = dict(dtype=cfg.dtype, kernel_init=_init(0, (1, 2)), rngs=rngs)
    self.q_proj = nnx.Einsum("btd,dnh->btnh", (d, n, h), **into_heads)
    self.k_proj = nnx.Einsum("btd,dkh->btkh", (d, k, h), **into_heads)
    self.v_proj = nnx.Einsum("btd,dkh->btkh", (d, k, h), **into_heads)
    from_heads = dict(dtype=cfg.dtype, kernel_init=_init((0, 1), 2), rngs=rngs)
    self.o_proj = nnx.Einsum("btnh,nhd->btd", (n, h, d), **from_heads)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    q = apply_rope(self.q_proj(x), positions, self.rope_theta)
    k = apply_rope(self.k_proj(x), positions, self.rope_theta)
    # Query head n reads key/value head n // (N // K); softmax runs in float32.
    out = jax.nn.dot_product_attention(q, k, self.v_proj(x), is_causal=True)
    return self.o_proj(out)


class Mlp(nnx.Module):
  """Gated-SiLU (`down(silu(gate(x)) * up(x))`) or GELU (`down(gelu(up(x)))`)."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    linear = dict(use_bias=False, dtype=cfg.dtype, rngs=rngs)
    if cfg.mlp == "swiglu":
      self.gate_proj = nnx.Linear(cfg.d_model, cfg.d_ff, **linear)
    else:
      self.gate_proj = None
    self.up_proj = nnx.Linear(cfg.d_model, cfg.d_ff, **linear)
    self.down_proj = nnx.Linear(cfg.d_ff, cfg.d_model, **linear)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.gate_proj is None:
      return self.down_proj(jax.nn.gelu(self.up_proj(x)))
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    norm = dict(epsilon=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.attn_norm = nnx.RMSNorm(cfg.d_model, **norm)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, **norm)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))


def _apply_block(block: Block, x: jax.Array, positions: jax.Array) -> jax.Array:
  return block(x, positions)


class Transformer(nnx.Module):
  """Decoder-only byte-level language model.

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> cfg = Config(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
  >>> model.layers.attn.q_proj.kernel.shape  # [L, D, N, H]
  (2, 32, 4, 8)
  >>> model(jnp.zeros((3, 10), jnp.int32)).shape
  (3, 10, 256)
  """

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=cfg.dtype,
      embedding_init=nnx.initializers.normal(1.0),
      rngs=rngs,
    )
    if cfg.scan_layers:

      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_layers(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

      self.layers = make_layers(rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = nnx.RMSNorm(
      cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs
    )
    self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, dtype=cfg.dtype, rngs=rngs)

  def __call__(
    self, tokens: jax.Array, positions: jax.Array | None = None
  ) -> jax.Array:
    """Float32 logits [B, T, V] of the next byte after each of `tokens` [B, T].

    `positions` [B, T] defaults to `0..T-1` in every row.
    """
    b, t = tokens.shape
    if t > self.cfg.max_len:
      raise ValueError(f"{t} tokens exceed max_len={self.cfg.max_len}.")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    x = self.embed(tokens)
    if self.cfg.scan_layers:
      apply = nnx.remat(_apply_block) if self.cfg.remat else _apply_block
      scan = nnx.scan(apply, in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
      x = scan(self.layers, x, positions)
    else:
      for block in self.layers:
        x = block(x, positions)
    return self.lm_head(self.final_norm(x)).astype(jnp.float32)


def loss(
  model: Transformer, tokens: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-byte cross-entropy of windows `tokens` [B, T+1].

  The model reads `tokens[:, :-1]` and predicts `tokens[:, 1:]`.

  Returns:
    `(mean, aux)`: the mean loss in nats over the B*T predictions, and
    `{"per_example": [B] mean loss of each window, "bits_per_byte": mean / ln 2}`.
    `jax.value_and_grad(loss, has_aux=True)` takes it as is.
  """
  logits = model(tokens[:, :-1])
  nats = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  mean = nats.mean()
  return mean, {"per_example": nats.mean(axis=1), "bits_per_byte": mean / math.log(2)}


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Looped-layout parameters (`layers/<i>/...`) -> scanned (`layers/...` [L, ...]).

  Works on nested dicts of arrays, e.g. `nnx.to_pure_dict(nnx.state(model))`
  or its gradient; everything outside `layers` is kept as is.
  """
  layers = params[_LAYERS]
  blocks = [layers[i] for i in sorted(layers, key=int)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**params, _LAYERS: stacked}


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Scanned-layout parameters -> looped: the inverse of `stack_layers`."""
  stacked = params[_LAYERS]
  n = len(jax.tree.leaves(stacked)[0])
  blocks = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
  return {**params, _LAYERS: blocks}


def with_layout(
  model: Transformer, *, scan_layers: bool, remat: bool = False
) -> Transformer:
  """A new model with `model`'s weights in the given layer layout.

  Example:

  >>> from flax import nnx
  >>> cfg = Config(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64)
  >>> looped = with_layout(Transformer(cfg, rngs=nnx.Rngs(0)), scan_layers=False)
  >>> looped.layers[1].attn.o_proj.kernel.shape  # [N, H, D]
  (2, 16, 32)
  """
  cfg = dataclasses.replace(model.cfg, scan_layers=scan_layers, remat=remat)
  params = nnx.to_pure_dict(nnx.state(model))
  if model.cfg.scan_layers and not scan_layers:
    params = unstack_layers(params)
  elif scan_layers and not model.cfg.scan_layers:
    params = stack_layers(params)
  new = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(new)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(new, state)
  return new
