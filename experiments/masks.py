"""Fixed entry masks for the sparsification baselines, and the transform that holds them.

A masked method trains `round(fraction * S)` of the `S` entries its
components own (RGFT's block branches), chosen once at the start, plus every
parameter in no component (embedding, class token, position embedding, final
norm, head), which RGFT never scales either. The rest are held: their
gradient is zeroed before the optimizer (so Adam's moments stay at their
initial zeros) and the step writes their old values back, bit for bit.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rgft_jax
from experiments.trees import flat
from experiments.trees import unflat


def owned(components: rgft_jax.Components, params: Any) -> dict[str, np.ndarray]:
  """Per path of `params`, a bool array: True where the entry is in a component."""
  index = flat(components.index)
  return {
    p: np.broadcast_to(np.asarray(index[p]) >= 0, np.shape(v)).copy()
    for p, v in flat(params).items()
  }


def trained_count(fraction: float, size: int) -> int:
  """Entries of `size` a mask of `fraction` trains: `round(fraction * size)`."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"The trained fraction must be in (0, 1], got {fraction}.")
  return round(fraction * size)


def _held(candidates: dict[str, np.ndarray], chosen: np.ndarray) -> Any:
  """Held masks: the candidate entries not `chosen`.

  `chosen` indexes the candidate entries concatenated in sorted path order,
  C order within a leaf.
  """
  trained = np.zeros(sum(int(c.sum()) for c in candidates.values()), bool)
  trained[chosen] = True
  out, start = {}, 0
  for path in sorted(candidates):
    c = candidates[path]
    keep = np.zeros(c.shape, bool)
    keep[c] = trained[start : start + int(c.sum())]
    out[path] = c & ~keep
    start += int(c.sum())
  return unflat(out)


def random_mask(
  components: rgft_jax.Components, params: Any, fraction: float, seed: int
) -> Any:
  """Held entries of a uniformly random mask training `fraction` of the components'.

  Returns a tree like `params` of bool arrays, True where an entry is held.
  """
  candidates = owned(components, params)
  size = sum(int(c.sum()) for c in candidates.values())
  k = trained_count(fraction, size)
  chosen = np.random.default_rng([seed, 7]).choice(size, k, replace=False)
  return _held(candidates, chosen)


def magnitude_mask(
  components: rgft_jax.Components, params: Any, fraction: float
) -> Any:
  """Held entries of the mask training the largest `|theta|` among the components'.

  The `round(fraction * S)` component entries of largest magnitude are
  trained (ties go to the earlier entry, in sorted path order and C order);
  returns a tree like `params` of bool arrays, True where an entry is held.
  """
  candidates = owned(components, params)
  leaves = flat(params)
  values = np.concatenate(
    [np.abs(np.asarray(leaves[p]))[candidates[p]] for p in sorted(candidates)]
  )
  k = trained_count(fraction, values.size)
  chosen = np.argsort(-values, kind="stable")[:k]
  return _held(candidates, chosen)


class HeldEntriesState(NamedTuple):
  """State of `hold_entries`: the mask itself (per seed, so steps can be shared)."""

  held_entries: Any  # Like the parameters, bool: True where the entry is held.


def hold_entries(held: Any) -> optax.GradientTransformation:
  """Zeroes the updates of the entries `held` marks (a tree of bool arrays).

  Put first in a chain, it zeroes gradients, so Adam's moments of held
  entries stay at zero. The mask lives in the state; `held_entries(state)`
  finds it.
  """
  held = jax.tree.map(lambda m: jnp.asarray(m, bool), held)

  def init_fn(params):
    del params
    return HeldEntriesState(held)

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(
      lambda u, m: jnp.where(m, jnp.zeros_like(u), u), updates, state.held_entries
    )
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def held_entries(opt_state: Any) -> Any | None:
  """The mask of the `hold_entries` inside `opt_state`, or None if there is none."""
  return optax.tree.get(opt_state, "held_entries")
