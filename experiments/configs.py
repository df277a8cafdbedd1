"""The settings several studies share, each declared once with its --help.

A study's `Config` inherits the sub-configs it uses, so their fields stay flat
(one flag each, the comment its help text); a study whose default differs
redeclares the field with its own default and no comment. Each study module
has `get_config(arg)`, as big_vision's configs do: `arg` is one of `ARGS`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import rgft_jax
from experiments import cli
from experiments import frozen

# What every study's `get_config(arg)` takes: "" its defaults, "quick" the
# tiny settings of a smoke run (tests, notebooks, CI).
ARGS = ("", "quick")


def check_arg(arg: str) -> None:
  """Raises ValueError naming `ARGS` unless `arg` is one of them."""
  if arg not in ARGS:
    raise ValueError(
      f"Unknown config {arg!r}; --config takes one of {', '.join(map(repr, ARGS))}."
    )


@dataclasses.dataclass(frozen=True)
class RgftConfig:
  """RGFT's own settings (`rgft_jax.rgft`)."""

  beta: float = 0.9  # RGFT: EMA decay of the error map.
  thresh_init: float = 0.1  # RGFT: threshold at the first step.
  thresh_final: float = 0.3  # RGFT: threshold at the end of its warmup.
  min_scale: float = 0.01  # RGFT: smallest multiplier.
  # Every method's Adam: bias correction by the run's step count ("global",
  # optax's) or by each parameter entry's own ("per_entry": held parameters
  # resume where they left off).
  adam_count: str = "global"

  def rgft_tx(
    self,
    learning_rate: float,
    components: rgft_jax.Components,
    warmup_steps: int,
    min_scale: float | None = None,
  ):
    """`rgft_jax.rgft` with these settings (`min_scale` in place of this
    one's if given: 1 is Adam that still measures the error map), the
    learning rate in its state (`frozen.injected`)."""
    scale = self.min_scale if min_scale is None else min_scale
    return frozen.injected(
      lambda rate: rgft_jax.rgft(
        rate,
        components,
        beta=self.beta,
        thresh_init=self.thresh_init,
        thresh_final=self.thresh_final,
        warmup_steps=warmup_steps,
        min_scale=scale,
        adam_count=self.adam_count,
      ),
      learning_rate,
    )

  def validate(self) -> None:
    """Raises ValueError naming the flags, from RGFT's own checks."""
    if self.adam_count not in frozen.ADAM_COUNTS:
      raise ValueError(
        f"--adam_count must be one of {frozen.ADAM_COUNTS}, got {self.adam_count!r}."
      )
    try:  # RGFT's own checks, on a one-parameter stand-in.
      stand_in = {"w": np.zeros(1, np.float32)}
      rgft_jax.rgft(
        1e-3,
        rgft_jax.Components.from_regex(stand_in, [(r"w", "w")]),
        beta=self.beta,
        thresh_init=self.thresh_init,
        thresh_final=self.thresh_final,
        min_scale=self.min_scale,
        adam_count=self.adam_count,
      )
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"RGFT flags (--beta, --thresh_*, --min_scale, --adam_count): {e}"
      ) from None


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
  """How budgeted RGFT and its peers decide what a step trains."""

  budget_every: int = 20  # Budgeted RGFT: steps between decisions.
  # Budgeted RGFT: bonus of the components trained now ("top").
  budget_hysteresis: float = 0.1
  gate_recompute: bool = True  # Run-time gating: gated branches keep no residuals.
  greentrainer_period: float = 0.4  # GreenTrainer: re-selects every this part of a run.

  def validate(self) -> None:
    """Raises ValueError naming the flag and its allowed range."""
    cli.check_integers(self, {"budget_every": 1})
    h = self.budget_hysteresis
    if not (_number(h) and math.isfinite(h) and h >= 0):
      raise ValueError(f"--budget_hysteresis must be finite and >= 0, got {h}.")
    g = self.greentrainer_period
    if not (_number(g) and math.isfinite(g) and 0 < g <= 1):
      raise ValueError(f"--greentrainer_period must be in (0, 1], got {g}.")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  """The baselines' knobs."""

  lora_rank: int = 4  # LoRA: rank of the factors.
  lisa_layers: int = 1  # LISA: blocks (layers) trained at a time.
  lisa_period: int = 20  # LISA: steps between redraws.

  def validate(self) -> None:
    """Raises ValueError naming the flag and its allowed range."""
    cli.check_integers(self, {"lora_rank": 1, "lisa_layers": 1, "lisa_period": 1})


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Which seeds a study reports, what it logs and where it writes."""

  seeds: int = 5  # Seeds 0..seeds-1 reported (data order, inits, random draws).
  # Budgeted methods tuned at this budget only, their rate reused at the
  # others (0: every name@b tuned on its own).
  tune_budget: float = 0.0
  log_every: int = 10  # Loss and error map logged every this many steps.
  eval_every: int = 20  # Validation score every this many steps (0: never).
  workdir: str = "workdir"  # Results, runs, caches and logs.
  progress: bool = True  # Print progress.

  def validate(self) -> None:
    """Raises ValueError naming the flag and its allowed range."""
    cli.check_integers(self, {"seeds": 1, "log_every": 1, "eval_every": 0})
    if not self.workdir.strip():
      raise ValueError("--workdir must name a directory, got an empty string.")
    if self.tune_budget:
      cli.parse_budget("--tune_budget", str(self.tune_budget))


def _number(x) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)
