"""Values that vary over `shard_map` mesh axes, and reductions over them."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Abstract:
  """Shape, dtype and varying manual axes (inside `shard_map`) of a value."""

  shape: tuple[int, ...]
  dtype: Any
  vma: tuple[str, ...] = ()

  @classmethod
  def of(cls, value) -> Abstract:
    return cls(tuple(value.shape), value.dtype, tuple(sorted(varying(value))))

  def zeros(self) -> jax.Array:
    z = jnp.zeros(self.shape, self.dtype)
    # Varying like the value it goes with, so its gradient is per device.
    return jax.lax.pcast(z, self.vma, to="varying") if self.vma else z


def varying(x) -> frozenset[str]:
  """The manual mesh axes `x` varies over inside `shard_map` (empty outside)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)  # Newer JAX.
  axes = mat.varying if mat is not None else getattr(aval, "vma", ())
  return frozenset(axes or ())


def across(axis_name, loss, grads, error_map):
  """Loss, gradients and error map of the whole batch split over `axis_name`.

  With `shard_map`'s varying-axes checks on (the default), the loss varies
  over the axis and the gradient of a replicated parameter arrives already
  summed over it; with them off, every gradient is the local one.
  """
  axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  size = jax.lax.psum(1, axes)
  checked = set(axes) <= varying(loss)

  def grad(g):
    summed = checked and not set(axes) & varying(g)
    return g / size if summed else jax.lax.pmean(g, axes)

  loss = jax.lax.pmean(loss, axes)
  error_map = {k: jax.lax.pmean(v, axes) for k, v in error_map.items()}
  return loss, jax.tree.map(grad, grads), error_map
