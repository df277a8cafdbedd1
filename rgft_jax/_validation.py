"""Eager checks of hyperparameters that may also arrive as traced arrays.

Under `optax.inject_hyperparams` the factories are called with arrays, and under
`jax.jit` with tracers; only values known now are checked.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def concrete(value: Any) -> float | None:
  """The value as a Python float, or None if it is not known yet (traced)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
  except (TypeError, jax.errors.TracerArrayConversionError):
    return None
  if array.shape != ():
    raise ValueError(f"Expected a scalar hyperparameter, got shape {array.shape}.")
  return float(array)


def in_range(
  name: str,
  value: Any,
  low: float | None,
  high: float | None,
  *,
  low_open: bool = False,
  high_open: bool = False,
) -> None:
  """Raises ValueError unless `value` lies in the interval (if known)."""
  v = concrete(value)
  if v is None:
    return
  too_low = low is not None and (v <= low if low_open else v < low)
  too_high = high is not None and (v >= high if high_open else v > high)
  if too_low or too_high or np.isnan(v):
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {v}.")


def ordered(name_a: str, a: Any, name_b: str, b: Any) -> None:
  """Raises ValueError if both values are known and `a > b`."""
  va, vb = concrete(a), concrete(b)
  if va is not None and vb is not None and va > vb:
    raise ValueError(f"{name_a} ({va}) must not exceed {name_b} ({vb}).")
