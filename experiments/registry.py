"""The method registry of every study: a name, its builder, its budget, its help.

A study keeps one `Registry` and registers each method's builder under its
name; a method given a compute budget b in (0, 1] is named `name@b`:

>>> methods = Registry()
>>> @methods.register("full", budget="optional", help="Adam on everything")
... def full(setup):
...   return ("full", setup)
>>> methods.parse("full"), methods.parse("full@0.5")
(('full', None), ('full', 0.5))
>>> methods.names(budgets=(0.5,))
('full', 'full@0.5')
>>> methods.help()
'full: Adam on everything'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

from experiments import cli

BUDGET_KINDS = ("none", "optional", "required")


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered method: its builder, whether it takes `@budget`, its help.

  `budget` is "none" (no budget), "optional" (the plain method, and `@b` an
  equal-FLOPs variant of it) or "required" (a budgeted method).
  """

  build: Callable[..., Any]
  budget: str
  help: str


class Registry(dict[str, Entry]):
  """Method names -> `Entry`, in the order they were registered."""

  def register(
    self, name: str, *, budget: str = "none", help: str
  ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator that registers its function as `name`'s builder."""
    if budget not in BUDGET_KINDS:
      raise ValueError(f"budget must be one of {BUDGET_KINDS}, got {budget!r}.")
    if "@" in name or not name:
      raise ValueError(f"A method's name is a word without '@', got {name!r}.")
    if name in self:
      raise ValueError(f"{name!r} is registered already.")

    def add(build: Callable[..., Any]) -> Callable[..., Any]:
      self[name] = Entry(build, budget, help)
      return build

    return add

  def parse(self, name: str) -> tuple[str, float | None]:
    """`"rgft_budget@0.5"` -> `("rgft_budget", 0.5)`; `"lora"` -> `("lora", None)`.

    Raises ValueError naming an unknown method, a missing budget or one that
    the method does not take.
    """
    base, at, value = name.partition("@")
    if base not in self:
      raise ValueError(f"Unknown method {name!r}; the methods are {list(self)}.")
    kind = self[base].budget
    if not at:
      if kind == "required":
        raise ValueError(f"{base} needs a budget: {base}@<fraction>, e.g. {base}@0.5.")
      return base, None
    if kind == "none":
      raise ValueError(f"{base} takes no budget, got {name!r}.")
    return base, cli.parse_budget(name, value)

  def names(self, budgets: Sequence[float] = ()) -> tuple[str, ...]:
    """Every method that runs without a budget, then every `name@b` for each
    of `budgets`."""
    plain = tuple(n for n, e in self.items() if e.budget != "required")
    budgeted = tuple(
      f"{n}@{b}" for b in budgets for n, e in self.items() if e.budget != "none"
    )
    return plain + budgeted

  def help(self) -> str:
    """`name: help` of every method, `; `-separated (for --help)."""
    return "; ".join(f"{n}: {e.help}" for n, e in self.items())
