"""TensorBoard logging of the error map and multipliers (tensorboardX)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rgft_jax._transform import residual_error_state


class ErrorMapWriter:
  """Writes RGFT's EMA error map and multipliers every `every` steps.

  Reads them from the optimizer state with `rgft_jax.residual_error_state`,
  so it works with any chain that contains RGFT exactly once. Each
  component gets scalars `error_map/<name>` and `alpha/<name>`; the multipliers
  also go in a histogram `alpha`.

  Args:
    writer: a `tensorboardX.SummaryWriter` (or anything with `add_scalar` and
      `add_histogram`).
    names: the component names (`Components.names`).
    every: log when `step % every == 0`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import rgft_jax
    >>> from rgft_jax.tensorboard import ErrorMapWriter
    >>> class Recorder:
    ...   def __init__(self): self.seen = []
    ...   def add_scalar(self, tag, value, step): self.seen.append((tag, value, step))
    ...   def add_histogram(self, tag, values, step): pass
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> comps = rgft_jax.Components.from_regex(params, [(r"(\\w)", r"\\1")])
    >>> tx = rgft_jax.scale_by_residual_error(comps, thresh=0.5)
    >>> _, state = tx.update(params, tx.init(params), error_map={"a": 1.0, "b": 0.1})
    >>> recorder = Recorder()
    >>> ErrorMapWriter(recorder, comps.names, every=10)(10, state)
    True
    >>> tag, value, step = recorder.seen[-1]
    >>> tag, round(value, 6), step
    ('alpha/b', 0.2, 10)
  """

  def __init__(self, writer: Any, names: Sequence[str], every: int = 10):
    if every < 1:
      raise ValueError(f"every must be at least 1, got {every}.")
    self.writer = writer
    self.names = tuple(names)
    self.every = every

  def __call__(self, step: int, opt_state: Any) -> bool:
    """Logs at `step` if it is due; returns whether it did.

    Raises:
      ValueError: if `opt_state` holds no RGFT state (from `rgft()` or
        `scale_by_residual_error`), or more than one, or its number of
        components is not the number of names.
    """
    if step % self.every:
      return False
    state = residual_error_state(opt_state)
    ema = np.asarray(jax.device_get(state.ema))
    alpha = np.asarray(jax.device_get(state.alpha))
    if ema.shape != (len(self.names),) or alpha.shape != ema.shape:
      raise ValueError(
        f"The optimizer state's EMA error map has shape {ema.shape} and its "
        f"multipliers {alpha.shape}; the writer was given {len(self.names)} names."
      )
    for name, e, a in zip(self.names, ema, alpha, strict=True):
      self.writer.add_scalar(f"error_map/{name}", float(e), step)
      self.writer.add_scalar(f"alpha/{name}", float(a), step)
    self.writer.add_histogram("alpha", alpha, step)
    return True
