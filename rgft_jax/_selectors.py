"""What `ErrorTracker(select=...)` measures: one selector per kind.

`selector(select)` turns the user's `select` (`"branches"`, `"heads"` or a
predicate) into a `BranchSelector`, a `HeadSelector` or a `PredicateSelector`.
Each decides, for its kind, what structure is found once from the model's
dataflow (`find_structure`), which module calls have their output tapped
(`wants_output`), which calls are an attention's output projection whose
input is tapped per head (`heads_at`), and how it is worded in an error
message (`describe`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import ClassVar

import flax.linen as nn
from flax import nnx

from rgft_jax._discovery import BRANCH_CLASS
from rgft_jax._discovery import Select
from rgft_jax._discovery import is_branch
from rgft_jax._heads import Heads
from rgft_jax._heads import find_heads
from rgft_jax._intercept import Path
from rgft_jax._structure import Branch
from rgft_jax._structure import Site
from rgft_jax._structure import Structure
from rgft_jax._structure import Traced
from rgft_jax._structure import residual_branches

Module = nn.Module | nnx.Module
# What `find_structure` found: residual branches, or attentions by output
# projection path (None where the selector looks for neither).
Found = tuple[Structure | None, dict[Path, Heads] | None]


@dataclasses.dataclass(frozen=True)
class Selector:
  """Which module calls are components; by default none.

  Attributes:
    takes_owns: whether `owns=` may give a component's parameters.
  """

  takes_owns: ClassVar[bool] = True

  def describe(self) -> str:
    """What the selector looks for, for error messages."""
    return "nothing"

  def find_structure(self, traced: Callable[[], Traced]) -> Found:
    """What the dataflow of the model `traced()` traces holds (by default
    nothing, and the model is not traced)."""
    del traced
    return None, None

  def wants_output(
    self,
    path: Path,
    module: Module,
    call: int,
    branches: Mapping[Site, Branch] | None,
    all_shared: bool,
  ) -> bool:
    """Whether the output of call `call` of the module at `path` is tapped,
    given the residual `branches` found (all of them `all_shared`)."""
    del path, module, call, branches, all_shared
    return False

  def heads_at(
    self,
    path: Path,
    module: Module,
    heads: Mapping[Path, Heads] | None,
    is_head_projection: Callable[[Path, Any], bool],
    args: tuple[Any, ...],
  ) -> Heads | None:
    """The attention whose heads are measured at the input (`args[0]`) of the
    module at `path`, given the `heads` found; None for a module that is no
    attention's output projection."""
    del path, module, heads, is_head_projection, args
    return None


@dataclasses.dataclass(frozen=True)
class BranchSelector(Selector):
  """`select="branches"`: the residual branches found from the dataflow
  (`rgft_jax._structure`), or by class (`is_branch`) where there are none."""

  def describe(self) -> str:
    """`'branches'` and what it looks for."""
    return (
      "'branches' (looks for module outputs added back to what the module "
      "read; finding none, for flax.linen.MultiHeadDotProductAttention, "
      "flax.nnx.MultiHeadAttention, and modules whose class name matches "
      f"{BRANCH_CLASS.pattern!r})"
    )

  def find_structure(self, traced: Callable[[], Traced]) -> Found:
    """The residual branches of the model `traced()` traces."""
    return residual_branches(traced()), None

  def wants_output(
    self,
    path: Path,
    module: Module,
    call: int,
    branches: Mapping[Site, Branch] | None,
    all_shared: bool,
  ) -> bool:
    """Whether the call is one of the `branches` found (none is, where all of
    them are `all_shared`); by class where discovery found no residual add."""
    if branches is not None and (branches or all_shared):
      return (path, call) in branches
    return is_branch(path, module)


@dataclasses.dataclass(frozen=True)
class HeadSelector(Selector):
  """`select="heads"`: every head of every attention, found from the dataflow
  (`rgft_jax._heads`), or flax's attention classes where there are none; no
  whole output is tapped."""

  takes_owns: ClassVar[bool] = False  # Heads own their slices.

  def describe(self) -> str:
    """`'heads'` and what it looks for."""
    return (
      "'heads' (looks for attention output projections: a module whose input "
      "is a batched `weights @ values` product, reshaped, whose trailing axes "
      "it contracts hold the heads and the head dimension, heads major; "
      "finding none, for the `out` projection of flax.linen."
      "MultiHeadDotProductAttention and flax.nnx.MultiHeadAttention)"
    )

  def find_structure(self, traced: Callable[[], Traced]) -> Found:
    """The attentions of the model `traced()` traces, by output projection."""
    return None, find_heads(traced())

  def heads_at(
    self,
    path: Path,
    module: Module,
    heads: Mapping[Path, Heads] | None,
    is_head_projection: Callable[[Path, Any], bool],
    args: tuple[Any, ...],
  ) -> Heads | None:
    """The one of `heads` that `path` projects, or, where discovery found no
    attention, flax's attention whose output projection `path` is."""
    if heads:
      return heads.get(path)
    if is_head_projection(path, module):
      return Heads(path[:-1], path, args[0].shape[-2], features=2)
    return None


@dataclasses.dataclass(frozen=True)
class PredicateSelector(Selector):
  """`select=predicate`: every call of a module for which `predicate(path,
  module)` holds; nothing is found from the dataflow."""

  predicate: Callable[[Path, Module], bool]

  def describe(self) -> str:
    """The predicate's source (its name where the source cannot be read)."""
    try:
      source = inspect.getsource(self.predicate).strip()
    except (OSError, TypeError):
      source = getattr(self.predicate, "__qualname__", repr(self.predicate))
    return f"the predicate {source!r}"

  def wants_output(
    self,
    path: Path,
    module: Module,
    call: int,
    branches: Mapping[Site, Branch] | None,
    all_shared: bool,
  ) -> bool:
    """`predicate(path, module)`."""
    del call, branches, all_shared
    return bool(self.predicate(path, module))


def selector(select: Select) -> Selector:
  """The selector for `ErrorTracker`'s `select` argument.

  Examples:
    >>> from rgft_jax._selectors import selector
    >>> selector("heads")
    HeadSelector()
  """
  if isinstance(select, str):
    kinds: dict[str, Selector] = {"branches": BranchSelector(), "heads": HeadSelector()}
    if select not in kinds:
      raise ValueError(
        f"select must be 'branches', 'heads' or a predicate, got {select!r}."
      )
    return kinds[select]
  if not callable(select):
    raise TypeError(
      f"select must be a string or a callable, got {type(select).__name__}."
    )
  return PredicateSelector(select)
