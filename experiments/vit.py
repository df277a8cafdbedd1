"""Vision Transformer with the parameter layout of google-research/vision_transformer.

Parameter paths match the published `.npz` checkpoints (`embedding`, `cls`,
`Transformer/posembed_input`, `Transformer/encoderblock_N/...`,
`Transformer/encoder_norm`, `head`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


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


def load_npz(path: str, init_params: dict[str, Any]) -> dict[str, Any]:
  """Loads a google-research/vision_transformer `.npz` checkpoint for fine-tuning.

  The checkpoint's `head` (and `pre_logits`, if any) are dropped and the new
  head comes from `init_params`; a position embedding for another grid size is
  resized bilinearly (the class token's entry is kept), as the original
  fine-tuning code does. Every other array must match `init_params` in path and
  shape.

  Args:
    path: the `.npz` file; keys are `/`-joined parameter paths.
    init_params: freshly initialised parameters of the model to fine-tune.

  Returns:
    `init_params` with every array but the head replaced by the checkpoint's.
  """
  with open(path, "rb") as f:
    loaded = dict(np.load(f))
  init = traverse_util.flatten_dict(init_params, sep="/")
  dropped = [k for k in loaded if k.split("/")[0] in ("head", "pre_logits")]
  for k in dropped:
    del loaded[k]
  pos = "Transformer/posembed_input/pos_embedding"
  if pos in loaded and pos in init and loaded[pos].shape != init[pos].shape:
    loaded[pos] = _resize_posemb(loaded[pos], init[pos].shape[1])
  missing = sorted(k for k in init if k not in loaded and k.split("/")[0] != "head")
  unknown = sorted(k for k in loaded if k not in init)
  wrong = sorted(
    f"{k}: checkpoint {loaded[k].shape}, model {tuple(init[k].shape)}"
    for k in loaded
    if k in init and loaded[k].shape != tuple(init[k].shape)
  )
  if missing or unknown or wrong:
    raise ValueError(
      f"{path} does not fit the model. Missing from the checkpoint: {missing}; "
      f"not in the model: {unknown}; shape mismatches: {wrong}."
    )
  out = {
    k: jnp.asarray(loaded[k], init[k].dtype) if k in loaded else v
    for k, v in init.items()
  }
  return traverse_util.unflatten_dict(out, sep="/")


def _resize_posemb(posemb: np.ndarray, tokens: int) -> np.ndarray:
  """[1, 1 + g*g, D] -> [1, tokens, D], bilinear over the grid, class token kept."""
  cls, grid = posemb[:, :1], posemb[0, 1:]
  old, new = int(np.sqrt(len(grid))), int(np.sqrt(tokens - 1))
  if old * old != len(grid) or new * new != tokens - 1:
    raise ValueError(
      f"Cannot resize a position embedding of {posemb.shape[1]} tokens to "
      f"{tokens}: both must be a class token plus a square grid."
    )
  grid = grid.reshape(old, old, -1)
  grid = jax.image.resize(grid, (new, new, grid.shape[-1]), "bilinear")
  return np.concatenate([cls, np.asarray(grid).reshape(1, new * new, -1)], axis=1)
