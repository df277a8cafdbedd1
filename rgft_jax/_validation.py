"""Eager checks of hyperparameters that may also arrive as traced arrays.

Under `optax.inject_hyperparams` the factories are called with arrays, and under
`jax.jit` with tracers; only values known now are checked. Every error names
the hyperparameter.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _type_name(value: Any) -> str:
  return type(value).__name__


def _float32(v: float) -> float:
  """`v` rounded to float32 (an infinity past its range), without a warning."""
  with np.errstate(over="ignore"):
    return float(np.float32(v))


def number(
  name: str, value: Any, *, integer: bool = False, finite: bool = False
) -> float | None:
  """`value` as a Python float after checking it is a real scalar, or None if traced.

  Raises TypeError for anything but a real number or a real scalar array
  (strings, bools, None, complex numbers), ValueError for an array that is not
  a scalar, for NaN, and for a non-integral value when `integer`. With
  `finite` (implied by `integer`), a value that float32 cannot hold (an
  infinity, or beyond about 3.4e38) is a ValueError too.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
    raise TypeError(f"{name} must be a real number, got {value!r}.")
  if isinstance(value, int) and abs(value) > 2.0**128:  # Past float64's ints too.
    raise ValueError(f"{name} must be finite in float32, got {value}.")
  try:
    array = np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    return None
  except TypeError as e:
    raise TypeError(f"{name} must be a real number, got {_type_name(value)}.") from e
  if array.dtype == np.bool_ or not (
    np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
  ):
    raise TypeError(
      f"{name} must be a real number, got {_type_name(value)} of dtype {array.dtype}."
    )
  if array.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {array.shape}.")
  v = float(array)
  if np.isnan(v):
    raise ValueError(f"{name} must not be NaN.")
  if (finite or integer) and not np.isfinite(_float32(v)):
    raise ValueError(f"{name} must be finite in float32, got {v}.")
  if integer and v != int(v):
    raise ValueError(f"{name} must be an integer, got {v}.")
  return v


def in_range(
  name: str,
  value: Any,
  low: float | None,
  high: float | None,
  *,
  low_open: bool = False,
  high_open: bool = False,
  integer: bool = False,
  finite: bool = False,
) -> None:
  """Raises unless `value` is a real number in the interval (if known).

  TypeError for a value that is not a real number, ValueError for NaN, a
  value outside the interval, or (with `finite`) an infinity.
  """
  v = number(name, value, integer=integer, finite=finite)
  if v is None:
    return
  too_low = low is not None and (v <= low if low_open else v < low)
  too_high = high is not None and (v >= high if high_open else v > high)
  # Inside an open bound, but on it once it is a float32.
  f32 = _float32(v)
  rounds = (low is not None and low_open and f32 <= low) or (
    high is not None and high_open and f32 >= high
  )
  if too_low or too_high or rounds:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    note = f" ({f32} in float32)" if rounds and not (too_low or too_high) else ""
    raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {v}{note}.")


def ordered(name_a: str, a: Any, name_b: str, b: Any) -> None:
  """Raises ValueError if both values are known and `a > b`."""
  va, vb = number(name_a, a), number(name_b, b)
  if va is not None and vb is not None and va > vb:
    raise ValueError(f"{name_a} ({va}) must not exceed {name_b} ({vb}).")


def scalar_or_schedule(name: str, value: Any, low: float = 0.0) -> None:
  """Checks a hyperparameter that is a real number >= `low` or a schedule.

  A callable is taken as a schedule (checked when it runs); a known number
  must be finite.
  """
  if callable(value):
    return
  v = number(name, value, finite=True)
  if v is not None and v < low:
    raise ValueError(f"{name} must be >= {low}, got {v}.")


def schedule(
  name: str,
  fn: Any,
  counts: Any,
  low: float | None,
  high: float | None,
  *,
  low_open: bool = False,
  high_open: bool = False,
) -> None:
  """Evaluates the schedule `fn` at each update count and checks the values.

  Each value must be a real scalar, finite in float32 and in the interval
  (like the constant it stands for); a value that is traced (the schedule
  made under `jax.jit`) is not checked. The error names the hyperparameter
  and the count. Counts saturate at int32's maximum, like optax's.
  """
  for count in counts:
    count = min(int(count), int(np.iinfo(np.int32).max))
    value = fn(np.int32(count))
    in_range(
      f"{name} (a schedule, at update count {count})",
      value,
      low,
      high,
      low_open=low_open,
      high_open=high_open,
      finite=True,
    )
