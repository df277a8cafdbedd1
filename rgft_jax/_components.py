"""Which parameters belong to which component."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Rule = tuple[str, str | None] | tuple[str, str | None, int]

_MAX_LISTED = 20


def path_str(path: jax.tree_util.KeyPath) -> str:
  """`'a/b/0'` for the key path of `tree['a']['b'][0]`."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def leaves_by_path(tree: Any) -> dict[str, Any]:
  """The leaves of `tree` keyed by their `/`-joined path.

  An `nnx.Variable` counts as one leaf, so `nnx.state(model, nnx.Param)` and
  its pure form (`nnx.as_pure`, what `nnx.Optimizer` hands to optax) have the
  same paths.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
  return {path_str(p): leaf for p, leaf in leaves}


def _listing(paths: Sequence[str]) -> str:
  shown = ", ".join(repr(p) for p in paths[:_MAX_LISTED])
  more = len(paths) - _MAX_LISTED
  return shown + (f" and {more} more" if more > 0 else "")


@dataclasses.dataclass(frozen=True, eq=False)
class Components:
  """Assignment of parameters to named components.

  Attributes:
    names: one name per component; component `i` is `names[i]`.
    index: a pytree with the structure of the parameters whose leaves are
      integer arrays broadcastable to the matching parameter leaf: entry `i`
      puts the parameter entries it covers in component `i`, `-1` in no
      component. A leaf cut into heads holds, for example, an array of shape
      `(1, H, 1)` for a query kernel of shape `(D, H, Dh)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import rgft_jax
    >>> params = {"block0": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones(2)}}
    >>> comps = rgft_jax.Components.from_regex(
    ...     params, [(r"(block\\d+)/.*", r"\\1"), (r"head/.*", None)])
    >>> comps.names
    ('block0',)
    >>> comps.sizes(params).tolist()
    [4]
  """

  names: tuple[str, ...]
  index: Any

  def __post_init__(self):
    names = tuple(self.names)
    if not all(isinstance(n, str) for n in names):
      raise TypeError(f"Component names must be strings, got {names!r}.")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(f"Component names must be unique; repeated: {dupes}.")
    by_path = {}
    for path, idx in leaves_by_path(self.index).items():
      idx = np.asarray(idx)
      if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(
          f"Component index at {path!r} must hold integers, got {idx.dtype}."
        )
      if idx.size and (idx.min() < -1 or idx.max() >= len(names)):
        raise ValueError(
          f"Component index at {path!r} holds values outside [-1, "
          f"{len(names)}): min {idx.min()}, max {idx.max()}."
        )
      by_path[path] = idx.astype(np.int32)
    object.__setattr__(self, "names", names)
    object.__setattr__(self, "_by_path", by_path)

  def __len__(self) -> int:
    return len(self.names)

  @classmethod
  def from_regex(cls, params: Any, rules: Sequence[Rule]) -> Components:
    """Builds components from regular expressions over parameter paths.

    Each parameter path (keys joined by `/`, e.g.
    `Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`) goes to the first
    rule whose pattern matches it whole (`re.fullmatch`). A rule is
    `(pattern, name)` or `(pattern, name, head_axis)`:

    * `name` is a template expanded with the match (`\\1`, `\\g<block>`), or
      `None` to leave the parameter out of every component on purpose.
    * With `head_axis`, the leaf is cut along that axis (negative counts from
      the end) into one component per slice; the template must contain
      `{head}`, which becomes the slice number.

    Every parameter must be matched by some rule: missing coverage is an error
    that lists the unmatched paths. Component names are ordered by first
    appearance in the flattened parameters.

    Args:
      params: the parameter pytree (arrays or anything with `.shape`).
      rules: the rules, tried in order.

    Returns:
      The `Components`.
    """
    compiled = []
    for rule in rules:
      if len(rule) not in (2, 3):
        raise ValueError(
          f"A rule is (pattern, name) or (pattern, name, head_axis), got {rule!r}."
        )
      pattern, template, head_axis = (*rule, None)[:3]
      if head_axis is not None and (template is None or "{head}" not in template):
        raise ValueError(
          f"Rule {pattern!r} cuts along head axis {head_axis}, so its name "
          f"template must contain '{{head}}', got {template!r}."
        )
      compiled.append((re.compile(pattern), template, head_axis))

    names: dict[str, int] = {}

    def number(name: str) -> int:
      return names.setdefault(name, len(names))

    unmatched = []

    def assign(path, leaf):
      path = path_str(path)
      shape = np.shape(leaf)
      for regex, template, head_axis in compiled:
        match = regex.fullmatch(path)
        if match is None:
          continue
        if template is None:
          return np.full((), -1, np.int32)
        name = match.expand(template)
        if head_axis is None:
          return np.full((), number(name), np.int32)
        if not -len(shape) <= head_axis < len(shape):
          raise ValueError(
            f"Head axis {head_axis} is out of range for {path!r} of shape {shape}."
          )
        axis = head_axis % len(shape)
        heads = [number(name.replace("{head}", str(h))) for h in range(shape[axis])]
        index_shape = [1] * len(shape)
        index_shape[axis] = shape[axis]
        return np.asarray(heads, np.int32).reshape(index_shape)
      unmatched.append(path)
      return np.full((), -1, np.int32)

    index = jax.tree_util.tree_map_with_path(assign, params, is_leaf=_is_variable)
    if unmatched:
      raise ValueError(
        "Every parameter must be matched by a rule (use name None to leave "
        f"one out on purpose); {len(unmatched)} unmatched: {_listing(unmatched)}."
      )
    return cls(names=tuple(names), index=index)

  def check(self, tree: Any, what: str = "params") -> None:
    """Raises `ValueError` naming the paths where `tree` does not fit."""
    leaves = leaves_by_path(tree)
    missing = [p for p in self._by_path if p not in leaves]
    unknown = [p for p in leaves if p not in self._by_path]
    if missing or unknown:
      raise ValueError(
        f"The {what} do not match the components. Paths the components have "
        f"but the {what} lack: [{_listing(missing)}]; paths the {what} have but "
        f"the components lack: [{_listing(unknown)}]."
      )
    for path, leaf in leaves.items():
      shape, idx_shape = np.shape(leaf), self._by_path[path].shape
      if len(idx_shape) > len(shape) or any(
        i not in (1, s) for i, s in zip(idx_shape[::-1], shape[::-1], strict=False)
      ):
        raise ValueError(
          f"Component index of shape {idx_shape} at {path!r} does not "
          f"broadcast to the {what} leaf of shape {shape}."
        )

  def scale(self, tree: Any, alpha: jax.Array) -> Any:
    """Multiplies each leaf entry of component `i` by `alpha[i]`.

    Entries in no component are left as they are; dtypes are kept.
    """
    self.check(tree, what="updates")
    table = jnp.append(jnp.asarray(alpha, jnp.float32), 1.0)  # index -1 -> 1.

    def scale_leaf(path, leaf):
      idx = self._by_path[path_str(path)]
      if idx.ndim == 0:
        if idx == -1:
          return leaf
        return leaf * table[int(idx)].astype(leaf.dtype)
      return leaf * table[idx].astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(scale_leaf, tree)

  def sizes(self, params: Any) -> np.ndarray:
    """Number of parameter entries in each component, int64[n]."""
    self.check(params)
    counts = np.zeros(len(self.names) + 1, np.int64)  # Entry 0: no component.
    for path, leaf in leaves_by_path(params).items():
      idx = self._by_path[path]
      # Each index entry covers size(leaf) / size(idx) parameter entries.
      per_entry = int(np.prod(np.shape(leaf))) // idx.size
      counts += per_entry * np.bincount(idx.ravel() + 1, minlength=len(counts))
    return counts[1:]

  def unassigned(self, params: Any) -> list[str]:
    """Paths of parameter leaves with entries in no component."""
    self.check(params)
    return [p for p, idx in self._by_path.items() if (idx == -1).any()]

  def owned_paths(self) -> dict[str, list[str]]:
    """Paths of the parameter leaves each component touches, by name."""
    owned: dict[str, list[str]] = {n: [] for n in self.names}
    for path, idx in self._by_path.items():
      for i in np.unique(idx):
        if i >= 0:
          owned[self.names[i]].append(path)
    return owned
