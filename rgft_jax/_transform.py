"""The RGFT transformation: per-component multipliers from an EMA error map."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rgft_jax import _schedules
from rgft_jax import _validation
from rgft_jax._adam import scale_by_adam_per_entry
from rgft_jax._components import Components

# float32's smallest normal and largest finite numbers.
_TINY = float(np.finfo(np.float32).tiny)
_MAX = float(np.finfo(np.float32).max)


class ScaleByResidualErrorState(NamedTuple):
  """State of `scale_by_residual_error`; `residual_error_state` finds it.

  The field `ema` was called `error_map` before; `state.error_map` still
  reads it, with a DeprecationWarning, for one release (a lookup by name,
  `optax.tree.get(state, "error_map")`, no longer finds it).
  """

  count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=jnp.int32; updates applied.
  ema: jax.Array  # shape=(n,), dtype=jnp.float32; EMA of the error map.
  alpha: jax.Array  # shape=(n,), dtype=jnp.float32; multipliers of the last update.
  observed: jax.Array  # shape=(n,), dtype=jnp.bool_; a finite value was seen.
  nonfinite: jax.Array  # shape=(n,), dtype=jnp.int32; NaN/inf entries ignored.
  negative: jax.Array  # shape=(n,), dtype=jnp.int32; negatives clipped to 0 (jit).
  clipped: jax.Array  # shape=(n,), dtype=jnp.int32; outliers clipped to the cap.

  @property
  def error_map(self) -> jax.Array:
    """Deprecated: the EMA of the error map, now `ema`."""
    warnings.warn(
      "ScaleByResidualErrorState.error_map is deprecated (it holds the EMA of "
      "the error map, not the batch's map): use .ema.",
      DeprecationWarning,
      stacklevel=2,
    )
    return self.ema


def residual_error_state(opt_state: Any) -> ScaleByResidualErrorState:
  """The state of the one `scale_by_residual_error` inside `opt_state`.

  Finds it in any optax state tree (`rgft()`'s chain, `inject_hyperparams`,
  `multi_transform`, `MultiSteps`, `apply_if_finite`, ...), where
  `optax.tree.get(opt_state, "count")` would clash with Adam's own count.

  Args:
    opt_state: an optimizer state.

  Returns:
    The `ScaleByResidualErrorState`.

  Raises:
    ValueError: if `opt_state` holds none, or more than one.

  Examples:
    >>> import jax.numpy as jnp
    >>> import rgft_jax
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    >>> comps = rgft_jax.Components.from_regex(params, [(r"(\\w)", r"\\1")])
    >>> tx = rgft_jax.rgft(0.1, comps, thresh_init=0.5, thresh_final=0.5)
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params, error_map={"a": 1.0, "b": 0.1})
    >>> rgft_state = rgft_jax.residual_error_state(state)
    >>> print(rgft_state.count, rgft_state.alpha)
    1 [1.  0.2]
  """

  def is_state(x):
    return isinstance(x, ScaleByResidualErrorState)

  flat, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_state)
  found = [(path, x) for path, x in flat if is_state(x)]
  if len(found) != 1:
    where = [jax.tree_util.keystr(path) or "(the root)" for path, _ in found]
    raise ValueError(
      "Expected exactly one ScaleByResidualErrorState (from rgft() or "
      f"scale_by_residual_error) in the optimizer state, found {len(found)}"
      + (f" at {where}." if where else ".")
    )
  return found[0][1]


def _as_float32(value: Any, name: str) -> jax.Array:
  """`error_map[name]` as a float32 scalar; finite values are clipped into range."""
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    array = jnp.asarray(value, jnp.float32)
  else:
    try:
      host = np.asarray(value, np.float64)
    except (TypeError, ValueError) as e:
      raise TypeError(
        f"error_map[{name!r}] must be a real scalar, got {type(value).__name__}."
      ) from e
    # A finite value beyond float32's range is huge, not "not measured".
    host = np.where(np.isfinite(host), np.clip(host, -_MAX, _MAX), host)
    array = jnp.asarray(host.astype(np.float32))
  if array.shape != ():
    raise ValueError(f"error_map[{name!r}] must be a scalar, got shape {array.shape}.")
  return array


def _refuse_negative(values: dict[str, jax.Array]) -> None:
  """Raises ValueError naming the entries known now (not traced) that are < 0."""
  known = {
    name: v
    for name, v in values.items()
    if not isinstance(v, jax.core.Tracer) and v.is_fully_addressable
  }
  host = jax.device_get(known)  # One transfer for all the entries.
  negative = {name: v for name, v in host.items() if np.isfinite(v) and v < 0}
  if negative:
    listed = ", ".join(f"error_map[{k!r}] = {v}" for k, v in negative.items())
    raise ValueError(
      f"Error-map values must be >= 0 (magnitudes of influence), got {listed}. "
      "Pass |E| for a signed attribution such as exact ablation, or NaN for a "
      "component not measured this step. (Under jax.jit a negative value is "
      "clipped to 0 and counted in the state's `negative`.)"
    )


def error_map_vector(
  error_map: Mapping[str, jax.typing.ArrayLike] | None, names: tuple[str, ...]
) -> jax.Array:
  """The error map as float32[n] in the order of `names`, after checking keys.

  Raises ValueError for a negative finite value that is known now (not
  traced), naming its component.
  """
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
  values = {name: _as_float32(error_map[name], name) for name in names}
  _refuse_negative(values)
  return jnp.stack(list(values.values())) if values else jnp.zeros((0,), jnp.float32)


def outlier_cap(
  values: jax.Array,
  ema: jax.Array,
  observed: jax.Array,
  ratio: jax.typing.ArrayLike,
) -> jax.Array:
  """The largest value each entry of the map may bring into the EMA.

  `ratio * max(largest observed EMA, largest other entry of this map)`,
  per entry; infinite (no clipping) where that reference is below float32's
  smallest normal number (zero included). `values` holds the map's entries,
  non-negative, with non-finite entries already replaced by 0. A `ratio`
  below 1 or NaN (only possible when traced) counts as 1.
  """
  n = values.shape[0]
  if n == 0:
    return values
  ratio = jnp.asarray(ratio, jnp.float32)
  ratio = jnp.where(ratio >= 1.0, ratio, 1.0)
  ema_top = jnp.max(jnp.where(observed, ema, 0.0), initial=0.0)
  # The largest other entry: the largest, except at the largest's own place
  # (the first one, if tied), where it is the second largest.
  first = jnp.arange(n) == jnp.argmax(values)
  top = jnp.max(values)
  second = jnp.max(jnp.where(first, 0.0, values), initial=0.0)
  reference = jnp.maximum(ema_top, jnp.where(first, second, top))
  cap = reference * ratio  # inf past float32's range: no clipping.
  return jnp.where(reference >= _TINY, cap, jnp.inf).astype(jnp.float32)


def _tally(counts: jax.Array, hit: jax.Array) -> jax.Array:
  """`counts + hit`, staying at int32's maximum instead of wrapping."""
  top = np.iinfo(np.int32).max
  return jnp.where(hit & (counts < top), counts + 1, counts).astype(jnp.int32)


def multipliers(
  ema: jax.Array,
  observed: jax.Array,
  thresh: jax.typing.ArrayLike,
  min_scale: jax.typing.ArrayLike,
) -> jax.Array:
  """`alpha_i = clip(ema_i / (thresh * max_j ema_j), min_scale, 1)`, never NaN.

  Computed as `(ema_i / max_j ema_j) / thresh`, which neither overflows nor
  divides by zero. The components at the largest observed EMA get exactly 1;
  components never observed, and every component while the largest observed
  EMA is below float32's smallest normal number (`tiny`, about 1.2e-38:
  zero, negative or subnormal), get 1. Any EMA entry below `tiny` counts as 0
  (platforms differ on whether they flush subnormal numbers to zero). A
  threshold that is NaN or below `tiny` counts as `tiny`, one above 1 as 1; a
  `min_scale` outside [0, 1] (only possible when traced) is clipped into it,
  NaN counting as 0.
  """
  ema = jnp.asarray(ema, jnp.float32)
  ema = jnp.where(ema >= _TINY, ema, 0.0)
  thresh = jnp.asarray(thresh, jnp.float32)
  thresh = jnp.where(thresh >= _TINY, jnp.minimum(thresh, 1.0), _TINY)
  low = jnp.asarray(min_scale, jnp.float32)
  low = jnp.where(low >= 0.0, jnp.minimum(low, 1.0), 0.0)
  top = jnp.max(jnp.where(observed, ema, -jnp.inf), initial=-jnp.inf)
  live = top >= _TINY
  # XLA divides by multiplying with the reciprocal, which is 0 (flushed) for
  # a divisor above 2**126: exact powers of 2 keep it normal.
  scale = jnp.where(top > 2.0**64, 2.0**-64, 1.0)
  ratio = (ema * scale) / jnp.where(live, top * scale, 1.0)  # <= 1 if observed.
  alpha = jnp.where(ema >= top, 1.0, jnp.clip(ratio / thresh, low, 1.0))
  return jnp.where(observed & live, alpha, 1.0).astype(jnp.float32)


def _check_state(state: Any, names: tuple[str, ...]) -> None:
  """Raises unless `state` is a `ScaleByResidualErrorState` for `names`."""
  if not isinstance(state, ScaleByResidualErrorState):
    raise TypeError(
      f"scale_by_residual_error's update got a {type(state).__name__} as its "
      "state, not a ScaleByResidualErrorState: pass the state that this "
      "optimizer's own init returned (tx.init(params)), not another optimizer's."
    )
  n = jnp.shape(state.ema)
  if n != (len(names),):
    raise ValueError(
      f"The ScaleByResidualErrorState holds an EMA of shape {n}, but this "
      f"transformation has {len(names)} components {list(names)}: pass the state "
      "that this optimizer's own init returned."
    )


def scale_by_residual_error(
  components: Components,
  beta: float = 0.9,
  thresh: float | optax.Schedule = 0.1,
  min_scale: float = 0.01,
  lagged: bool = False,
  outlier_ratio: float = 10.0,
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
  are not scaled. While no component has a positive EMA, or for components
  never observed, the multiplier is 1.

  Before it enters the EMA, each entry of the map is checked; the state counts
  per component what each rule did (`nonfinite`, `negative`, `clipped`):

  * Non-finite (NaN, inf, -inf): ignored, that component's EMA is kept, so a
    bad batch cannot poison the state (`nonfinite`). The first finite value
    of a component initialises its EMA.
  * Negative: the values are magnitudes, so a negative value known eagerly is
    a ValueError naming its component; under `jax.jit` it cannot be refused
    and is clipped to 0 (`negative`). Finite values beyond float32's range
    are clipped into it.
  * Outlier: an entry is clipped to at most `outlier_ratio` times the larger
    of the largest EMA so far and the largest *other* entry of the same map
    (`clipped`; no clipping while that reference is 0 or below float32's
    smallest normal number). A single huge value (even in the first map)
    therefore enters as at most :math:`K` times the scale that the EMA and
    the rest of the map show: after a steady run it raises the largest EMA
    at most by the factor :math:`\beta + (1 - \beta) K` (1.9 with the
    defaults), and its effect on the other multipliers fades like
    :math:`\beta^t`, so it cannot pin them at `min_scale` for long. A
    genuine rise of one component is followed at up to that factor per
    step; a rise that two components share is not clipped (it is a change
    of scale, not an outlier).

  The multipliers are finite and in [`min_scale`, 1] for every error map, and
  exactly 1 for the components with the largest EMA. A threshold that a
  schedule (or `inject_hyperparams`) makes NaN or smaller than float32's
  smallest normal number counts as that number, one above 1 counts as 1 (see
  `multipliers`); a threshold schedule is evaluated at count 0 when the
  transformation is made (a ValueError unless a real scalar in [0, 1], 0
  standing for the limit 0+), and a value that is not a scalar at run time is
  a ValueError. A traced
  `outlier_ratio` below 1 or NaN counts as 1. Parameters that an enclosing
  `optax.masked` or `optax.multi_transform` keeps from this transformation
  (`optax.MaskedNode` leaves) are left alone; every component must still own
  some parameter entry this transformation sees.

  Args:
    components: which parameters belong to which component.
    beta: EMA decay, a real number in [0, 1).
    thresh: threshold, a real number in (0, 1] or an `optax.Schedule`.
    min_scale: smallest multiplier, a real number in [tiny, 1] (`tiny`:
      float32's smallest normal number, about 1.18e-38).
    lagged: compute the multipliers from the EMA *before* this step's map is
      folded in, so they do not depend on the current batch (what the
      stochastic convergence argument in docs/theory.md assumes); the map is
      still folded in for the next step.
    outlier_ratio: how many times the reference scale (above) an entry may
      be before it is clipped, a real number > 1; `inf` turns clipping off.

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
  # Not below float32's smallest normal number: XLA may flush a subnormal
  # bound to 0, and the multipliers would then go below it.
  _validation.in_range("min_scale", min_scale, _TINY, 1.0)
  _validation.in_range("outlier_ratio", outlier_ratio, 1.0, None, low_open=True)
  if callable(thresh):
    _validation.schedule("thresh", thresh, (0,), 0.0, 1.0)
  else:
    _validation.in_range("thresh", thresh, 0.0, 1.0, low_open=True)
  if not isinstance(lagged, (bool, np.bool_)):
    raise TypeError(f"lagged must be a bool, got {lagged!r}.")
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
      ema=jnp.zeros([n], jnp.float32),
      alpha=jnp.ones([n], jnp.float32),
      observed=jnp.zeros([n], jnp.bool_),
      nonfinite=jnp.zeros([n], jnp.int32),
      negative=jnp.zeros([n], jnp.int32),
      clipped=jnp.zeros([n], jnp.int32),
    )

  def threshold(count):
    value = thresh_fn(count)
    shape = jnp.shape(value)
    if shape != ():
      raise ValueError(
        f"thresh must be a scalar, but the schedule returned shape {shape} at "
        "run time: return one threshold per step."
      )
    return value

  def update_fn(updates, state, params=None, *, error_map=None, **extra_args):
    del params, extra_args
    _check_state(state, components.names)
    values = error_map_vector(error_map, components.names)
    finite = jnp.isfinite(values)
    negative = finite & (values < 0.0)
    values = jnp.where(finite, jnp.maximum(values, 0.0), 0.0)
    cap = outlier_cap(values, state.ema, state.observed, outlier_ratio)
    clipped = finite & (values > cap)
    values = jnp.minimum(values, cap)
    # The barrier keeps XLA from factoring beta = 0.5 into 0.5 * (ema + values),
    # whose sum overflows for values above half float32's range.
    old, new = jax.lax.optimization_barrier((beta * state.ema, (1.0 - beta) * values))
    ema = jnp.clip(old + new, -_MAX, _MAX)  # Rounding can overflow at the edge.
    ema = jnp.where(state.observed, ema, values)
    # NaN only from a NaN `beta` (traced): the old EMA is kept.
    keep = ~finite | jnp.isnan(ema)
    ema = jnp.where(keep, state.ema, ema).astype(jnp.float32)
    observed = state.observed | finite
    if lagged:
      alpha = multipliers(state.ema, state.observed, threshold(state.count), min_scale)
    else:
      alpha = multipliers(ema, observed, threshold(state.count), min_scale)
    updates = components.scale(updates, alpha)
    return updates, ScaleByResidualErrorState(
      count=optax.safe_increment(state.count),
      ema=ema,
      alpha=alpha,
      observed=observed,
      nonfinite=_tally(state.nonfinite, ~finite),
      negative=_tally(state.negative, negative),
      clipped=_tally(state.clipped, clipped),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rgft(
  learning_rate: optax.ScalarOrSchedule,
  components: Components,
  beta: float = 0.9,
  thresh_init: float | None = None,
  thresh_final: float | None = None,
  warmup_steps: int | None = None,
  min_scale: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mu_dtype: Any | None = None,
  lagged: bool = False,
  thresh: float | optax.Schedule | None = None,
  outlier_ratio: float = 10.0,
  adam_count: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Adam whose per-component updates are scaled by RGFT multipliers.

  The chain is Adam, decoupled weight decay (when `weight_decay` is not 0; the
  decay is scaled with the component like the rest of its update),
  `scale_by_residual_error` with the threshold rising linearly from
  `thresh_init` to `thresh_final` over `warmup_steps` updates, then the
  learning rate. For a constant threshold give `thresh_init` = `thresh_final`;
  for any other schedule chain `scale_by_residual_error(components,
  thresh=schedule)` yourself. Every hyperparameter is checked
  when its value is known (not under `jax.jit`): a TypeError or ValueError
  names the one that is wrong. Schedules are checked where they can be: a
  `learning_rate` schedule is evaluated at update counts 0 and
  `warmup_steps` (the threshold's), and each value must be a real scalar in
  the constant's range. `update` refuses, with a
  TypeError, a state that this optimizer's `init` did not make.

  Args:
    learning_rate: a finite real number >= 0 or an `optax.Schedule`.
    components: which parameters belong to which component.
    beta: EMA decay of the error map, in [0, 1).
    thresh_init: threshold at the first update, in (0, 1] (default 0.1).
    thresh_final: threshold after warmup, in [thresh_init, 1] (default 0.3).
    warmup_steps: updates over which the threshold grows, an integer >= 0
      (default 1000).
    min_scale: smallest multiplier, in [tiny, 1] (float32's smallest normal
      number, about 1.18e-38, and up).
    b1: Adam's first-moment decay, in [0, 1).
    b2: Adam's second-moment decay, in [0, 1).
    eps: Adam's epsilon, finite and >= 0.
    weight_decay: decoupled weight decay (AdamW), finite and >= 0.
    mu_dtype: dtype of Adam's first moment (default: that of the parameters).
    lagged: multipliers from the error map of earlier steps only (see
      `scale_by_residual_error`).
    thresh: deprecated (a DeprecationWarning; it goes in the next release):
      the whole threshold, a real number in (0, 1] or an `optax.Schedule` of
      the number of updates applied, in place of `thresh_init`,
      `thresh_final` and `warmup_steps` (giving it with any of them is a
      ValueError). Give `thresh_init` = `thresh_final` for a constant, or
      chain `scale_by_residual_error(components, thresh=schedule)` for a
      schedule.
    outlier_ratio: clipping of outlying error-map entries, > 1 (see
      `scale_by_residual_error`).
    adam_count: Adam's bias correction counts the run's steps ("global",
      `optax.scale_by_adam`) or each parameter entry's own ("per_entry",
      `scale_by_adam_per_entry`: a component held by detaching resumes Adam
      where it left off instead of taking oversized steps).

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
  _validation.scalar_or_schedule("learning_rate", learning_rate)
  _validation.in_range("weight_decay", weight_decay, 0.0, None, finite=True)
  _validation.in_range("b1", b1, 0.0, 1.0, high_open=True)
  _validation.in_range("b2", b2, 0.0, 1.0, high_open=True)
  _validation.in_range("eps", eps, 0.0, None, finite=True)
  if adam_count not in ("global", "per_entry"):
    raise ValueError(f'adam_count must be "global" or "per_entry", got {adam_count!r}.')
  linear = {
    "thresh_init": thresh_init,
    "thresh_final": thresh_final,
    "warmup_steps": warmup_steps,
  }
  counts = [0]  # Where a learning-rate schedule is checked.
  deprecated = thresh is not None
  if thresh is None:
    warmup = 1000 if warmup_steps is None else warmup_steps
    thresh = _schedules.linear_threshold(
      0.1 if thresh_init is None else thresh_init,
      0.3 if thresh_final is None else thresh_final,
      warmup,
    )
    end = _validation.number("warmup_steps", warmup, integer=True)
    counts += [] if end is None or end == 0 else [int(end)]
  else:
    given = [k for k, v in linear.items() if v is not None]
    if given:
      raise ValueError(
        f"thresh replaces thresh_init, thresh_final and warmup_steps; pass "
        f"either thresh or those, not both (got thresh and {', '.join(given)})."
      )
  if callable(learning_rate):
    _validation.schedule("learning_rate", learning_rate, counts, 0.0, None)
  # Decided by type, not value: under inject_hyperparams the value is an array
  # (a tracer under jit) and the chain must have the same shape in init and update.
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  decay = [] if no_decay else [optax.add_decayed_weights(weight_decay)]
  adam = scale_by_adam_per_entry if adam_count == "per_entry" else optax.scale_by_adam
  chain = optax.chain(
    adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
    *decay,
    scale_by_residual_error(
      components,
      beta=beta,
      thresh=thresh,
      min_scale=min_scale,
      lagged=lagged,
      outlier_ratio=outlier_ratio,
    ),
    optax.scale_by_learning_rate(learning_rate),
  )
  if deprecated:  # Once every value is checked: a bad one is the error.
    warnings.warn(
      "rgft(thresh=...) is deprecated: for a constant threshold give "
      "thresh_init and thresh_final the same value; for a schedule chain "
      "optax.scale_by_adam(), rgft_jax.scale_by_residual_error(components, "
      "thresh=schedule) and optax.scale_by_learning_rate(learning_rate).",
      DeprecationWarning,
      stacklevel=2,
    )
  where = 1 + len(decay)  # RGFT's place in the chain.

  def update_fn(updates, state, params=None, **extra_args):
    parts = where + 2
    if not (
      isinstance(state, tuple)
      and len(state) == parts
      and isinstance(state[where], ScaleByResidualErrorState)
    ):
      got = type(state).__name__
      if isinstance(state, tuple):
        got += f" of {len(state)}: ({', '.join(type(x).__name__ for x in state)})"
      raise TypeError(
        f"rgft's update got a state that its init did not make: expected a "
        f"tuple of {parts} with a ScaleByResidualErrorState at [{where}], got a "
        f"{got}. Pass the state that this optimizer's init returned "
        "(tx.init(params)), not another optimizer's."
      )
    return chain.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)
