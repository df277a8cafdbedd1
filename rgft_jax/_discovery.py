"""Which module calls are components, their names, and the parameters they own."""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from rgft_jax._components import Components
from rgft_jax._components import _is_variable
from rgft_jax._components import path_str
from rgft_jax._intercept import Path
from rgft_jax._intercept import Tap

Module = nn.Module | nnx.Module
Select = str | Callable[[Path, Module], bool]

BRANCH_CLASS = re.compile(r"(?i)mlp|feed_?forward|ffn")
NORM_CLASS = re.compile(r"(?i)norm")
_ATTENTION = (nn.MultiHeadDotProductAttention, nnx.MultiHeadAttention)
_HEAD_LEAVES = re.compile(r"(query|key|value)/(kernel|bias)")


def is_branch(path: Path, module: Module) -> bool:
  """A transformer block's attention or MLP branch."""
  del path
  return isinstance(module, _ATTENTION) or bool(
    BRANCH_CLASS.search(type(module).__name__)
  )


def columns(tap: Tap) -> list[tuple[str, int | None, int]]:
  """`(component name, layer or None, column)` of each component `tap` measures.

  The column indexes the tap's per-head axis (0 for a whole output). Inside a
  scan over layers, layer `l` of the scanned module `root` is named like the
  same model unrolled into a list, `root/l/...`.
  """
  layers = [None] if tap.layers is None else list(range(tap.layers))
  out = []
  for layer in layers:
    if layer is None:
      base = "/".join(tap.path)
    else:
      rest = tap.path[len(tap.root) :]
      base = "/".join((*tap.root, str(layer), *rest))
    if tap.heads is None:
      out.append((base, layer, 0))
    else:
      out += [(f"{base}/head{h}", layer, h) for h in range(tap.heads)]
  return out


def ordered_names(taps: Sequence[Tap]) -> list[str]:
  """Component names in call order; a scan's taps go layer by layer."""
  taps = list(dict.fromkeys(taps))
  names: list[str] = []
  i = 0
  while i < len(taps):
    j = i + 1
    if taps[i].layers is not None:
      key = (taps[i].root, taps[i].layers)
      while j < len(taps) and (taps[j].root, taps[j].layers) == key:
        j += 1
      group = [c for t in taps[i:j] for c in columns(t)]
      # Stable: call order within a layer (a scan's taps all have one).
      group.sort(key=lambda c: -1 if c[1] is None else c[1])
      names += [n for n, _, _ in group]
    else:
      names += [n for n, _, _ in columns(taps[i])]
    i = j
  return list(dict.fromkeys(names))


def owned_paths(path: Path, given: Any) -> tuple[Path, ...]:
  """The module paths an `owns(path, module)` callable returned, checked."""
  if isinstance(given, (str, tuple)) and all(isinstance(p, str) for p in given):
    given = [given]  # One path.
  try:
    out = tuple(tuple(p.split("/")) if isinstance(p, str) else tuple(p) for p in given)
  except TypeError:
    out = None
  if not out or not all(p and all(isinstance(k, str) for k in p) for p in out):
    raise TypeError(
      f"owns({path!r}, module) must return module paths (tuples of names or "
      f"'/'-joined strings), got {given!r}."
    )
  return out


def _claims(tap: Tap) -> list[tuple[Path, str]]:
  """`(module path, how)` of the parameters `tap` claims."""
  if tap.owns is not None:
    return [(p, "whole") for p in tap.owns]
  claims = [(tap.path, "whole" if tap.heads is None else "heads")]
  if tap.feeder is not None:
    claims.append((tap.feeder, "whole"))
  return claims


def _owner(taps: Sequence[Tap], path: str) -> tuple[Tap, str] | None:
  """The tap owning the parameter at `path` and how: 'whole', 'head' or 'out'.

  The deepest claimed module path wins: a tapped module's own parameters, a
  pre-norm with the branch it feeds, a head's slices of the query/key/value
  kernels and biases and of the output kernel, or what `owns` gave.
  """
  best = -1
  found: list[tuple[Tap, str]] = []
  for tap in taps:
    for prefix, how in _claims(tap):
      joined = "/".join(prefix) + "/"
      if not (path + "/").startswith(joined) or len(prefix) < best:
        continue
      if how == "heads":
        rest = path[len(joined) :]
        how = "head" if _HEAD_LEAVES.fullmatch(rest) else "out"
        if how == "out" and rest != "out/kernel":
          continue
      if len(prefix) > best:
        best, found = len(prefix), []
      found.append((tap, how))
  owners = list(dict.fromkeys(found))
  if len({t.path for t, _ in owners}) > 1 and any(t.owns for t, _ in owners):
    raise ValueError(
      f"Parameter {path!r} is claimed by the components of "
      f"{sorted('/'.join(t.path) for t, _ in owners)} through the same module "
      "path; give it to one of them (owns=)."
    )
  return owners[0] if owners else None


def _squeeze_constant(index: np.ndarray) -> np.ndarray:
  """`index` with each axis it is constant along cut to size 1."""
  for axis in range(index.ndim):
    first = np.take(index, [0], axis=axis)
    if index.shape[axis] > 1 and (index == first).all():
      index = first
  return index


def _entry_index(tap: Tap, heads: np.ndarray, number: dict[str, int]) -> np.ndarray:
  """Component numbers of a leaf whose entries each belong to a head (or -1)."""
  if tap.heads is None:
    raise ValueError(f"{'/'.join(tap.path)!r} is not tapped per head.")
  table = np.full([tap.layers or 1, tap.heads], -1, np.int32)
  for name, layer, col in columns(tap):
    table[layer or 0, col] = number.get(name, -1)
  layer_of: np.ndarray = np.zeros(heads.shape, np.int32)  # Of each entry.
  if tap.layers is not None:
    layer_of = np.broadcast_to(
      np.arange(heads.shape[0]).reshape((-1,) + (1,) * (heads.ndim - 1)), heads.shape
    )
  index = np.where(heads >= 0, table[layer_of, np.maximum(heads, 0)], -1)
  return _squeeze_constant(index.astype(np.int32))


def build_components(
  params: Any,
  taps: Sequence[Tap],
  order: Sequence[str],
  entries: dict[str, tuple[Tap, np.ndarray]] | None = None,
):
  """The `Components` of `taps` over `params`, named in `order`.

  `entries` gives, for leaves whose entries are owned head by head, the
  attention's tap and the head of each entry (-1: none); other leaves go to
  the tap that claims their module path. Components that own no parameter
  are left out.
  """
  taps = list(dict.fromkeys(taps))
  entries = entries or {}
  owners = {}  # Leaf path -> (tap, how, shape).

  def visit(key_path, leaf):
    path = path_str(key_path)
    if path in entries:
      tap, heads = entries[path]
      if (heads >= 0).any():
        owners[path] = (tap, "entries", tuple(np.shape(leaf)))
      return leaf
    found = _owner(taps, path)
    if found is not None:
      owners[path] = (*found, tuple(np.shape(leaf)))
    return leaf

  jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_variable)
  for tap in taps:
    for prefix in tap.owns or ():
      joined = "/".join(prefix) + "/"
      if not any((p + "/").startswith(joined) for p in owners):
        raise ValueError(
          f"owns gave {'/'.join(tap.path)!r} the module path {'/'.join(prefix)!r}, "
          "which holds no parameter it could own."
        )
  owned = {n for tap, _, _ in owners.values() for n, _, _ in columns(tap)}
  names = [n for n in order if n in owned]
  number = {n: i for i, n in enumerate(names)}

  def index(key_path, leaf):
    path = path_str(key_path)
    if path not in owners:
      return np.full((), -1, np.int32)
    tap, how, shape = owners[path]
    if how == "entries":
      return _entry_index(tap, entries[path][1], number)
    lead = 0 if tap.layers is None else 1
    if tap.layers is not None and shape[:1] != (tap.layers,):
      raise ValueError(
        f"Parameter {path!r} of shape {shape} should have the {tap.layers} "
        f"layers of {'/'.join(tap.root)!r} on its leading axis."
      )
    axes = [0] if lead else []
    if how != "whole":
      axes.append(len(shape) - 2 if how == "head" else lead)
    table = np.full([tap.layers or 1, tap.heads or 1], -1, np.int32)
    for name, layer, col in columns(tap):
      table[layer or 0, col] = number.get(name, -1)
    if not axes:
      return np.asarray(table[0, 0], np.int32)
    table = table[:, 0] if how == "whole" else (table if lead else table[0])
    idx_shape = [1] * len(shape)
    for a in axes:
      idx_shape[a] = shape[a]
    return table.reshape(idx_shape)

  index_tree = jax.tree_util.tree_map_with_path(index, params, is_leaf=_is_variable)
  return Components(tuple(names), index_tree)
