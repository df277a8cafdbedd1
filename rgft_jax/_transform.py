"""The RGFT transformation: per-component multipliers from an EMA error map."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rgft_jax import _schedules
from rgft_jax import _validation
from rgft_jax._components import Components


class ScaleByResidualErrorState(NamedTuple):
  """State of `scale_by_residual_error`."""

  count: jax.Array  # shape=(), dtype=jnp.int32; updates applied.
  error_map: jax.Array  # shape=(n,), dtype=jnp.float32; EMA of the error map.
  alpha: jax.Array  # shape=(n,), dtype=jnp.float32; multipliers of the last update.
  observed: jax.Array  # shape=(n,), dtype=jnp.bool_; a finite value was seen.


def error_map_vector(
  error_map: Mapping[str, jax.typing.ArrayLike] | None, names: tuple[str, ...]
) -> jax.Array:
  """The error map as float32[n] in the order of `names`, after checking keys."""
  if error_map is None:
    raise ValueError(
      "scale_by_residual_error needs the batch's error map: call "
      "update(..., error_map={name: value}) with one scalar per component; "
      "pass NaN for a component that was not measured this step."
    )
  if not isinstance(error_map, Mapping):
    raise TypeError(
      f"error_map must be a mapping from component name to scalar, got "
      f"{type(error_map).__name__}."
    )
  missing = [n for n in names if n not in error_map]
  unknown = [k for k in error_map if k not in names]
  if missing or unknown:
    raise ValueError(
      f"error_map keys differ from the component names; missing: {missing}, "
      f"unknown: {unknown}."
    )
  values = []
  for name in names:
    value = jnp.asarray(error_map[name], jnp.float32)
    if value.shape != ():
      raise ValueError(
        f"error_map[{name!r}] must be a scalar, got shape {value.shape}."
      )
    values.append(value)
  return jnp.stack(values) if values else jnp.zeros((0,), jnp.float32)


def multipliers(
  ema: jax.Array,
  observed: jax.Array,
  thresh: jax.typing.ArrayLike,
  min_scale: jax.typing.ArrayLike,
) -> jax.Array:
  """`alpha_i = clip(ema_i / (thresh * max_j ema_j), min_scale, 1)`.

  Components never observed, and every component while the largest observed
  EMA is not positive, get 1.
  """
  top = jnp.max(jnp.where(observed, ema, -jnp.inf), initial=-jnp.inf)
  live = top > 0
  denom = jnp.where(live, thresh * top, 1.0)
  alpha = jnp.clip(ema / denom, min_scale, 1.0)
  return jnp.where(observed & live, alpha, 1.0).astype(jnp.float32)


def scale_by_residual_error(
  components: Components,
  beta: float = 0.9,
  thresh: float | optax.Schedule = 0.1,
  min_scale: float = 0.01,
  lagged: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales the updates of each component by a multiplier from its error.

  Each step folds the batch's error map `m_t` (one scalar per component, passed
  as `error_map=`) into an exponential moving average, then scales every update
  entry of component `i` by

  .. math::

    e_t = \beta e_{t-1} + (1 - \beta) m_t, \qquad e_1 = m_1, \\
    \alpha_i = \mathrm{clip}\Big(\frac{e_{t,i}}{\tau_t \max_j e_{t,j}},
      \epsilon, 1\Big),

  with threshold :math:`\tau_t` (a float or a schedule of the number of updates
  already applied) and :math:`\epsilon` = `min_scale`. Entries in no component
  are not scaled. A non-finite entry of the error map is ignored (that
  component's EMA is kept), so a bad batch cannot poison the state; the first
  finite value of a component initialises its EMA. While no component has a
  positive EMA, or for components never observed, the multiplier is 1.

  Args:
    components: which parameters belong to which component.
    beta: EMA decay, in [0, 1).
    thresh: threshold, a float in (0, 1] or an `optax.Schedule`.
    min_scale: smallest multiplier, in (0, 1].
    lagged: compute the multipliers from the EMA *before* this step's map is
      folded in, so they do not depend on the current batch (what the
      stochastic convergence argument in docs/theory.md assumes); the map is
      still folded in for the next step.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` takes
    `error_map={name: scalar}`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import rgft_jax
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> comps = rgft_jax.Components.from_regex(params, [(r"(\w)", r"\1")])
    >>> tx = rgft_jax.scale_by_residual_error(comps, thresh=0.5)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, error_map={"a": 1.0, "b": 0.1})
    >>> print(optax.tree.get(state, "alpha"))
    [1.  0.2]
    >>> print(updates["b"])
    [0.2 0.2]
  """
  if not isinstance(components, Components):
    raise TypeError(
      f"components must be rgft_jax.Components, got {type(components).__name__}."
    )
  _validation.in_range("beta", beta, 0.0, 1.0, high_open=True)
  _validation.in_range("min_scale", min_scale, 0.0, 1.0, low_open=True)
  if not callable(thresh):
    _validation.in_range("thresh", thresh, 0.0, 1.0, low_open=True)
  thresh_fn = thresh if callable(thresh) else (lambda count: thresh)
  n = len(components)

  def init_fn(params):
    # Checked when the leaves are arrays; `optax.tree_utils.tree_map_params`
    # calls init with a stand-in object to locate parameter-shaped state.
    leaves = jax.tree.leaves(params)
    if leaves and all(hasattr(leaf, "shape") for leaf in leaves):
      components.check(params)
    return ScaleByResidualErrorState(
      count=jnp.zeros([], jnp.int32),
      error_map=jnp.zeros([n], jnp.float32),
      alpha=jnp.ones([n], jnp.float32),
      observed=jnp.zeros([n], jnp.bool_),
    )

  def update_fn(updates, state, params=None, *, error_map=None, **extra_args):
    del params, extra_args
    values = error_map_vector(error_map, components.names)
    finite = jnp.isfinite(values)
    ema = beta * state.error_map + (1.0 - beta) * values
    ema = jnp.where(state.observed, ema, values)
    ema = jnp.where(finite, ema, state.error_map).astype(jnp.float32)
    observed = state.observed | finite
    if lagged:
      alpha = multipliers(
        state.error_map, state.observed, thresh_fn(state.count), min_scale
      )
    else:
      alpha = multipliers(ema, observed, thresh_fn(state.count), min_scale)
    updates = components.scale(updates, alpha)
    return updates, ScaleByResidualErrorState(
      count=optax.safe_increment(state.count),
      error_map=ema,
      alpha=alpha,
      observed=observed,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rgft(
  learning_rate: optax.ScalarOrSchedule,
  components: Components,
  beta: float = 0.9,
  thresh_init: float = 0.1,
  thresh_final: float = 0.3,
  warmup_steps: int = 1000,
  min_scale: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mu_dtype: Any | None = None,
  lagged: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Adam whose per-component updates are scaled by RGFT multipliers.

  The chain is Adam, decoupled weight decay (when `weight_decay` is not 0; the
  decay is scaled with the component like the rest of its update),
  `scale_by_residual_error` with the threshold rising linearly from
  `thresh_init` to `thresh_final` over `warmup_steps` updates, then the
  learning rate.

  Args:
    learning_rate: a float or an `optax.Schedule`.
    components: which parameters belong to which component.
    beta: EMA decay of the error map, in [0, 1).
    thresh_init: threshold at the first update, in (0, 1].
    thresh_final: threshold after warmup, in [thresh_init, 1].
    warmup_steps: updates over which the threshold grows.
    min_scale: smallest multiplier, in (0, 1].
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay (AdamW), >= 0.
    mu_dtype: dtype of Adam's first moment (default: that of the parameters).
    lagged: multipliers from the error map of earlier steps only (see
      `scale_by_residual_error`).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` takes
    `error_map={name: scalar}`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import rgft_jax
    >>> params = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
    >>> comps = rgft_jax.Components.from_regex(params, [(r"(\\w)", r"\\1")])
    >>> tx = rgft_jax.rgft(0.1, comps, warmup_steps=100)
    >>> state = tx.init(params)
    >>> grads = {"a": jnp.ones(3), "b": jnp.ones(3)}
    >>> updates, state = tx.update(grads, state, params,
    ...                            error_map={"a": 2.0, "b": 0.0})
    >>> print(optax.tree.get(state, "alpha"))
    [1.   0.01]
  """
  _validation.in_range("weight_decay", weight_decay, 0.0, None)
  _validation.in_range("b1", b1, 0.0, 1.0, high_open=True)
  _validation.in_range("b2", b2, 0.0, 1.0, high_open=True)
  _validation.in_range("eps", eps, 0.0, None)
  # Decided by type, not value: under inject_hyperparams the value is an array
  # (a tracer under jit) and the chain must have the same shape in init and update.
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  decay = [] if no_decay else [optax.add_decayed_weights(weight_decay)]
  return optax.chain(
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
    *decay,
    scale_by_residual_error(
      components,
      beta=beta,
      thresh=_schedules.linear_threshold(thresh_init, thresh_final, warmup_steps),
      min_scale=min_scale,
      lagged=lagged,
    ),
    optax.scale_by_learning_rate(learning_rate),
  )
