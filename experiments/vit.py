"""Vision Transformer with the parameter layout of google-research/vision_transformer.

Parameter paths match the published `.npz` checkpoints (`embedding`, `cls`,
`Transformer/posembed_input`, `Transformer/encoderblock_N/...`,
`Transformer/encoder_norm`, `head`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Size:
  width: int
  depth: int
  mlp_dim: int
  heads: int


SIZES = {
  "mu": Size(width=32, depth=2, mlp_dim=64, heads=2),  # For tests.
  "xs": Size(width=64, depth=4, mlp_dim=128, heads=4),  # For CPU-sized studies.
  "Ti": Size(width=192, depth=12, mlp_dim=768, heads=3),
  "S": Size(width=384, depth=12, mlp_dim=1536, heads=6),
  "B": Size(width=768, depth=12, mlp_dim=3072, heads=12),
  "L": Size(width=1024, depth=24, mlp_dim=4096, heads=16),
}


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    y = nn.gelu(nn.Dense(self.mlp_dim)(x))
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    y = nn.Dense(x.shape[-1])(y)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  mlp_dim: int
  heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    # Names as in the published checkpoints.
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.heads, name="MultiHeadDotProductAttention_1"
    )(y, y)
    x = x + nn.Dropout(self.dropout)(y, deterministic=deterministic)
    y = nn.LayerNorm(name="LayerNorm_2")(x)
    mlp = MlpBlock(self.mlp_dim, self.dropout, name="MlpBlock_3")
    return x + mlp(y, deterministic=deterministic)


class AddPositionEmbs(nn.Module):
  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]))
    return x + pos


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    x = AddPositionEmbs(name="posembed_input")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    for i in range(self.depth):
      block = Encoder1DBlock(
        self.mlp_dim, self.heads, self.dropout, name=f"encoderblock_{i}"
      )
      x = block(x, deterministic)
    return nn.LayerNorm(name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  num_classes: int
  patch: int = 16
  size: str = "B"  # One of SIZES.
  dropout: float = 0.0

  @nn.compact
  def __call__(self, images, deterministic=True):
    s = SIZES[self.size]
    x = nn.Conv(
      s.width,
      (self.patch, self.patch),
      strides=self.patch,
      padding="VALID",
      name="embedding",
    )(images)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = Encoder(s.depth, s.mlp_dim, s.heads, self.dropout, name="Transformer")(
      x, deterministic
    )
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(
      x[:, 0]
    )
