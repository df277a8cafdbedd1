"""Sparse RGFT: components whose multiplier sits at the floor leave the backward pass.

Scaling an update by `min_scale` still computes its gradient. A `Freezer`
turns a long stay at the floor into real savings: the component's parameters
go behind `jax.lax.stop_gradient` in a separately compiled step, so XLA drops
their weight-gradient work (and, once everything below some depth is frozen,
the rest of the backward pass there). Every `refresh_every` steps a full step
measures every component again, and a frozen component whose multiplier has
risen above the floor is trained again.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rgft_jax._components import Components
from rgft_jax._components import path_str
from rgft_jax._validation import in_range

POLICIES = ("any", "prefix")


class Freezer:
  """Decides which components are frozen, and freezes them in a train step.

  Args:
    components: the components `rgft()` scales.
    min_scale: the multiplier floor of that `rgft()`.
    patience: consecutive measured steps at the floor before a component freezes.
    refresh_every: every this many steps, a full step (nothing frozen, every
      component measured) decides which frozen components come back.
    policy: `"any"` freezes every component that qualifies; `"prefix"` only the
      longest run of qualifying components from the input side (in `order`),
      which also ends the backward pass early.
    order: component names from the input side up; default `components.names`
      (the order `ErrorTracker.components` gives).
    stem: a regular expression of parameter paths in no component (an
      embedding, say) that are frozen while the first component in `order` is.
      Without it those parameters keep the backward pass running to the input.
    level: a step counts as "at the floor" when alpha <= `level`; default
      `min_scale` (the multiplier cannot go lower). A higher level freezes
      components that RGFT already updates little but not least.

  A train step built by `train_step` takes the frozen set as a static argument;
  `SparseTrainStep` compiles one variant per frozen set, keeps at most `max_variants`
  of them, and counts compilations. The freezer's own state (how long each
  component has been at the floor, what is frozen) is in `state_dict()` for
  checkpoints.
  """

  def __init__(
    self,
    components: Components,
    *,
    min_scale: float = 0.01,
    patience: int = 20,
    refresh_every: int = 50,
    policy: str = "any",
    order: Sequence[str] | None = None,
    stem: str | None = None,
    level: float | None = None,
  ):
    if policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")
    in_range("min_scale", min_scale, 0.0, 1.0, low_open=True)
    in_range("patience", patience, 1, None)
    in_range("refresh_every", refresh_every, 1, None)
    order = tuple(components.names if order is None else order)
    if sorted(order) != sorted(components.names):
      raise ValueError(
        f"order must list every component once; got {list(order)}, components "
        f"are {list(components.names)}."
      )
    self.components = components
    self.min_scale = float(min_scale)
    self.level = self.min_scale if level is None else float(level)
    in_range("level", self.level, self.min_scale, 1.0)
    self.patience = int(patience)
    self.refresh_every = int(refresh_every)
    self.policy = policy
    self.order = order
    self.stem = None if stem is None else re.compile(stem)
    self.reset()

  def reset(self) -> None:
    """Back to the start: nothing frozen, no step at the floor."""
    self._at_floor = np.zeros(len(self.components), np.int64)
    self._frozen: frozenset[str] = frozenset()

  # Decisions (host side).

  @property
  def frozen(self) -> frozenset[str]:
    """Names of the components frozen now."""
    return self._frozen

  def is_refresh(self, step: int) -> bool:
    return step > 0 and step % self.refresh_every == 0

  def variant(self, step: int) -> frozenset[str]:
    """The frozen set to run step `step` with (empty on refresh steps)."""
    return frozenset() if self.is_refresh(step) else self._frozen

  def observe(self, alpha: Any, variant: frozenset[str]) -> None:
    """Updates the decisions after a step run with `variant`, given its alpha."""
    alpha = np.asarray(alpha)
    if alpha.shape != (len(self.components),):
      raise ValueError(
        f"alpha must have shape ({len(self.components)},), got {alpha.shape}."
      )
    # Compared in float32, as alpha was clipped to min_scale in float32.
    floor = alpha <= np.float32(self.level)
    names = self.components.names
    measured = np.array([n not in variant for n in names])
    self._at_floor = np.where(
      measured, np.where(floor, self._at_floor + 1, 0), self._at_floor
    )
    frozen = set(self._frozen)
    if not variant:  # Every component measured: a frozen one above the floor returns.
      frozen = {n for n in frozen if floor[names.index(n)]}
    ready = frozen | {
      n for n, k in zip(names, self._at_floor, strict=True) if k >= self.patience
    }
    if self.policy == "prefix":
      prefix = []
      for n in self.order:
        if n not in ready:
          break
        prefix.append(n)
      ready = set(prefix)
    self._frozen = frozenset(ready)

  def state_dict(self) -> dict[str, Any]:
    return {"at_floor": self._at_floor.tolist(), "frozen": sorted(self._frozen)}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    at_floor = np.asarray(state["at_floor"], np.int64)
    unknown = set(state["frozen"]) - set(self.components.names)
    if at_floor.shape != (len(self.components),) or unknown:
      raise ValueError(
        "This freezer state was saved for other components: "
        f"{len(at_floor)} counters, unknown names {sorted(unknown)}."
      )
    self._at_floor = at_floor
    self._frozen = frozenset(state["frozen"])

  # Freezing (inside the traced step).

  def _masks(self, tree: Any, frozen: frozenset[str]) -> Any:
    """Per leaf: False (nothing frozen), True (all) or a bool array (some entries)."""
    ids = np.array([i for i, n in enumerate(self.components.names) if n in frozen])
    stem = self.stem is not None and self.order and self.order[0] in frozen

    def mask(path, leaf):
      p = path_str(path)
      idx = self.components._by_path[p]
      m = np.isin(idx, ids)
      if stem and (idx == -1).all() and self.stem.fullmatch(p):
        return True
      if m.all():
        return True
      return bool(m.any()) and np.broadcast_to(m, np.shape(leaf))

    self.components.check(tree)
    return jax.tree_util.tree_map_with_path(mask, tree)

  def stop_gradient(self, params: Any, frozen: frozenset[str]) -> Any:
    """`params` with the entries of `frozen` components behind `stop_gradient`."""

    def sg(leaf, m):
      if m is False:
        return leaf
      if m is True:
        return jax.lax.stop_gradient(leaf)
      return jnp.where(m, jax.lax.stop_gradient(leaf), leaf)

    return jax.tree.map(sg, params, self._masks(params, frozen))

  def hold(
    self,
    tx: optax.GradientTransformation,
    frozen: frozenset[str],
    updates: Any,
    new_state: Any,
    old_state: Any,
  ) -> tuple[Any, Any]:
    """Zero updates and the old optimizer state for the entries of `frozen`.

    Adam's moments (every parameter-shaped part of the state) of a frozen
    entry keep their values, so the component resumes where it left off.
    """
    if not frozen:
      return updates, new_state
    return hold_masked(tx, self._masks(updates, frozen), updates, new_state, old_state)

  def train_step(
    self,
    tracker: Any,
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
  ) -> Callable[..., Any]:
    """`step(params, opt_state, *args, frozen=...) -> (out, params, opt_state, alpha)`.

    One RGFT step with the `frozen` components behind `stop_gradient`, not
    measured (NaN in the error map, so their EMA is kept) and held (no update,
    optimizer state unchanged). `loss_fn(params, *args)` is what the
    tracker's `value_and_grad` takes; `out` is its loss (or `(loss, aux)`).
    Linen models (parameters as a pytree).
    """

    def step(params, opt_state, *args, frozen: frozenset[str] = frozenset()):
      def frozen_loss(p, *a):
        return loss_fn(self.stop_gradient(p, frozen), *a)

      measure = [n for n in self.components.names if n not in frozen]
      out, grads, error_map = tracker.value_and_grad(
        frozen_loss, has_aux=has_aux, measure=measure
      )(params, *args)
      updates, new_state = tx.update(grads, opt_state, params, error_map=error_map)
      updates, new_state = self.hold(tx, frozen, updates, new_state, opt_state)
      alpha = optax.tree.get(new_state, "alpha")
      return out, optax.apply_updates(params, updates), new_state, alpha

    return step


def hold_masked(
  tx: optax.GradientTransformation,
  masks: Any,
  updates: Any,
  new_state: Any,
  old_state: Any,
) -> tuple[Any, Any]:
  """Zero updates and the old optimizer state where `masks` says so.

  `masks` is like the parameters; each leaf is False (keep the new values),
  True (hold the whole leaf) or a bool array broadcastable to the leaf (hold
  those entries). Every parameter-shaped part of `tx`'s state is held the same
  way; the rest of the state (counts, RGFT's error map) moves on.
  """

  def zero(u, m):
    if m is False:
      return u
    return jnp.zeros_like(u) if m is True else jnp.where(m, jnp.zeros_like(u), u)

  updates = jax.tree.map(zero, updates, masks)
  state_masks = optax.tree_utils.tree_map_params(
    tx, lambda _, m: m, new_state, masks, transform_non_params=lambda _: False
  )

  def keep(m, new, old):
    if m is False:
      return new
    return old if m is True else jnp.where(m, old, new)

  return updates, jax.tree.map(keep, state_masks, new_state, old_state)


class SparseTrainStep:
  """A jitted `Freezer.train_step`, one compiled variant per frozen set.

  `step_fn(step, params, opt_state, *args)` runs step number `step` with the
  freezer's variant for it and lets the freezer observe the multipliers (one
  small device-to-host copy per step). At most `max_variants` compiled
  variants are kept (least recently used goes first); `compilations` counts
  every compilation.
  """

  def __init__(self, freezer: Freezer, step: Callable[..., Any], max_variants: int = 8):
    in_range("max_variants", max_variants, 1, None)
    self.freezer = freezer
    self.max_variants = max_variants
    self.compilations = 0
    self._step = step
    self._cache: collections.OrderedDict = collections.OrderedDict()

  def compiled(self, variant: frozenset[str], *args) -> Any:
    """The compiled step for `variant` (compiling it on a miss)."""
    if variant in self._cache:
      self._cache.move_to_end(variant)
      return self._cache[variant]
    fn = jax.jit(lambda *a: self._step(*a, frozen=variant), donate_argnums=(0, 1))
    compiled = fn.lower(*args).compile()
    self.compilations += 1
    self._cache[variant] = compiled
    if len(self._cache) > self.max_variants:
      self._cache.popitem(last=False)
    return compiled

  def __call__(self, step: int, params, opt_state, *args):
    variant = self.freezer.variant(step)
    out, params, opt_state, alpha = self.compiled(variant, params, opt_state, *args)(
      params, opt_state, *args
    )
    self.freezer.observe(jax.device_get(alpha), variant)
    return out, params, opt_state
