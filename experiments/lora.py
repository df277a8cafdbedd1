"""LoRA factors on a model's attention projections and MLP kernels.

A study names the kernels it adapts with a pattern over their paths
(`a/b/kernel`, layer indices included) and which of them are attention
output projections; `init` draws the factors and `merge` adds `a @ b` to
each kernel. A kernel is a matrix with its head axes merged: a query, key or
value kernel [D, N, H] is [D, N*H], an output projection [N, H, D] is
[N*H, D] (every axis but the last is an input), any other kernel is
[first axis, the rest].
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def _leaves(params: Any) -> dict[str, Any]:
  """`{"a/0/b": leaf}`, keys of any type (a pure NNX dict has int keys)."""
  flat = traverse_util.flatten_dict(params)
  return {"/".join(map(str, k)): v for k, v in flat.items()}


def init(
  params: Any, rank: int, key: jax.Array, target: re.Pattern, output: re.Pattern
) -> dict[str, Any]:
  """Factors `a` [d_in, r] ~ N(0, 1/d_in) and `b` [r, d_out] = 0 for every
  kernel whose path matches `target` (`output`: the attention output
  projections), keyed by the path with "." for "/"."""
  leaves = _leaves(params)
  targets = sorted(p for p in leaves if target.fullmatch(p))
  factors = {}
  for path, k in zip(targets, jax.random.split(key, len(targets)), strict=True):
    shape = leaves[path].shape
    inputs = len(shape) - 1 if output.fullmatch(path) else 1
    d_in, d_out = int(np.prod(shape[:inputs])), int(np.prod(shape[inputs:]))
    factors[path.replace("/", ".")] = {
      "a": jax.random.normal(k, (d_in, rank)) / np.sqrt(d_in),
      "b": jnp.zeros((rank, d_out)),
    }
  return factors


def merge(tree: dict[str, Any]) -> Any:
  """`{"base": params, "lora": factors}` -> the parameters, `W + a @ b` per
  adapted kernel."""
  base = traverse_util.flatten_dict(tree["base"])
  for key, leaf in base.items():
    f = tree["lora"].get(".".join(map(str, key)))
    if f is not None:
      base[key] = leaf + (f["a"] @ f["b"]).reshape(leaf.shape)
  return traverse_util.unflatten_dict(base)
