"""Where a soft-RGFT step's error map comes from.

A source is called as `source(loss_fn, params, opt_state, batch)` and returns
`((loss, accuracy), grads, error_map)`, where `loss_fn(params, batch)` returns
`(loss, accuracy)`: `Tracked` measures the map with an `ErrorTracker` (or
anything with its `value_and_grad`), `RandomErrorMap` draws it at random, and
`ShuffledErrorMap` measures it and hands each component another component's
value: the controls that show whether attribution matters.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import rgft_jax

# Attribution methods of `ErrorTracker`, and the random control.
ERROR_METHODS = ("norm_product", "taylor", "ablation", "random", "shuffled")


@dataclasses.dataclass(frozen=True, eq=False)
class Tracked:
  """The tracker's error map; `absolute` feeds `|E_i|` (exact ablation is signed)."""

  tracker: Any
  absolute: bool = False

  def __call__(self, loss_fn, params, opt_state, batch):
    del opt_state
    out, grads, error_map = self.tracker.value_and_grad(loss_fn, has_aux=True)(
      params, batch
    )
    if self.absolute:
      error_map = {k: jnp.abs(v) for k, v in error_map.items()}
    return out, grads, error_map


class RandomMapState(NamedTuple):
  """State of `random_map_seed`: the seed of `RandomErrorMap`'s draws."""

  random_map_seed: jax.Array  # shape=(), dtype=jnp.uint32.


def random_map_seed(seed: int) -> optax.GradientTransformation:
  """Keeps `seed` in the optimizer state (updates pass through unchanged).

  In the state rather than in the step, so the seeds of a study share one
  compiled step.
  """

  def init_fn(params):
    del params
    return RandomMapState(jnp.asarray(seed, jnp.uint32))

  def update_fn(updates, state, params=None):
    del params
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


@dataclasses.dataclass(frozen=True, eq=False)
class RandomErrorMap:
  """A random non-negative map: `U[0, 1)` per component, drawn afresh each step.

  The draw of update `t` (RGFT's count of updates applied) under seed `s` is
  `uniform(fold_in(key(s), t))`, so it does not depend on the batch or the
  parameters, and a resumed run draws the same maps. The seed comes from
  `random_map_seed` in the optimizer state; gradients are plain (no tracker).
  """

  names: tuple[str, ...]

  def __call__(self, loss_fn, params, opt_state, batch):
    out, grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    return out, grads, self.draw(opt_state)

  def draw(self, opt_state: Any) -> dict[str, jax.Array]:
    seed = optax.tree.get(opt_state, "random_map_seed")
    count = rgft_jax.residual_error_state(opt_state).count
    key = jax.random.fold_in(jax.random.key(seed), count)
    values = jax.random.uniform(key, (len(self.names),), jnp.float32)
    return {n: values[i] for i, n in enumerate(self.names)}


@dataclasses.dataclass(frozen=True, eq=False)
class ShuffledErrorMap:
  """The measured map with its values permuted across the components.

  Each step the tracker's map is measured and component `names[i]` gets the
  value of `names[perm[i]]`, with one permutation per run,
  `permutation(key(seed), n)` (the seed from `random_map_seed`). So the EMA
  is RGFT's EMA permuted and the multipliers spread exactly as RGFT's do:
  the control scales as much as RGFT, and only which component gets which
  value is lost.
  """

  tracked: Tracked
  names: tuple[str, ...]

  def __call__(self, loss_fn, params, opt_state, batch):
    out, grads, error_map = self.tracked(loss_fn, params, opt_state, batch)
    return out, grads, self.shuffle(error_map, opt_state)

  def shuffle(self, error_map, opt_state) -> dict[str, jax.Array]:
    values = jnp.stack([error_map[n] for n in self.names])
    seed = optax.tree.get(opt_state, "random_map_seed")
    perm = jax.random.permutation(jax.random.key(seed), len(self.names))
    return {n: values[perm[i]] for i, n in enumerate(self.names)}
