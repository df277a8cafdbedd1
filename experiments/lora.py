"""LoRA factors on the ViT's attention projections and MLP kernels."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.trees import flat
from experiments.trees import unflat

# Kernels LoRA adapts: attention projections and both MLP layers.
TARGET = re.compile(
  r".*/(MultiHeadDotProductAttention_1/(query|key|value|out)|MlpBlock_3/Dense_\d)/kernel"
)


def init(params, rank: int, key: jax.Array) -> dict[str, Any]:
  """Factors `a` [d_in, r] (scaled normal) and `b` [r, d_out] (zeros) per kernel."""
  factors = {}
  targets = sorted(p for p in flat(params) if TARGET.fullmatch(p))
  for path, k in zip(targets, jax.random.split(key, len(targets)), strict=True):
    d_in, d_out = _shape(path, flat(params)[path].shape)
    factors[path.replace("/", ".")] = {
      "a": jax.random.normal(k, (d_in, rank)) / np.sqrt(d_in),
      "b": jnp.zeros((rank, d_out)),
    }
  return factors


def _shape(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """A kernel as a matrix: out's [H, K, D] is [H*K, D], q/k/v's [D, H, K] is [D, H*K]."""
  if path.endswith("out/kernel"):
    return int(np.prod(shape[:-1])), shape[-1]
  return shape[0], int(np.prod(shape[1:]))


def merge(tree: dict[str, Any]) -> Any:
  base = flat(tree["base"])
  for key, f in tree["lora"].items():
    path = key.replace(".", "/")
    base[path] = base[path] + (f["a"] @ f["b"]).reshape(base[path].shape)
  return unflat(base)
