"""Policies: what each step of a run leaves out (LISA's blocks, budgeted RGFT's branches)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np

import rgft_jax

_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/")


class Policy:
  """Chooses each step's variant: what the compiled step leaves out (nothing here)."""

  def prepare(self, step: int, tree: Any, opt_state: Any, batch: Any) -> None:
    """Called before `variant(step, ...)` with what the step trains on; a
    policy that measures the model itself (DropBP's sensitivity,
    GreenTrainer's importance) does it here."""
    del step, tree, opt_state, batch

  def variant(self, step: int, opt_state: Any) -> frozenset[str]:
    del step, opt_state
    return frozenset()

  def spend(self, step: int, variant: frozenset[str]) -> None:
    del step, variant

  def reset(self) -> None:
    """Back to the start of a run."""

  def state_dict(self) -> dict[str, Any]:
    return {}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    del state

  def variant_name(self, variant: frozenset[str]) -> str:
    """`all` when nothing is left out, else what is (components or paths)."""
    if not variant:
      return "all"
    return ",".join(sorted(n.replace("Transformer/", "") for n in variant))

  def record(self) -> dict[str, Any]:
    """What the run's record adds about the policy."""
    return {}


@dataclasses.dataclass
class LisaPolicy(Policy):
  """LISA: `active` random layers trained, redrawn every `period` steps.

  `layers` maps each layer's label (`encoderblock_3`, `layers/3`) to what
  a step leaves out when it holds that layer (parameter paths, or a prefix
  the step holds everything under); the variant is that of every layer not
  drawn. What belongs to no layer (embedding, final norm, head) is always
  trained.
  """

  layers: dict[str, frozenset[str]]
  active: int
  period: int
  seed: int

  def __post_init__(self):
    if not 1 <= self.active <= len(self.layers):
      raise ValueError(
        f"lisa_layers must be in [1, {len(self.layers)}], got {self.active}."
      )

  def trained(self, step: int) -> tuple[int, ...]:
    """The layers (indices into `layers`) trained at `step`."""
    rng = np.random.default_rng([self.seed, step // self.period])
    drawn = rng.choice(len(self.layers), size=self.active, replace=False)
    return tuple(sorted(drawn.tolist()))

  def variant(self, step, opt_state):
    del opt_state
    trained = self.trained(step)
    held = [v for i, v in enumerate(self.layers.values()) if i not in trained]
    return frozenset().union(*held)

  def variant_name(self, variant):
    """The held layers' labels (`encoderblock_0,...`), or `all`."""
    return super().variant_name(
      frozenset(label for label, v in self.layers.items() if v and v <= variant)
    )


@dataclasses.dataclass
class BudgetPolicy(Policy):
  """A `Budget`'s choice: the variant is the set of detached components.

  The budget decides from RGFT's EMA error map in the optimizer state, or,
  with `scores`, from `scores(tree, opt_state, batch)` at each decision
  (GreenTrainer's importance). With `sensitivity`, a `"dropbp"` budget's
  rates are allocated from `sensitivity(tree, opt_state, batch)`. Both
  return `(values, flops)`; the FLOPs are charged to the budget
  (`Budget.charge`; `probe_flops` reads them back, resumed runs included).
  """

  budget: rgft_jax.Budget
  scores: Any = None
  sensitivity: Any = None

  def __post_init__(self):
    self._scores = None

  @property
  def probe_flops(self) -> float:
    """FLOPs spent measuring the model outside the steps, so far."""
    return self.budget.charged

  def prepare(self, step, tree, opt_state, batch):
    if self.budget.wants_sensitivity(step):
      values, flops = self.sensitivity(tree, opt_state, batch)
      self.budget.allocate(values)
      self.budget.charge(flops)
    if self.scores is not None and self.budget.due(step):
      self._scores, flops = self.scores(tree, opt_state, batch)
      self.budget.charge(flops)

  def variant(self, step, opt_state):
    if self.budget.due(step):  # The only host read of the error map.
      if self.scores is not None:
        self.budget.decide(step, self._scores)
      else:
        ema = rgft_jax.residual_error_state(opt_state).ema
        self.budget.decide(step, jax.device_get(ema))
    return self.budget.variant(step)

  def spend(self, step, variant):
    self.budget.spend(step, variant)

  def reset(self):
    self.budget.reset()
    self._scores = None

  def state_dict(self):
    return self.budget.state_dict()

  def load_state_dict(self, state):
    self.budget.load_state_dict(state)

  def record(self):
    return {
      "budget": {
        "target": self.budget.budget,
        "planned_fraction": self.budget.fraction,
        "decisions": self.budget.decisions,
      }
    }


def block_layers(paths) -> dict[str, frozenset[str]]:
  """`encoderblock_<i>` -> the paths under it, for each ViT block in order."""
  blocks: dict[int, set[str]] = {}
  for p in paths:
    if (m := _BLOCK.match(p)) is not None:
      blocks.setdefault(int(m.group(1)), set()).add(p)
  return {f"encoderblock_{i}": frozenset(blocks[i]) for i in sorted(blocks)}
