"""Sparse RGFT: components that are not trained this step leave the backward pass.

A train step variant is the set of components whose *output* is detached: the
tracker puts the output `h` behind `jax.lax.stop_gradient` (keeping the
identity that measures it), so XLA drops the component's whole backward
pass, weight and input gradients, at any depth, while the gradient still
reaches the layers below through the residual stream. A detached component
is still measured every step; its parameters get no update and their
optimizer state is held. `StepVariants` compiles and caches one step per
variant; `SparseTrainStep` runs the variants a `Budget` chooses.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.extend import core as jex_core

from rgft_jax._components import Components
from rgft_jax._components import leaves_by_path
from rgft_jax._components import path_str
from rgft_jax._costs import compiled_cost
from rgft_jax._costs import flops_of
from rgft_jax._costs import has_scan
from rgft_jax._plan import Plan
from rgft_jax._transform import residual_error_state
from rgft_jax._validation import in_range


def component_masks(components: Components, tree: Any, names: Any) -> Any:
  """Per leaf of `tree`: False (no entry of `names`), True (all) or a bool array."""
  names = frozenset(names)
  unknown = names - set(components.names)
  if unknown:
    raise ValueError(
      f"Unknown component names {sorted(unknown)}; the components are "
      f"{list(components.names)}."
    )
  ids = np.array([i for i, n in enumerate(components.names) if n in names], np.int32)
  components.check(tree)
  by_path = components._by_path
  masks = {}
  for path, leaf in leaves_by_path(tree).items():
    m = np.isin(by_path[path], ids)
    masks[path] = (
      True if m.all() else bool(m.any()) and np.broadcast_to(m, np.shape(leaf))
    )

  def mask(path, _):
    return masks[path_str(path)]

  return jax.tree_util.tree_map_with_path(
    mask, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def flag_masks(components: Components, tree: Any, flags: jax.Array) -> Any:
  """Per leaf of `tree`: False (in no component), a traced bool scalar (one
  component owns the whole leaf) or a traced bool array, set where the entry's
  component has its flag set (`flags`: bool[n])."""
  components.check(tree)
  table = jnp.append(jnp.asarray(flags, bool), False)  # Index -1 -> False.
  by_path = components._by_path

  def mask(path, _):
    idx = by_path[path_str(path)]
    if (idx < 0).all():
      return False
    if (idx == idx.flat[0]).all():  # One component owns the leaf: one flag.
      return table[idx.flat[0]]
    return table[idx]

  return jax.tree_util.tree_map_with_path(
    mask, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def is_runtime(detached: Any) -> bool:
  """Whether `detached` is a runtime set (a boolean array), not names."""
  return hasattr(detached, "dtype") and hasattr(detached, "shape")


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

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import rgft_jax
    >>> tx = optax.adam(0.1)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> grads = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> old = tx.init(params)
    >>> updates, new = tx.update(grads, old, params)
    >>> masks = {"a": True, "b": jnp.array([False, True])}
    >>> updates, state = rgft_jax.hold_masked(tx, masks, updates, new, old)
    >>> print(updates["a"], updates["b"] != 0)
    [0. 0.] [ True False]
    >>> print(state[0].mu["a"], state[0].mu["b"])
    [0. 0.] [0.1 0. ]
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


def hold_skipped(
  tx: optax.GradientTransformation,
  masks: Any,
  grads: Any,
  state: Any,
  params: Any,
  **extra_args: Any,
) -> tuple[Any, Any]:
  """`tx`'s update and `optax.apply_updates`, with held leaves' work skipped.

  The same result as `tx.update`, `hold_masked` and `optax.apply_updates`:
  `masks` (like the parameters) holds a leaf whole (True, or a traced bool
  scalar when set), holds some of its entries (a bool array) or none (False);
  a held entry keeps its parameter and its optimizer state. The difference is
  the cost. A leaf with a traced scalar flag (`flag_masks` gives one where a
  single component owns the leaf) is updated inside a `lax.cond` that runs
  only when the flag is clear, so a held leaf costs no optimizer work and no
  copies (its donated buffers stay in place); `hold_masked` computes every
  update and then selects between old and new values, which costs more than
  the update itself on CPU (`benchmarks/bench_hold.py`).

  Exact for any `tx`: each branch traces `tx.update` on the whole tree and XLA
  drops what its leaf does not read. Where a leaf's update or state reads
  another leaf's gradient, parameter or state (global-norm clipping), each
  branch would recompute the whole update, so every leaf is held by select
  (as `hold_masked`) instead; which leaves read what is found from `tx`'s
  traced update (`reads_other_leaves`).

  Returns:
    `(new_params, new_state)`.
  """
  p_leaves, p_def = jax.tree.flatten(params)
  m_leaves = jax.tree.leaves(masks)  # False, True, or a bool array each.
  index = jax.tree.unflatten(p_def, list(range(len(p_leaves))))
  owner = optax.tree_utils.tree_map_params(
    tx, lambda _, i: i, state, index, transform_non_params=lambda _: -1
  )
  owners = jax.tree.leaves(owner)
  old_state, s_def = jax.tree.flatten(state)
  updates, new = tx.update(grads, state, params, **extra_args)
  u_leaves = jax.tree.leaves(updates)
  new_state = jax.tree.leaves(new)
  mine = collections.defaultdict(list)  # Param leaf -> its state leaves.
  for j, i in enumerate(owners):
    if i >= 0:
      mine[i].append(j)
  # Only leaves with one flag would be skipped: trace `tx.update` for them alone.
  flagged = any(m is not False and m is not True and jnp.ndim(m) == 0 for m in m_leaves)
  select = flagged and reads_other_leaves(
    tx, owners, grads, state, params, **extra_args
  )
  out = []
  for i, (p, m) in enumerate(zip(p_leaves, m_leaves, strict=True)):
    if m is False:
      out.append(optax.apply_updates(p, u_leaves[i]))
      continue
    if m is True or jnp.ndim(m) > 0 or select:  # Hold by select.
      out.append(jnp.where(m, p, optax.apply_updates(p, u_leaves[i])))
      for j in mine[i]:
        new_state[j] = jnp.where(m, old_state[j], new_state[j])
      continue

    def run(operands, i=i):
      g, s, ps = operands
      u, s = tx.update(g, s, ps, **extra_args)
      leaves = jax.tree.leaves(s)
      p = jax.tree.leaves(ps)[i]
      return optax.apply_updates(p, jax.tree.leaves(u)[i]), [leaves[j] for j in mine[i]]

    def keep(operands, i=i):
      _, s, ps = operands
      return jax.tree.leaves(ps)[i], [jax.tree.leaves(s)[j] for j in mine[i]]

    # `cond(trained, run, keep)`: the other way round, XLA on CPU copied
    # every operand of the keep branch.
    p, held = jax.lax.cond(jnp.logical_not(m), run, keep, (grads, state, params))
    out.append(p)
    for j, leaf in zip(mine[i], held, strict=True):
      new_state[j] = leaf
  return jax.tree.unflatten(p_def, out), jax.tree.unflatten(s_def, new_state)


def reads_other_leaves(
  tx: optax.GradientTransformation,
  owners: list[int],
  grads: Any,
  state: Any,
  params: Any,
  **extra_args: Any,
) -> bool:
  """Whether some leaf's update or new state, in `tx.update`, reads another
  parameter leaf's gradient, value or optimizer state.

  `owners[j]` is the parameter leaf that state leaf `j` belongs to (-1: none,
  such as a step count). Found by tracing `tx.update` and following which
  inputs each output depends on; an operation with a sub-computation counts
  as reading all of its inputs, so the answer can be True where a finer look
  would say False, never the other way round.
  """
  n = len(jax.tree.leaves(params))
  closed = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, **extra_args))(
    grads, state, params
  )
  bits = [1 << i for i in range(n)]  # Gradients.
  bits += [1 << i if i >= 0 else 0 for i in owners]  # State.
  bits += [1 << i for i in range(n)]  # Parameters.
  if len(bits) != len(closed.jaxpr.invars):  # Not laid out as assumed: say so.
    return True
  reads: dict[Any, int] = dict(zip(closed.jaxpr.invars, bits, strict=True))
  for eqn in closed.jaxpr.eqns:
    seen = 0
    for v in eqn.invars:
      if not isinstance(v, jex_core.Literal):
        seen |= reads.get(v, 0)
    for v in eqn.outvars:
      reads[v] = seen
  outs = [
    0 if isinstance(v, jex_core.Literal) else reads.get(v, 0)
    for v in closed.jaxpr.outvars
  ]
  # Updates, then the new state; a state leaf of no parameter (a count) takes
  # its new value from the whole update whatever is held, so it may read all.
  own = [1 << i for i in range(n)] + [1 << i if i >= 0 else -1 for i in owners]
  return any(got & ~mine for got, mine in zip(outs, own, strict=True))


def detachable_step(
  tracker: Any,
  tx: optax.GradientTransformation,
  loss_fn: Callable[..., Any],
  components: Components | Plan,
  has_aux: bool = False,
  exact: bool = False,
  recompute: bool = False,
  hold: str = "skip",
) -> Callable[..., Any]:
  """An RGFT train step that takes the set of detached components.

  Linen: `step(params, opt_state, *args, detached=frozenset())` returns
  `(out, params, opt_state)`, where `loss_fn(params, *args)` is what the
  tracker's `value_and_grad` takes and `out` its loss (or `(loss, aux)`).
  NNX: `step(model, optimizer, *args, detached=frozenset())` updates the
  `nnx.Optimizer` in place and returns `out`; `loss_fn(model, *args)`.

  The `detached` components get no gradient (see
  `ErrorTracker.value_and_grad`): they are measured as usual, their
  parameters get no update and their optimizer state (Adam's moments) is
  held, so a component trained again later resumes where it left off (its
  bias correction too with `rgft(..., adam_count="per_entry")`; optax's Adam
  counts every step of the run, `scale_by_adam_per_entry`).
  `detached` is either

  * a frozenset of names, static under `jit` (compiled variants, one program
    per set, `StepVariants`): XLA removes the detached backward passes and
    the activations kept for them, so peak memory falls too; inside a scan
    over layers a per-layer set saves nothing;
  * or a boolean array, one entry per component in `components.names`
    order, which may be traced (runtime gating): one program for every set;
    each component's backward pass runs only when it is trained, in loops
    and scans alike; held parameters and moments are held at run time
    (`hold`).

  A component below a detached one (earlier in `components.names`, the
  order `ErrorTracker.components` gives: input side first) is measured
  without the gradient paths through the detached branch. With `exact`,
  such components are not measured (NaN: their EMA is kept), so the error
  map only ever folds in exact measurements.

  Args:
    tracker: the `ErrorTracker` of the model.
    tx: the optax transformation with RGFT in it (Linen; with NNX the
      optimizer's own is used and this may be None).
    loss_fn: the batch-mean loss, as `tracker.value_and_grad` takes it.
    components: the components `tx` scales (`tracker.components(...)`),
      or the tracker's `Plan` (`tracker.plan(...)`, whose components they
      are): the step then measures what the plan found instead of finding it
      again in each compiled variant's trace.
    has_aux: `loss_fn` returns `(loss, aux)`.
    exact: measure only the components measured exactly (see above).
    recompute: with runtime gating, keep no residuals for gated backward
      passes and recompute a trained component's forward pass.
    hold: with runtime gating, how held parameters keep their values:
      "skip" (`hold_skipped`: a leaf owned by one component is updated only
      when it trains) or "mask" (`hold_masked`: every update computed, then
      selected; cheaper only for an optimizer whose leaves read each other,
      such as global-norm clipping).

  Returns:
    The step function.

  Examples:
    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp, optax
    >>> import rgft_jax
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for i in range(2):
    ...       x = x + nn.Dense(4, name=f"branch{i}")(x)
    ...     return x
    >>> model, x = Net(), jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tracker = rgft_jax.ErrorTracker(model, select=lambda p, m: len(p) == 1)
    >>> comps = tracker.components(params, x)
    >>> tx = rgft_jax.rgft(0.1, comps)
    >>> loss_fn = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
    >>> step = jax.jit(rgft_jax.detachable_step(tracker, tx, loss_fn, comps),
    ...                static_argnames="detached")
    >>> loss, new, _ = step(params, tx.init(params), x,
    ...                     detached=frozenset({"branch0"}))
    >>> bool((new["branch0"]["kernel"] == params["branch0"]["kernel"]).all())
    True
  """

  plan = components if isinstance(components, Plan) else None
  if plan is not None:
    components = plan.components
  names = components.names
  if hold not in ("skip", "mask"):
    raise ValueError(f'hold must be "skip" or "mask", got {hold!r}.')

  def measured(detached):
    if not exact or is_runtime(detached) or not detached:
      return None
    top = max(names.index(n) for n in detached)
    return names[top:]

  def attribute(model_or_params, args, detached):
    if detached is None:
      raise TypeError(
        "detached must be a frozenset of component names (compiled variants) "
        "or a boolean array with one entry per component (runtime gating); "
        "got None. Pass frozenset() to detach nothing."
      )
    out, grads, error_map = tracker.value_and_grad(
      loss_fn,
      has_aux=has_aux,
      detach=detached,
      measure=measured(detached),
      recompute=recompute,
      plan=plan,
    )(model_or_params, *args)
    if exact and is_runtime(detached):
      error_map = _exact_only(error_map, names, detached)
    return out, grads, error_map

  def masks_of(params, detached):
    if is_runtime(detached):
      return flag_masks(components, params, detached)
    return component_masks(components, params, detached)

  def step(params, opt_state, *args, detached: Any = frozenset()):
    if isinstance(params, nnx.Module):
      return _nnx_step(params, opt_state, *args, detached=detached)
    out, grads, error_map = attribute(params, args, detached)
    if is_runtime(detached) and hold == "skip":
      masks = masks_of(params, detached)
      params, new_state = hold_skipped(
        tx, masks, grads, opt_state, params, error_map=error_map
      )
      return out, params, new_state
    updates, new_state = tx.update(grads, opt_state, params, error_map=error_map)
    if is_runtime(detached) or detached:
      masks = masks_of(params, detached)
      updates, new_state = hold_masked(tx, masks, updates, new_state, opt_state)
    return out, optax.apply_updates(params, updates), new_state

  def _nnx_step(model, optimizer, *args, detached):
    out, grads, error_map = attribute(model, args, detached)
    if not is_runtime(detached) and not detached:
      optimizer.update(model, grads, error_map=error_map)
      return out
    # `nnx.Optimizer.update`, with the detached components held.
    wrt = optimizer.wrt
    params = nnx.as_pure(nnx.state(model, wrt))
    old_state = nnx.as_pure(optimizer.opt_state)
    grads = nnx.as_pure(nnx.state(grads, wrt))
    masks = masks_of(params, detached)
    if is_runtime(detached) and hold == "skip":
      new_params, new_state = hold_skipped(
        optimizer.tx, masks, grads, old_state, params, error_map=error_map
      )
    else:
      updates, new_state = optimizer.tx.update(
        grads, old_state, params, error_map=error_map
      )
      updates, new_state = hold_masked(
        optimizer.tx, masks, updates, new_state, old_state
      )
      new_params = optax.apply_updates(params, updates)
    nnx.update(model, new_params)
    nnx.update(optimizer.opt_state, nnx.state(new_state))
    optimizer.step[...] += 1
    return out

  step.tracker = tracker  # type: ignore[attr-defined]
  step.components = components  # type: ignore[attr-defined]
  return step


def train_step(*args: Any, **kwargs: Any) -> Callable[..., Any]:
  """Deprecated alias of `detachable_step` (kept for one release).

  The name collided with the train step users write themselves; it warns
  and forwards every argument to `detachable_step`.
  """
  warnings.warn(
    "rgft_jax.train_step is deprecated (the name collides with your own train "
    "step): use rgft_jax.detachable_step, which takes the same arguments.",
    DeprecationWarning,
    stacklevel=2,
  )
  return detachable_step(*args, **kwargs)


def _exact_only(error_map: dict, names: tuple[str, ...], flags: jax.Array) -> dict:
  """NaN (not measured) for the components below the topmost detached one."""
  position = jnp.arange(len(names))
  top = jnp.max(jnp.where(flags, position, -1))
  return {n: jnp.where(i >= top, error_map[n], jnp.nan) for i, n in enumerate(names)}


def _signature(args: Any) -> Hashable:
  """Tree structure, shapes, dtypes and shardings of `args` (the compile key)."""
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple(
    (x.shape, x.dtype, getattr(x, "sharding", None))
    if hasattr(x, "shape") and hasattr(x, "dtype")
    else (type(x), None, None)
    for x in leaves
  )


class StepVariants:
  """Compiled variants of a train step, one per variant and argument types.

  `make(variant)` returns the step function for a hashable `variant` (for
  sparse RGFT, the frozenset of detached components); calling
  `variants(variant, *args)` runs it, compiling it with `jax.jit` on the first
  call with those argument shapes, dtypes and shardings. At most
  `max_variants` compiled steps are kept (least recently used goes first);
  `compilations` counts every compilation, and a `RuntimeWarning` says so
  when they exceed `warn_after` (thrashing). With `donate_argnums` the inputs
  at those positions are donated to XLA (they are deleted by the call, so
  the caller must use the returned values instead); nothing is donated by
  default.
  """

  def __init__(
    self,
    make: Callable[[Hashable], Callable[..., Any]],
    max_variants: int = 8,
    donate_argnums: tuple[int, ...] = (),
    warn_after: int | None = None,
  ):
    in_range("max_variants", max_variants, 1, None, integer=True)
    if warn_after is not None:
      in_range("warn_after", warn_after, 0, None, integer=True)
    self.make = make
    self.max_variants = int(max_variants)
    self.donate_argnums = tuple(donate_argnums)
    self.warn_after = 4 * self.max_variants if warn_after is None else int(warn_after)
    self.compilations = 0
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._costs: dict[Hashable, tuple[float, int]] = {}

  def compiled(self, variant: Hashable, *args: Any) -> Any:
    """The compiled step of `variant` for `args` (compiling it on a miss)."""
    key = (variant, _signature(args))
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    step = self.make(variant)
    fn = jax.jit(step, donate_argnums=self.donate_argnums)
    compiled = fn.lower(*args).compile()
    self.compilations += 1
    if self.compilations == self.warn_after + 1:
      warnings.warn(
        f"StepVariants compiled {self.compilations} times, more than "
        f"warn_after={self.warn_after}; with max_variants={self.max_variants} "
        "the cache may be thrashing (raise max_variants, or decide less often).",
        RuntimeWarning,
        stacklevel=2,
      )
    self._cache[key] = compiled
    # XLA counts a scan's body once: count a program with scans unrolled
    # (one more compilation); any other from the program just compiled.
    flops, peak = compiled_cost(compiled)
    if has_scan(step, *args):
      flops = flops_of(step, *args, compiled=True)
    self._costs[key] = (flops, peak)
    if len(self._cache) > self.max_variants:
      self._cache.popitem(last=False)
    return compiled

  def has(self, variant: Hashable, *args: Any) -> bool:
    """Whether the step of `variant` for `args` is compiled and kept."""
    return (variant, _signature(args)) in self._cache

  def cost(self, variant: Hashable, *args: Any) -> tuple[float, int]:
    """(FLOPs, peak bytes) of the compiled step of `variant` for `args`
    (`flops_of`: scans counted in full; a runtime-gated step's count holds
    both sides of each gate)."""
    key = (variant, _signature(args))
    if key not in self._costs:
      self.compiled(variant, *args)
    return self._costs[key]

  def __call__(self, variant: Hashable, *args: Any) -> Any:
    return self.compiled(variant, *args)(*args)


MODES = ("runtime", "compiled")
_RUNTIME = "runtime"  # The one variant key of a runtime-gated step.


class SparseTrainStep:
  """Runs the detached set a `Budget` chooses, step after step.

  `sparse(t, params, opt_state, *args)` runs step number `t` (counting from
  0, in order) with the components the budget leaves untrained detached, and
  returns `(out, params, opt_state)`. The host reads RGFT's EMA error map
  from `opt_state` only at the budget's decision steps, so in between the
  device is never waited on. Compiled steps live in `variants` (a
  `StepVariants`; nothing is donated).

  Two modes (see `detachable_step`):

  * `"runtime"`: one compiled step takes the detached set as a boolean array,
    so every set, and a rule that re-draws it every step, costs one
    compilation; savings are real inside scans over layers. Each
    component's forward pass and the residuals kept for its backward pass
    remain (the floor is higher than a compiled variant's).
  * `"compiled"`: one compiled step per detached set; XLA removes the
    detached backward passes and their activations (lower time and peak
    memory for a set that is reused), but inside a scan a per-layer set
    saves nothing.

  Args:
    step: a step from `detachable_step` (Linen).
    budget: the `Budget` deciding what is trained.
    max_variants: compiled variants kept (compiled mode).
    mode: `"runtime"`, `"compiled"`, or None: runtime when a component is a
      layer of a scan over layers (the step's `Components.layer_groups`
      hold some), compiled otherwise.
    sensitivity: for a `"dropbp"` budget, `sensitivity(params, opt_state,
      *args)` returning DropBP's sensitivity per component (see
      `dropbp_sensitivity`); called once, at the budget's `allocation_step`.
  """

  def __init__(
    self,
    step: Callable[..., Any],
    budget: Any,
    max_variants: int = 8,
    mode: str | None = None,
    sensitivity: Callable[..., Any] | None = None,
  ):
    if mode is None:
      components = getattr(step, "components", None)
      scanned = components is not None and bool(components.layer_groups)
      mode = _RUNTIME if scanned else "compiled"
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}.")
    if budget.rule == "greentrainer":
      raise ValueError(
        "A 'greentrainer' budget freezes tensors and decides from their "
        "importance: run it with rgft_jax.freeze_step, not SparseTrainStep."
      )
    if budget.rule == "dropbp" and sensitivity is None:
      raise ValueError(
        "A 'dropbp' budget allocates its rates from DropBP's sensitivity: pass "
        "sensitivity= (see rgft_jax.dropbp_sensitivity)."
      )
    self.budget = budget
    self.mode = mode
    self.names = tuple(budget.costs.names)
    self.sensitivity = sensitivity

    def make(variant):
      if variant == _RUNTIME:
        return lambda *a: step(*a[:-1], detached=a[-1])
      return lambda *a: step(*a, detached=variant)

    self.variants = StepVariants(make, max_variants)

  @property
  def compilations(self) -> int:
    return self.variants.compilations

  def flags(self, detached: frozenset[str]) -> np.ndarray:
    """`detached` as the boolean array a runtime step takes."""
    return np.array([n in detached for n in self.names], bool)

  def __call__(self, t: int, params: Any, opt_state: Any, *args: Any):
    total = self.budget.total_steps
    if not 0 <= t < total:
      raise ValueError(f"step {t} is outside the budget's run of {total} steps.")
    if self.budget.wants_sensitivity(t):
      assert self.sensitivity is not None  # Checked when made.
      self.budget.allocate(self.sensitivity(params, opt_state, *args))
    if self.budget.due(t):
      ema = jax.device_get(residual_error_state(opt_state).ema)
      self.budget.decide(t, ema)
    detached = self.budget.variant(t)
    if self.mode == _RUNTIME:
      out = self.variants(_RUNTIME, params, opt_state, *args, self.flags(detached))
    else:
      out = self.variants(detached, params, opt_state, *args)
    self.budget.spend(t, detached)
    return out
