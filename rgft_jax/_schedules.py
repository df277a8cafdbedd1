"""Threshold schedules for the RGFT multipliers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rgft_jax import _validation


def linear_threshold(
  thresh_init: float = 0.1,
  thresh_final: float = 0.3,
  warmup_steps: int = 1000,
) -> optax.Schedule:
  """Threshold that grows linearly from `thresh_init` to `thresh_final`.

  `thresh_t = thresh_init + (thresh_final - thresh_init) * min(1, t / warmup_steps)`,
  with `t` the number of updates already applied; `warmup_steps = 0` gives
  `thresh_final` from the start.

  Args:
    thresh_init: threshold at `t = 0`, in (0, 1].
    thresh_final: threshold from `t = warmup_steps` on, in [thresh_init, 1].
    warmup_steps: number of updates over which the threshold grows, an
      integer >= 0.

  Returns:
    An `optax.Schedule` mapping the update count to the threshold.

  Examples:
    >>> import rgft_jax
    >>> schedule = rgft_jax.linear_threshold(0.1, 0.3, warmup_steps=10)
    >>> [round(float(schedule(t)), 3) for t in (0, 5, 10, 20)]
    [0.1, 0.2, 0.3, 0.3]
  """
  _validation.in_range("thresh_init", thresh_init, 0.0, 1.0, low_open=True)
  _validation.in_range("thresh_final", thresh_final, 0.0, 1.0, low_open=True)
  _validation.ordered("thresh_init", thresh_init, "thresh_final", thresh_final)
  _validation.in_range("warmup_steps", warmup_steps, 0, None, integer=True)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    steps = jnp.asarray(warmup_steps, jnp.float32)
    frac = jnp.where(steps > 0, jnp.minimum(count / jnp.maximum(steps, 1.0), 1.0), 1.0)
    return thresh_init + (thresh_final - thresh_init) * frac

  return schedule
