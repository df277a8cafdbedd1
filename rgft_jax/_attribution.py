"""Per-example attribution statistics, collected in the backward pass.

A measured tap's value `h` goes through `probe(h, s)`, an identity whose
backward pass also returns, as the cotangent of the zero array `s`, three
statistics per example and column (head): `||g||^2`, `||h||^2` (taken in the
forward pass) and, for taylor, `<g, h>`, where `g = dL/dh` of the batch-mean
loss. Nothing is carried out of the traced
function but gradients, so taps work inside `jax.checkpoint` (remat) and, with
`s` a slice of a stacked leaf, inside a scan over layers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rgft_jax._discovery import columns
from rgft_jax._intercept import Tap

METHODS = ("norm_product", "taylor", "ablation")
STATS = 3  # ||g||^2, ||h||^2, <g, h>.


def _per_example(x: jax.Array, heads: int | None) -> jax.Array:
  """`[B, C]` sums over all axes but the batch (and the head axis, -2)."""
  if heads is None:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)[:, None]
  x = jnp.moveaxis(x, -2, 1)
  return jnp.sum(x.reshape(x.shape[0], x.shape[1], -1), axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _probe(leaves, s, heads, inner):
  del s, heads, inner
  return leaves


def _probe_fwd(leaves, s, heads, inner):
  del s
  hs = [jnp.asarray(x, jnp.float32) for x in leaves]
  hh = sum(_per_example(x * x, heads) for x in hs)
  # Keep the value itself only when the backward pass needs <g, h>: a branch
  # output feeding an add is otherwise not kept for the backward pass at all.
  return leaves, (hh, leaves if inner else None)


def _probe_bwd(heads, inner, residuals, g):
  hh, leaves = residuals
  gs = [jnp.asarray(x, jnp.float32) for x in g]
  gg = sum(_per_example(x * x, heads) for x in gs)
  if inner:
    hs = [jnp.asarray(x, jnp.float32) for x in leaves]
    gh = sum(_per_example(x * y, heads) for x, y in zip(gs, hs, strict=True))
  else:
    gh = jnp.zeros_like(gg)
  return g, jnp.stack([gg, hh, gh], axis=-1)


_probe.defvjp(_probe_fwd, _probe_bwd)


def probe(value: Any, s: jax.Array, heads: int | None, inner: bool = True) -> Any:
  """`value`, whose backward pass writes the statistics into `s`'s cotangent.

  With `inner=False` the inner product `<g, h>` is left at zero (norm_product
  needs only the norms), so `h` is not kept for the backward pass.
  """
  leaves, treedef = jax.tree.flatten(value)
  return jax.tree.unflatten(treedef, list(_probe(tuple(leaves), s, heads, inner)))


def stats_shape(tap: Tap, value: Any) -> tuple[int, ...]:
  """Shape of the statistics of one call of `tap` on `value` (per layer)."""
  batch = jax.tree.leaves(value)[0].shape[0]
  return (batch, tap.heads or 1, STATS)


def cheap_map(
  method: str, stats: Sequence[tuple[Tap, jax.Array]], batch: int | None = None
) -> dict[str, jax.Array]:
  """The batch's error map from each measured call's statistics.

  `stats` holds `(tap, s)` with `s` of shape `[B, C, 3]`, or `[L, B, C, 3]`
  for a tap inside a scan. With a batch-mean loss of B examples, the
  per-example gradient is `B g`: norm_product is `B ||g_b|| ||h_b||` and
  taylor `|B <g_b, h_b>|`, summed over a component's calls, then averaged
  over the batch. With `batch` given, a tap whose leading axis is a multiple
  of it has other axes flattened into the batch, batch-major (`[B * T, D]`):
  each example's rows are summed first (`||g_b||^2` is the sum over its
  rows), so it is measured per example too.
  """
  per_example: dict[str, jax.Array] = {}
  for tap, s in stats:
    b = s.shape[-3]
    if batch is not None and b != batch and b % batch == 0:
      s = s.reshape((*s.shape[:-3], batch, b // batch, *s.shape[-2:])).sum(-3)
      b = batch
    if batch is not None and b != batch:
      raise ValueError(
        f"Tapped outputs disagree on the batch size (leading axis): "
        f"{'/'.join(tap.path)} has {b}, an earlier tap has {batch}."
      )
    batch = b
    for name, layer, col in columns(tap):
      gg, hh, gh = jnp.moveaxis((s if layer is None else s[layer])[:, col], -1, 0)
      if method == "norm_product":
        val = jnp.sqrt(gg) * jnp.sqrt(hh) * b
      else:
        val = gh * b
      prev = per_example.get(name)
      per_example[name] = val if prev is None else prev + val
  if method == "taylor":
    per_example = {k: jnp.abs(v) for k, v in per_example.items()}
  return {k: jnp.mean(v) for k, v in per_example.items()}
