"""Vision Transformer with the parameter layout of google-research/vision_transformer.

Parameter paths match the published `.npz` checkpoints (`embedding`, `cls`,
`Transformer/posembed_input`, `Transformer/encoderblock_N/...`,
`Transformer/encoder_norm`, `head`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zipfile
import zlib
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


def check_flags(size: str, patch: int, image_size: int) -> None:
  """Raises ValueError naming `--size` or `--image_size` when they do not
  make a ViT (`image_size` 0: the data's own)."""
  if size not in SIZES:
    raise ValueError(f"--size must be one of {sorted(SIZES)}, got {size!r}.")
  if image_size and image_size % patch:
    raise ValueError(
      f"--image_size ({image_size}) must be a multiple of --patch ({patch})."
    )


def short_name(name: str) -> str:
  """A component name of this ViT without the vision_transformer boilerplate.

  Works segment by segment, so only whole path segments are renamed; for the
  `label=` of `rgft_jax.viz.head_grid` and `error_map_heatmap`.

  Examples:
    >>> short_name("Transformer/encoderblock_3/MultiHeadDotProductAttention_1/head0")
    'block3/attn/head0'
    >>> short_name("VisionTransformer/encoderblock_x/MlpBlock_3")
    'VisionTransformer/encoderblock_x/mlp'
  """
  renamed = {"MultiHeadDotProductAttention_1": "attn", "MlpBlock_3": "mlp"}
  out = []
  for segment in name.split("/"):
    if segment == "Transformer":
      continue
    block = re.fullmatch(r"encoderblock_(\d+)", segment)
    out.append(f"block{block.group(1)}" if block else renamed.get(segment, segment))
  return "/".join(out)


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
  carry: bool = False  # Return `(x, None)`, as the body of a scan over layers.

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
    x = x + mlp(y, deterministic=deterministic)
    return (x, None) if self.carry else x


class AddPositionEmbs(nn.Module):
  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]))
    return x + pos


class Encoder(nn.Module):
  """The blocks, as a loop (`encoderblock_{i}`) or, with `scan`, as big_vision's
  one `encoderblock` scanned over layers, its parameters stacked on axis 0
  (`scan_params` converts). `remat` recomputes each block in the backward pass."""

  depth: int
  mlp_dim: int
  heads: int
  dropout: float = 0.0
  scan: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x, deterministic=True):
    x = AddPositionEmbs(name="posembed_input")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    block = Encoder1DBlock
    if self.remat:  # Argument 2 (after the module and x) is `deterministic`.
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(2,))
    if self.scan:
      scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=self.depth,
      )
      x, _ = scanned(
        self.mlp_dim, self.heads, self.dropout, carry=True, name="encoderblock"
      )(x, deterministic)
    else:
      for i in range(self.depth):
        x = block(self.mlp_dim, self.heads, self.dropout, name=f"encoderblock_{i}")(
          x, deterministic
        )
    return nn.LayerNorm(name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  num_classes: int
  patch: int = 16
  size: str = "B"  # One of SIZES.
  dropout: float = 0.0
  scan: bool = False  # Blocks scanned over layers (see `Encoder`).
  remat: bool = False

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
    encoder = Encoder(
      s.depth,
      s.mlp_dim,
      s.heads,
      self.dropout,
      self.scan,
      self.remat,
      name="Transformer",
    )
    x = encoder(x, deterministic)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(
      x[:, 0]
    )


def scan_params(params: dict[str, Any], scan: bool = True) -> dict[str, Any]:
  """`params` in the layout of `VisionTransformer(scan=scan)`.

  The published checkpoints (and `load_npz`) use the loop's layout, one
  `Transformer/encoderblock_{i}` per block; the scanned layout stacks them
  on a leading axis under `Transformer/encoderblock`. Either layout converts
  to either; anything else is left as it is.
  """
  encoder = dict(params["Transformer"])
  if scan and "encoderblock" not in encoder:
    blocks = sorted(
      (k for k in encoder if re.fullmatch(r"encoderblock_\d+", k)),
      key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    stacked = [encoder.pop(k) for k in blocks]
    encoder["encoderblock"] = jax.tree.map(lambda *a: jnp.stack(a), *stacked)
  elif not scan and "encoderblock" in encoder:
    stacked = encoder.pop("encoderblock")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
      encoder[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return {**params, "Transformer": encoder}


_POSEMB = "Transformer/posembed_input/pos_embedding"
# Bytes a .npy file may hold besides its array: magic, length and a header of
# at most the 10_000 bytes numpy reads without allow_pickle.
_NPY_OVERHEAD = 16 + 10_000
# What a corrupt zip member or .npy header raises.
_UNREADABLE = (ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def load_npz(path: str, init_params: dict[str, Any]) -> dict[str, Any]:
  """Loads a google-research/vision_transformer `.npz` checkpoint for fine-tuning.

  The checkpoint's `head` (and `pre_logits`, if any) are dropped and the new
  head comes from `init_params`; a position embedding for another grid size is
  resized bilinearly (the class token's entry is kept), as the original
  fine-tuning code does. Every other array must match `init_params` in path and
  shape.

  Only the arrays the model takes are read, and each only once its `.npy`
  header matches the model's shape and its uncompressed size in the zip
  directory is that of its shape and dtype (plus a header): nothing else is
  decompressed, so a zip bomb costs nothing. A checkpoint's position embedding
  may hold up to `max(4 * model tokens, 1 + 128 * 128)` tokens.

  Args:
    path: the `.npz` file; keys are `/`-joined parameter paths.
    init_params: freshly initialised parameters of the model to fine-tune.

  Returns:
    `init_params` with every array but the head replaced by the checkpoint's.

  Raises:
    ValueError: if `path` is not a `.npz` (zip) file; if it does not fit the
      model (naming what is missing, unknown or mis-shaped); or if an array
      the model takes is pickled (object), not numeric, or declares another
      size than its header's shape and dtype need.
  """
  init = traverse_util.flatten_dict(init_params, sep="/")
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path} is not a .npz (zip) file: {e}.") from e
  with archive:
    members, not_arrays = {}, []
    for info in archive.infolist():
      if info.filename.endswith(".npy"):
        members[info.filename.removesuffix(".npy")] = info
      elif not info.is_dir():
        not_arrays.append(info.filename)
    if not_arrays:
      raise ValueError(f"{path} has members that are not .npy arrays: {not_arrays}.")
    kept = [k for k in members if k.split("/")[0] not in ("head", "pre_logits")]
    headers = {k: _npy_header(path, archive, members[k]) for k in kept if k in init}
    missing = sorted(k for k in init if k not in kept and k.split("/")[0] != "head")
    unknown = sorted(k for k in kept if k not in init)
    wrong = sorted(
      f"{k}: checkpoint {shape}, model {tuple(init[k].shape)}"
      + (f" (at most {_max_tokens(init[k].shape)} tokens)" if k == _POSEMB else "")
      for k, (shape, _) in headers.items()
      if not _fits(k, shape, tuple(init[k].shape))
    )
    if missing or unknown or wrong:
      raise ValueError(
        f"{path} does not fit the model. Missing from the checkpoint: {missing}; "
        f"not in the model: {unknown}; shape mismatches: {wrong}."
      )
    loaded = {}
    for k in headers:
      try:
        with archive.open(members[k]) as f:
          loaded[k] = np.lib.format.read_array(f, allow_pickle=False)
      except _UNREADABLE as e:
        raise ValueError(f"{path}: {members[k].filename} is corrupt: {e}") from e
  if _POSEMB in loaded and loaded[_POSEMB].shape != init[_POSEMB].shape:
    loaded[_POSEMB] = _resize_posemb(loaded[_POSEMB], init[_POSEMB].shape[1])
  out = {
    k: jnp.asarray(loaded[k], init[k].dtype) if k in loaded else v
    for k, v in init.items()
  }
  return traverse_util.unflatten_dict(out, sep="/")


def _npy_header(path, archive, info) -> tuple[tuple[int, ...], np.dtype]:
  """The shape and dtype of a `.npy` zip member, read from its header alone."""
  try:
    with archive.open(info) as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise ValueError(f".npy format version {version} is not supported")
  except _UNREADABLE as e:
    raise ValueError(
      f"{path}: {info.filename} is not a readable .npy array: {e}"
    ) from e
  if dtype.hasobject:
    raise ValueError(
      f"{path}: {info.filename} is a pickled (object) array; load_npz does not "
      "unpickle checkpoints."
    )
  if dtype.kind not in "biuf":
    raise ValueError(f"{path}: {info.filename} has dtype {dtype}, not a number.")
  size = math.prod(shape) * dtype.itemsize
  if not size <= info.file_size <= size + _NPY_OVERHEAD:
    raise ValueError(
      f"{path}: {info.filename} declares {info.file_size} bytes uncompressed, "
      f"but its header says {shape} {dtype}: {size} bytes of data and at most "
      f"{_NPY_OVERHEAD} of header."
    )
  return shape, dtype


def _max_tokens(model_shape) -> int:
  return max(4 * model_shape[1], 1 + 128 * 128)


def _fits(key, shape, model_shape) -> bool:
  """Whether a checkpoint array of `shape` can be loaded for `key`."""
  if key != _POSEMB or shape == model_shape:
    return shape == model_shape
  return (
    len(shape) == 3
    and (shape[0], shape[2]) == (model_shape[0], model_shape[2])
    and shape[1] <= _max_tokens(model_shape)
  )


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
