"""The method registry of every study: each method once, the tasks it runs on.

`METHODS` lists every method of the harness once, with what it is (its
--help text, `CATALOGUE`); each task registers its builder of the methods it
runs, which returns a `Method`, and a study reads its task's view: the names
it runs, which take a compute budget, `parse` and --help. A method given a
budget b in (0, 1] is named `name@b`:

>>> methods = Registry({"full": "Adam on everything", "lora": "LoRA"})
>>> @methods.register("full", task="vit", budget="optional")
... def full(setup):
...   return ("full", setup)
>>> vit = methods.task("vit")
>>> vit.parse("full"), vit.parse("full@0.5")
(('full', None), ('full', 0.5))
>>> vit.names(budgets=(0.5,))
('full', 'full@0.5')
>>> vit.help()
'full: Adam on everything'
>>> methods.tasks_of("full"), methods.tasks_of("lora")
(('vit',), ())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

import rgft_jax
from experiments import budgets
from experiments import cli
from experiments.policies import Policy
from experiments.trees import identity

BUDGET_KINDS = ("none", "optional", "required")
# `step(tree, opt_state, batch[, flags]) -> (tree, opt_state, metrics)`.
Step = Callable[..., tuple[Any, Any, dict[str, Any]]]


def no_policy(seed: int) -> Policy:
  """The policy of a method that runs one variant: nothing left out."""
  del seed
  return Policy()


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
  """What a builder returns: a fine-tuning method on one task, the same for
  every learning rate and seed (they share its compiled steps).

  Attributes:
    name: as given, e.g. `"rgft_budget@0.5"`.
    init: `(learning_rate, seed) -> (tree, opt_state)`, a run's start: the
      tree it trains (the pretrained parameters; LoRA's factors beside them)
      and the optimizer state, which holds the rate and whatever the seed
      draws (masks, a random map's seed).
    make_step: `variant -> step(tree, opt_state, batch) -> (tree, opt_state,
      metrics)`, a pure function for `jax.jit`; a variant (a `frozenset` of
      names) is what the step leaves out.
    policy: `seed -> Policy` choosing each step's variant.
    to_params: the trained tree -> the model's parameters.
    trainable: the paths of the tree it trains (None: every path).
    family: methods of one family build the same step for the same variant,
      so they can share compiled steps (`full`, `full@b` and `lisa`, say);
      "" shares with none.
    components: RGFT's components, if any.
    steps: the steps it runs when not the study's (equal-FLOPs baselines).
    runtime: with these step costs, the detached set is decided at run
      time: `make_step(loop.RUNTIME)` takes it as a fourth argument, a
      boolean array over `components.names`, and a step is charged
      `runtime.step(variant)` FLOPs (XLA counts both sides of each gate).
  """

  name: str
  init: Callable[[float, int], tuple[Any, Any]]
  make_step: Callable[[Any], Step]
  policy: Callable[[int], Policy] = no_policy
  to_params: Callable[[Any], Any] = identity
  trainable: frozenset[str] | None = None
  family: str = ""
  components: rgft_jax.Components | None = None
  steps: int | None = None
  runtime: rgft_jax.DetachCosts | None = None

  def flags(self, variant: frozenset[str]) -> np.ndarray:
    """`variant` as a runtime step's boolean array over the components."""
    assert self.components is not None
    return np.array([n in variant for n in self.components.names], bool)


# Every method of the studies, in the order of --help and `--methods all`:
# its name and what it is.
CATALOGUE = {
  "full": "Adam on every parameter; full@b runs b x the steps (b of the FLOPs)",
  "rgft_blocks": "rgft() over each block's attention and MLP branch",
  "rgft_heads": "rgft() over each attention head",
  "lora": "LoRA on the attention and MLP kernels; a classifier head, where there "
  "is one, trained",
  "bitfit": "the biases and the classifier head",
  "head_only": "the classifier head alone",
  "lisa": "LISA: random blocks trained, redrawn periodically; lisa@b runs fewer "
  "steps (b of the FLOPs)",
  "rgft_mix": "rgft() over heads and MLP branches together",
  "rgft_random": "control: rgft_blocks on a random error map",
  "adapters": "bottleneck adapters after each block, the classifier head",
  "random_sparse": "a fixed random mask over the branches' entries (--sparse_fraction)",
  "magnitude_sparse": "a fixed mask of the branches' largest entries "
  "(--sparse_fraction)",
  **budgets.BUDGETED,
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """A task's builder of a method, whether it takes `@budget`, its help.

  `budget` is "none" (no budget), "optional" (the plain method, and `@b` an
  equal-FLOPs variant of it) or "required" (a budgeted method).
  """

  build: Callable[..., Any]
  budget: str
  help: str


class Registry:
  """Every method (`catalogue`: name -> what it is) and each task's builders."""

  def __init__(self, catalogue: Mapping[str, str]):
    bad = [n for n in catalogue if "@" in n or not n]
    if bad:
      raise ValueError(f"A method's name is a word without '@', got {bad}.")
    self.catalogue = dict(catalogue)
    self._builders: dict[str, dict[str, tuple[Callable[..., Any], str]]] = {}

  def register(
    self, name: str, *, task: str, budget: str = "none"
  ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator that registers its function as `task`'s builder of `name`."""
    if name not in self.catalogue:
      raise ValueError(
        f"{name!r} is not a method of the catalogue; add it to "
        f"experiments.registry.CATALOGUE with what it is. Have {list(self.catalogue)}."
      )
    if budget not in BUDGET_KINDS:
      raise ValueError(f"budget must be one of {BUDGET_KINDS}, got {budget!r}.")
    builders = self._builders.setdefault(task, {})
    if name in builders:
      raise ValueError(f"{name!r} is registered already for task {task!r}.")

    def add(build: Callable[..., Any]) -> Callable[..., Any]:
      builders[name] = (build, budget)
      return build

    return add

  def tasks_of(self, name: str) -> tuple[str, ...]:
    """The tasks with a builder of `name`, sorted."""
    return tuple(
      sorted(t for t, builders in self._builders.items() if name in builders)
    )

  def task(self, task: str) -> TaskMethods:
    """The methods `task` runs (a live view: later registrations show)."""
    return TaskMethods(self, task)


class TaskMethods(Mapping[str, Entry]):
  """A task's methods -> `Entry`, in the catalogue's order."""

  def __init__(self, registry: Registry, task: str):
    self.registry, self.name = registry, task

  def _builders(self) -> dict[str, tuple[Callable[..., Any], str]]:
    return self.registry._builders.get(self.name, {})

  def __getitem__(self, name: str) -> Entry:
    build, budget = self._builders()[name]
    return Entry(build, budget, self.registry.catalogue[name])

  def __iter__(self) -> Iterator[str]:
    builders = self._builders()
    return iter([n for n in self.registry.catalogue if n in builders])

  def __len__(self) -> int:
    return len(self._builders())

  def parse(self, name: str) -> tuple[str, float | None]:
    """`"rgft_budget@0.5"` -> `("rgft_budget", 0.5)`; `"lora"` -> `("lora", None)`.

    Raises ValueError naming an unknown method, one this task does not run
    (and the tasks that do), a missing budget or one the method does not take.
    """
    base, at, value = name.partition("@")
    if base not in self:
      if base in self.registry.catalogue:
        elsewhere = self.registry.tasks_of(base)
        raise ValueError(
          f"{base} does not run on the {self.name} task (it runs on "
          f"{', '.join(elsewhere) or 'no task yet'}); the methods are {list(self)}."
        )
      raise ValueError(f"Unknown method {name!r}; the methods are {list(self)}.")
    kind = self[base].budget
    if not at:
      if kind == "required":
        raise ValueError(f"{base} needs a budget: {base}@<fraction>, e.g. {base}@0.5.")
      return base, None
    if kind == "none":
      raise ValueError(f"{base} takes no budget on the {self.name} task, got {name!r}.")
    return base, cli.parse_budget(name, value)

  def names(self, budgets: Sequence[float] = ()) -> tuple[str, ...]:
    """Every method that runs without a budget, then every `name@b` for each
    of `budgets`."""
    entries = {n: self[n].budget for n in self}
    plain = tuple(n for n, kind in entries.items() if kind != "required")
    budgeted = tuple(
      f"{n}@{b}" for b in budgets for n, kind in entries.items() if kind != "none"
    )
    return plain + budgeted

  def help(self) -> str:
    """`name: help` of every method, `; `-separated (for --help)."""
    return "; ".join(f"{n}: {self[n].help}" for n in self)


# Every method of every study; `experiments.methods` registers the ViT's
# builders (task "vit"), `experiments.lm.methods` the language model's ("lm").
METHODS = Registry(CATALOGUE)
