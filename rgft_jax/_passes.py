"""The passes that measure: loss, gradients and the error map in one go.

`cheap` runs one backward pass with a probe on every measured tap
(norm_product, taylor); `ablation` adds one forward pass per component with
its output zeroed. Both detach what they are told to, and carry per-layer
values (probes, masks) into scans as extra parameter leaves (`embed`).

What is detached comes in one of two forms. A frozenset of names is static:
the detached outputs go behind `stop_gradient` and XLA removes their backward
passes from the compiled program (a per-layer set inside a scan is a mask and
saves nothing). A `Runtime` holds one traced flag per component: each tapped
call runs through `rgft_jax._gate.gated`, whose backward pass runs only when
its flag is clear, inside scans too (heads, which share one computation with
the other heads of their attention, are masked).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rgft_jax._attribution import cheap_map
from rgft_jax._attribution import probe
from rgft_jax._attribution import stats_shape
from rgft_jax._collectives import Abstract
from rgft_jax._discovery import columns
from rgft_jax._gate import gated
from rgft_jax._intercept import Embed
from rgft_jax._intercept import Tap


@dataclasses.dataclass(frozen=True)
class Runtime:
  """Components detached at run time: a traced boolean flag per name.

  Attributes:
    flags: component name -> boolean scalar (traced).
    recompute: gated calls keep no residuals (see `rgft_jax._gate`).
  """

  flags: dict[str, jax.Array]
  recompute: bool = False

  def flag(self, name: str) -> jax.Array:
    return self.flags.get(name, jnp.zeros((), bool))


Detached = frozenset[str] | Runtime


def _stacked_table(tap: Tap, value) -> np.ndarray:
  """`[L, C]` of `value(name)` over the columns of a tap inside a scan."""
  assert tap.layers is not None
  table = np.zeros((tap.layers, tap.heads or 1), np.float32)
  for name, layer, col in columns(tap):
    table[layer, col] = value(name)
  return table


def _flag_table(tap: Tap, runtime: Runtime) -> jax.Array:
  """`[L, C]` float32 of the tap's flags inside a scan (1: detached)."""
  assert tap.layers is not None
  rows: list[list[Any]] = [[None] * (tap.heads or 1) for _ in range(tap.layers)]
  for name, layer, col in columns(tap):
    rows[layer][col] = runtime.flag(name)  # type: ignore[index]  # In a scan.
  return jnp.asarray(jnp.stack([jnp.stack(r) for r in rows]), jnp.float32)


def _embed(taps, detached: Detached, **per_tap: dict[Tap, Any]) -> Embed:
  """Leaves for the taps inside scans: detach masks and the given `per_tap` ones."""
  embed: Embed = {}
  for tap in taps:
    if tap.layers is None:
      continue
    leaves = {tap.key(k): v[tap] for k, v in per_tap.items() if tap in v}
    if isinstance(detached, Runtime):
      leaves[tap.key("detach")] = _flag_table(tap, detached)
    else:
      mask = _stacked_table(tap, lambda n: n in detached)
      if 0 < mask.sum() < mask.size:
        leaves[tap.key("detach")] = mask
    if leaves:
      embed.setdefault(tap.site, {}).update(leaves)
  return embed


def _masked(tap: Tap, value: Any, mask) -> Any:
  """`value` behind `stop_gradient` where `mask` (per head, or `[1]`) is set."""
  mask = mask[:, None] if tap.heads is not None else mask[0]  # Heads on axis -2.
  return tap.per_head(
    lambda value: jax.tree.map(
      lambda v: jnp.where(mask, jax.lax.stop_gradient(v), v), value
    ),
    value,
  )


def _detach(tap: Tap, value: Any, read, detached: Detached) -> Any:
  """`value` with the outputs of `detached` components behind `stop_gradient`.

  With a `Runtime`, whole outputs were gated around their call (`around`);
  heads, and one part of a call's output (the rest may carry gradients
  elsewhere), are masked by their flags.
  """
  if isinstance(detached, Runtime):
    if tap.heads is None and tap.leaf is None:
      return value
    if tap.layers is None:
      mask = jnp.stack([detached.flag(name) for name, _, _ in columns(tap)])
    else:
      mask = read(tap.key("detach")) > 0
    return _masked(tap, value, mask)
  cols = [(layer, col) for name, layer, col in columns(tap) if name in detached]
  if not cols:
    return value
  if len(cols) == len(columns(tap)):
    return jax.tree.map(jax.lax.stop_gradient, value)
  if tap.layers is None:  # Some heads (a whole output has one column).
    assert tap.heads is not None
    heads = np.zeros(tap.heads, np.bool_)
    heads[[col for _, col in cols]] = True
    return _masked(tap, value, heads)
  return _masked(
    tap, value, read(tap.key("detach")) > 0
  )  # This layer's slice of the mask.


def around(detached: Detached):
  """`around(tap, fn, args, read)` running a whole-output tap's call gated by
  its runtime flag; None for a static set (nothing to wrap)."""
  if not isinstance(detached, Runtime):
    return None

  def call(tap: Tap, fn, args, read):
    if tap.leaf is not None:  # Part of the output: masked in `_detach`.
      return fn(*args)
    if tap.layers is None:
      (name, _, _), *more = columns(tap)
      assert not more, tap
      flag = detached.flag(name)
    else:
      flag = read(tap.key("detach"))[0] > 0
    return gated(fn, flag, *args, recompute=detached.recompute)

  return call


def cheap(method, run, has_aux, recorded, measured, params, detached, batch=None):
  """Loss, gradients and the norm_product/taylor map in one backward pass
  (`batch`: the batch size, where some taps flatten other axes into it)."""
  measured = set(measured)
  plain = [(tap, v) for tap, v in recorded if tap in measured and tap.layers is None]
  stacked = list(dict.fromkeys(t for t, _ in recorded if t in measured and t.layers))
  first = {}
  for tap, v in recorded:
    first.setdefault(tap, v)

  def stats_zeros(tap, value, lead=()):
    vma = jax.tree.leaves(value, is_leaf=lambda x: isinstance(x, Abstract))[0].vma
    return Abstract(lead + stats_shape(tap, value), jnp.float32, vma).zeros()

  def perturbed(params, probes):
    plain_probes, stacked_probes = probes
    it = iter(plain_probes)
    by_tap = dict(zip(stacked, stacked_probes, strict=True))

    def visit(tap, value, read):
      value = _detach(tap, value, read, detached)
      if tap not in measured:
        return value
      if tap.layers is None:
        s = next(it, None)
        if s is None:
          raise RuntimeError(
            f"{'/'.join(tap.path)!r} was called more often than when the "
            "taps were recorded; the loss function must call the model the "
            "same way every time."
          )
      else:
        s = read(tap.key("probe"))
      return tap.per_head(
        lambda v: probe(v, s, tap.heads, inner=method == "taylor"), value
      )

    embed = _embed(first, detached, probe=by_tap)
    out, state = run(params, visit, embed, around=around(detached))
    loss, aux = out if has_aux else (out, None)
    return loss, (aux, state)

  zeros = (
    [stats_zeros(tap, v) for tap, v in plain],
    [stats_zeros(tap, first[tap], (tap.layers,)) for tap in stacked],
  )
  (loss, (aux, state)), (grads, (d_plain, d_stacked)) = jax.value_and_grad(
    perturbed, argnums=(0, 1), has_aux=True
  )(params, zeros)
  stats = [(tap, s) for (tap, _), s in zip(plain, d_plain, strict=True)]
  stats += list(zip(stacked, d_stacked, strict=True))
  return (loss, aux), grads, cheap_map(method, stats, batch), state


def ablation(run, has_aux, recorded, taps, params, detached):
  """Loss, gradients and the exact `L - L(component output zeroed)` map."""
  names = list(dict.fromkeys(name for tap in taps for name, _, _ in columns(tap)))
  position = {name: i for i, name in enumerate(names)}
  known = set(taps)

  def masked_loss(params, keep):
    def visit(tap, value, read):
      value = _detach(tap, value, read, detached)
      if tap not in known:
        return value
      if tap.layers is None:
        k = keep[np.array([position[name] for name, _, _ in columns(tap)])]
      else:
        k = read(tap.key("keep"))

      def scale(v):
        if tap.heads is None:
          return v * k[0].astype(v.dtype)
        shape = (1,) * (v.ndim - 2) + (tap.heads, 1)  # Along the head axis.
        return v * k.reshape(shape).astype(v.dtype)

      return tap.per_head(lambda value: jax.tree.map(scale, value), value)

    keeps = {
      tap: keep[_stacked_table(tap, position.__getitem__).astype(np.int32)]
      for tap in taps
      if tap.layers is not None
    }
    embed = _embed(dict.fromkeys(t for t, _ in recorded), detached, keep=keeps)
    out, state = run(params, visit, embed, around=around(detached))
    loss, aux = out if has_aux else (out, None)
    return loss, (aux, state)

  ones = jnp.ones(len(names), jnp.float32)
  (loss, (aux, state)), grads = jax.value_and_grad(
    lambda p: masked_loss(p, ones), has_aux=True
  )(params)
  # The ablated forwards' state changes are dropped: only the full call counts.
  ablated = jax.lax.map(
    lambda keep: masked_loss(params, keep)[0], 1.0 - jnp.eye(len(names))
  )
  diffs = jnp.asarray(loss, jnp.float32) - ablated.astype(jnp.float32)
  error_map = {name: diffs[i] for i, name in enumerate(names)}
  return (loss, aux), grads, error_map, state
