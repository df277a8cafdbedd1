"""Parameter trees as flat `{"a/b/c": leaf}` dicts, and counting their entries."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import traverse_util


def identity(tree: Any) -> Any:
  return tree


def flat(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(tree: dict[str, Any]) -> Any:
  return traverse_util.unflatten_dict(tree, sep="/")


def count(tree: Any, paths: frozenset[str] | None = None) -> int:
  """Number of parameter entries (at `paths`, or all)."""
  return sum(
    int(np.prod(np.shape(v)))
    for p, v in flat(tree).items()
    if paths is None or p in paths
  )
