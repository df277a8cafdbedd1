"""Which parameters belong to which component."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def _is_variable_or_masked(x: Any) -> bool:
  return isinstance(x, (nnx.Variable, optax.MaskedNode))


def _split_masked(tree: Any) -> tuple[dict[str, Any], list[str]]:
  """`(leaves by path, paths of optax.MaskedNode subtrees)` of `tree`.

  `optax.masked` and `optax.multi_transform` hand the inner transformation a
  tree in which the parameters it does not handle are `optax.MaskedNode()`
  (a node without children), at a leaf's path or at a subtree's.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable_or_masked)
  leaves, masked = {}, []
  for path, leaf in flat:
    if isinstance(leaf, optax.MaskedNode):
      masked.append(path_str(path))
    else:
      leaves[path_str(path)] = leaf
  return leaves, masked


def _under(path: str, prefixes: Sequence[str]) -> bool:
  return any(p == "" or path == p or path.startswith(p + "/") for p in prefixes)


def _rule_error(rule: Any, problem: str) -> str:
  return (
    f"Rule {rule!r}: {problem}. A rule is a tuple (pattern, name) or "
    "(pattern, name, head_axis) with pattern a str, name a str or None and "
    "head_axis an int; rules is a list of them, e.g. [(r'block(\\d+)/.*', "
    "r'block\\1'), (r'.*', None)]."
  )


def _compile_rule(rule: Any) -> tuple[re.Pattern, str | None, int | None]:
  """`(regex, name template, head axis)` of one `from_regex` rule, checked."""
  if isinstance(rule, (str, bytes)):
    raise TypeError(_rule_error(rule, "a bare string, not a tuple"))
  if not isinstance(rule, (tuple, list)):
    raise TypeError(_rule_error(rule, f"a {type(rule).__name__}, not a tuple"))
  if len(rule) not in (2, 3):
    raise ValueError(_rule_error(rule, f"{len(rule)} entries, not 2 or 3"))
  pattern, template, head_axis = (*rule, None)[:3]
  if not isinstance(pattern, str):
    raise TypeError(
      _rule_error(rule, f"the pattern is a {type(pattern).__name__}, not a str")
    )
  if template is not None and not isinstance(template, str):
    raise TypeError(
      _rule_error(rule, f"the name is a {type(template).__name__}, not a str or None")
    )
  if head_axis is not None and (
    isinstance(head_axis, (bool, np.bool_))
    or not isinstance(head_axis, (int, np.integer))
  ):
    raise TypeError(
      _rule_error(rule, f"head_axis is a {type(head_axis).__name__}, not an int")
    )
  if head_axis is not None and (template is None or "{head}" not in template):
    raise ValueError(
      f"Rule {pattern!r} cuts along head axis {head_axis}, so its name "
      f"template must contain '{{head}}', got {template!r}."
    )
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(_rule_error(rule, f"invalid pattern ({e})")) from None
  return regex, template, None if head_axis is None else int(head_axis)


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
    shared: paths of parameter leaves that several components compute with
      (a shared position bias, a layer reused across depth), which therefore
      belong to none of them and take the full update; informational (they
      are among `unassigned()`), filled in by `ErrorTracker.components`.
    layer_groups: the components that are the layers of one tapped module
      inside a scan over layers, a tuple of names per tapped module (whole
      outputs only), filled in by `ErrorTracker.components`. Detaching one
      of them with a static set is a mask; at run time it saves `1 / layers`
      of what detaching the whole group saves (`detach_costs`), and
      `SparseTrainStep` gates a model that has some at run time.

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
  shared: tuple[str, ...] = ()
  layer_groups: tuple[tuple[str, ...], ...] = ()
  _by_path: dict[str, np.ndarray] = dataclasses.field(
    init=False, repr=False, compare=False
  )  # Index leaves by parameter path, set in __post_init__.

  def __post_init__(self):
    if isinstance(self.names, (str, bytes)):
      raise TypeError(
        f"Component names must be a sequence of strings, got the string "
        f"{self.names!r}; write ({self.names!r},) for a single component."
      )
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
    owned = set()
    for idx in by_path.values():
      owned.update(np.unique(idx).tolist())
    empty = [n for i, n in enumerate(names) if i not in owned]
    if empty:
      raise ValueError(
        f"Components {empty} own no parameter (no index entry holds their "
        "number); a component without parameters still counts for the largest "
        "error and scales every other one down: leave it out."
      )
    groups = tuple(tuple(g) for g in self.layer_groups)
    strays = sorted({n for g in groups for n in g} - set(names))
    if strays:
      raise ValueError(f"layer_groups name no component: {strays}.")
    object.__setattr__(self, "names", names)
    object.__setattr__(self, "shared", tuple(self.shared))
    object.__setattr__(self, "layer_groups", groups)
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
    appearance in the flattened parameters. Rules of the wrong shape or types
    (a bare string, a pattern that is not a str) are a TypeError naming the
    rule.

    Args:
      params: the parameter pytree (arrays or anything with `.shape`).
      rules: the rules, tried in order.

    Returns:
      The `Components`.
    """
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
      raise TypeError(
        f"rules must be a list of (pattern, name[, head_axis]) tuples, got "
        f"{rules!r}; for one rule write [(pattern, name)]."
      )
    compiled = [(_compile_rule(rule), rule) for rule in rules]

    names: dict[str, int] = {}

    def number(name: str) -> int:
      return names.setdefault(name, len(names))

    unmatched = []

    def assign(path, leaf):
      path = path_str(path)
      shape = np.shape(leaf)
      for (regex, template, head_axis), rule in compiled:
        match = regex.fullmatch(path)
        if match is None:
          continue
        if template is None:
          return np.full((), -1, np.int32)
        try:
          name = match.expand(template)
        except (re.error, IndexError) as e:
          raise ValueError(
            _rule_error(rule, f"its name does not expand on {path!r} ({e})")
          ) from None
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
    components = cls(names=tuple(names), index=index)
    components.check(params)  # A component may own only empty leaves.
    return components

  def check(self, tree: Any, what: str = "params") -> None:
    """Raises `ValueError` naming the paths where `tree` does not fit.

    Parameters that are `optax.MaskedNode()` (kept from this transformation by
    `optax.masked` or `optax.multi_transform`) count as absent, not missing.
    A component that owns no entry of `tree` is an error naming it.
    """
    leaves, masked = _split_masked(tree)
    missing = [p for p in self._by_path if p not in leaves and not _under(p, masked)]
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
    counts = self._counts(leaves)
    empty = [n for n, c in zip(self.names, counts, strict=True) if c == 0]
    if empty:
      why = " (masked out by optax.masked or optax.multi_transform)" if masked else ""
      raise ValueError(
        f"Components {_listing(empty)} own no entry of the {what}{why}; a "
        "component without parameters still counts for the largest error and "
        "scales every other one down: leave it out of the components."
      )

  def _counts(self, leaves: dict[str, Any]) -> np.ndarray:
    """Entries of each component among `leaves` (checked), int64[n]."""
    counts = np.zeros(len(self.names) + 1, np.int64)  # Entry 0: no component.
    for path, leaf in leaves.items():
      idx = self._by_path[path]
      if idx.size == 0:
        continue
      # Each index entry covers size(leaf) / size(idx) parameter entries.
      per_entry = int(np.prod(np.shape(leaf))) // idx.size
      counts += per_entry * np.bincount(idx.ravel() + 1, minlength=len(counts))
    return counts[1:]

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
    return self._counts(leaves_by_path(params))

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
