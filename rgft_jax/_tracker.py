"""ErrorTracker: per-component error attribution from a Flax model.

Component outputs are captured by method interception while the user's own loss
function runs, so the model's code is never edited: `flax.linen.intercept_methods`
for Linen, a scoped wrapper of `__call__` for Flax NNX modules (NNX has no
interceptor API). Each tapped output `h` gets a zero perturbation
`h + d` made inside the traced function (what Flax's `perturb` does, but
made at the shape of this call, so any batch size works), and one backward pass
gives `dL/dh = dL/dd` for every tap at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from collections.abc import Collection
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rgft_jax._components import Components

Path = tuple[str, ...]
Module = nn.Module | nnx.Module
Select = str | Callable[[Path, Module], bool]

METHODS = ("norm_product", "taylor", "ablation")
_BRANCH_CLASS = re.compile(r"(?i)mlp|feed_?forward|ffn")
_NORM_CLASS = re.compile(r"(?i)norm")


_ATTENTION = (nn.MultiHeadDotProductAttention, nnx.MultiHeadAttention)


def _is_branch(path: Path, module: Module) -> bool:
  """A transformer block's attention or MLP branch."""
  del path
  return isinstance(module, _ATTENTION) or bool(
    _BRANCH_CLASS.search(type(module).__name__)
  )


def _is_linen_head_projection(path: Path, module: nn.Module) -> bool:
  """The output projection of `nn.MultiHeadDotProductAttention` (its input is per head)."""
  del path
  return (
    isinstance(module, nn.DenseGeneral)
    and module.name == "out"
    and isinstance(module.parent, nn.MultiHeadDotProductAttention)
  )


@dataclasses.dataclass(frozen=True)
class _Tap:
  path: Path
  heads: int | None  # Number of heads for a per-head tap, None for a whole output.
  feeder: Path | None = None  # Norm layer called just before, owned with the tap.


class ErrorTracker:
  """Loss, gradients and the batch's error map of a Flax model in one pass.

  Args:
    model: the `flax.linen.Module` the loss function applies, or the
      `flax.nnx.Module` it calls (taps are found on the model object that
      `value_and_grad`'s wrapper receives, so it works under `nnx.jit`).
    select: which submodules are components: `"branches"` (each attention and
      MLP branch of a transformer block, measured on the branch output before it
      joins the residual stream: every `nn.MultiHeadDotProductAttention` and every
      module whose class name says MLP/FeedForward/FFN), `"heads"` (every head of
      every `nn.MultiHeadDotProductAttention`, measured on the per-head output
      before the output projection), or a predicate `select(path, module)` on
      the module path (a tuple of names) and the bound module.
    method: `"norm_product"` (per example `||dL/dh|| ||h||`, batch mean),
      `"taylor"` (per example `|<dL/dh, h>|`, batch mean) or `"ablation"`
      (exact `L - L(component output zeroed)`, one extra forward per component).

  The loss function must return the mean over the batch of per-example losses,
  and tapped outputs must have the batch on their leading axis: then
  `dL_b/dh[b] = B dL/dh[b]` gives every per-example gradient from one backward
  pass. Models that couple examples (batch norm in training mode) break that
  identity; their per-example attributions are then approximate.

  Examples:
    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp
    >>> import rgft_jax
    >>> class Mlp(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = x + Mlp()(nn.LayerNorm()(x))
    ...     return x + Mlp()(nn.LayerNorm()(x))
    >>> model, x = Net(), jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tracker = rgft_jax.ErrorTracker(model, select="branches")
    >>> tracker.components(params, x).names
    ('Mlp_0', 'Mlp_1')
    >>> loss_fn = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
    >>> loss, grads, error_map = tracker.value_and_grad(loss_fn)(params, x)
    >>> sorted(error_map)
    ['Mlp_0', 'Mlp_1']
  """

  def __init__(
    self, model: Module, select: Select = "branches", method: str = "norm_product"
  ):
    if not isinstance(model, (nn.Module, nnx.Module)):
      hint = ""
      if isinstance(getattr(model, "module", None), nn.Module):
        hint = (
          " It looks like a wrapper (a Hugging Face Flax model, say) around a "
          "Linen module: pass its `.module`, and apply that with "
          "`{'params': model.params}`."
        )
      raise TypeError(
        "model must be a flax.linen.Module or a flax.nnx.Module, got "
        f"{type(model).__name__}.{hint}"
      )
    if method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if isinstance(select, str):
      if select not in ("branches", "heads"):
        raise ValueError(
          f"select must be 'branches', 'heads' or a predicate, got {select!r}."
        )
    elif not callable(select):
      raise TypeError(
        f"select must be a string or a callable, got {type(select).__name__}."
      )
    self.model = model
    self.select = select
    self.method = method
    self._owned: tuple[str, ...] | None = None  # Names from `components()`.

  @property
  def _is_nnx(self) -> bool:
    return isinstance(self.model, nnx.Module)

  # Interception.

  def _wants_output(self, path: Path, module: Module) -> bool:
    if not path or self.select == "heads":
      return False
    if self.select == "branches":
      return _is_branch(path, module)
    return bool(self.select(path, module))

  def _handler(
    self, visit: Callable[[_Tap, Any], Any], calls: list | None, is_head_projection
  ):
    """`handle(path, module, next_fun, args, kwargs)` for one module call.

    Passes each tapped value through `visit(tap, value)`; with `calls`, also
    records `(path, module)` of every call, in order.
    """
    last_done: dict[Path, tuple[Path, Module]] = {}

    def handle(path, module, next_fun, args, kwargs, lifted=None):
      if calls is not None:
        calls.append((path, module))
      if self.select == "heads" and is_head_projection(path, module):
        _refuse_lifted(path, lifted)
        heads = args[0].shape[-2]
        x = visit(_Tap(path[:-1], heads), args[0])
        return next_fun(x, *args[1:], **kwargs)
      before = last_done.get(path[:-1]) if path else None
      out = next_fun(*args, **kwargs)
      if path:
        last_done[path[:-1]] = (path, module)
      if not self._wants_output(path, module):
        return out
      _refuse_lifted(path, lifted)
      feeder = None
      if before is not None and _NORM_CLASS.search(type(before[1]).__name__):
        feeder = before[0]
      return visit(_Tap(path, None, feeder), out)

    return handle

  def _bind(self, loss_fn: Callable[..., Any], model_or_params: Any, args, kwargs):
    """`(params, run, finish)` for `loss_fn(model_or_params, *args, **kwargs)`.

    `run(params, visit, calls=None)` calls the loss function on `params` with
    the taps in place and returns `(output, state)`; `finish(state)` writes the
    model state the call changed back (NNX) or does nothing (Linen).
    """
    if not self._is_nnx:

      def run(params, visit, calls=None):
        handle = self._handler(visit, calls, _is_linen_head_projection)

        # Modules inside a lifted transform (nn.scan, nn.remat, ...) run in
        # scopes of their own, whose root is not the model's.
        seen = {"root": None, "lifted": "a lifted transform"}

        def interceptor(next_fun, call_args, call_kwargs, context):
          kind = type(context.module)
          if kind.__module__ == "flax.linen.transforms":  # nn.scan(Block), say.
            seen["lifted"] = kind.__name__
            return next_fun(*call_args, **call_kwargs)
          root = context.module.scope
          while root.parent is not None:
            root = root.parent
          if seen["root"] is None:
            seen["root"] = root
          if context.method_name != "__call__":
            return next_fun(*call_args, **call_kwargs)
          path = tuple(context.module.scope.path)
          inside = None if root is seen["root"] else seen["lifted"]
          return handle(path, context.module, next_fun, call_args, call_kwargs, inside)

        with nn.intercept_methods(interceptor):
          return loss_fn(params, *args, **kwargs), None

      return model_or_params, run, lambda state: None

    model = model_or_params
    if not isinstance(model, nnx.Module):
      raise TypeError(
        "With a Flax NNX model, the loss function's first argument is the model "
        f"(an nnx.Module), got {type(model).__name__}."
      )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, visit, calls=None, rest=rest):
      live = nnx.merge(graphdef, params, rest, copy=True)
      with _nnx_taps(live, self._handler(visit, calls, _is_nnx_head_projection(live))):
        out = loss_fn(live, *args, **kwargs)
      return out, nnx.split(live, nnx.Param, ...)[2]

    return params, run, lambda state: nnx.update(model, state)

  def _record(self, run, params) -> tuple[list[tuple[_Tap, Any]], list]:
    """Taps (with abstract values) and module calls of `run(params, ...)`."""
    taps, calls = [], []

    def visit(tap, value):
      _check_tappable(tap, value)
      taps.append((tap, jax.tree.map(_Abstract.of, value)))
      return value

    jax.eval_shape(lambda p: run(p, visit, calls)[0], params)
    if not taps:
      modules = sorted({"/".join(p) for p, _ in calls if p})
      raise ValueError(
        f"select={_describe(self.select)} matched no submodule of "
        f"{type(self.model).__name__}; its submodules are: {modules}."
      )
    return taps, calls

  # Components.

  def components(self, params: Any, *inputs: Any, **call_kwargs: Any) -> Components:
    """The components the taps define, with the parameters each one owns.

    Calls the model on `inputs` abstractly (no FLOPs, no state change; inputs
    and parameters may be `jax.ShapeDtypeStruct`s) to find
    the tapped modules: `model.apply({"params": params}, *inputs, **call_kwargs)`
    for Linen, `model(*inputs, **call_kwargs)` for NNX, where `params` is
    `nnx.state(model, nnx.Param)`. A whole-output tap owns the parameters under
    its module, and the norm layer called just before it in the same parent
    (the pre-norm that feeds a residual branch); a head owns its slices of the
    query/key/value kernels and biases and of the output kernel. Every other
    parameter (embeddings, a new head, shared biases) is in no component;
    `Components.unassigned(params)` lists them. Names come in the order the
    model calls the tapped modules (input side first).
    """
    # Abstract inputs (jax.ShapeDtypeStruct) stand for arrays of their shape.
    inputs = jax.tree.map(
      lambda a: (
        jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a
      ),
      inputs,
    )
    if self._is_nnx:
      if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
      model = self.model

      def call(m):
        return m(*inputs, **call_kwargs)

    else:
      model = params

      kwargs = dict(call_kwargs)
      # Other collections (batch statistics, say) are made on the fly.
      kwargs.setdefault("mutable", nn.DenyList("params"))

      def call(p):
        return self.model.apply({"params": p}, *inputs, **kwargs)

    bound, run, _ = self._bind(call, model, (), {})
    taps, _ = self._record(run, bound)
    rules = []
    seen = set()
    for tap, _ in sorted(taps, key=lambda t: -len(t[0].path)):
      if tap in seen:
        continue
      seen.add(tap)
      prefix = re.escape("/".join(tap.path))
      name = "/".join(tap.path).replace("\\", "\\\\")
      if tap.heads is None:
        rules.append((prefix + r"/.*", name))
        if tap.feeder is not None:
          rules.append((re.escape("/".join(tap.feeder)) + r"/.*", name))
      else:
        head_name = name + "/head{head}"
        rules += [
          (prefix + r"/(query|key|value)/(kernel|bias)", head_name, -2),
          (prefix + r"/out/kernel", head_name, 0),
        ]
    rules.append((r".*", None))
    comps = Components.from_regex(params, rules)
    called = [name for tap, _ in taps for name, _ in _columns(tap)]
    comps = _in_order(comps, list(dict.fromkeys(called)))
    # Taps that own no parameter (a dropout, a parent of tapped children) are
    # no component: `value_and_grad` leaves them out of the error map too.
    self._owned = comps.names
    return comps

  # Attribution.

  def value_and_grad(
    self,
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
    measure: Collection[str] | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    detach: Collection[str] = (),
  ) -> Callable[..., Any]:
    """Wraps `loss_fn` to return `(loss, grads, error_map)`.

    Linen: `loss_fn(params, *args, **kwargs)` applies the model itself (with its
    own rngs and `mutable` collections) and `grads` is like `params`. NNX:
    `loss_fn(model, *args, **kwargs)` calls the model, `grads` is the
    `nnx.State` of its `nnx.Param`s (as from `nnx.grad`), and state the call
    changes (batch statistics, RNG counters) is written back to the model.
    With `has_aux`, `loss_fn` returns `(loss, aux)` and the first output is
    `(loss, aux)`, as with `jax.value_and_grad`. `error_map` maps each
    component name to a float32 scalar, ready for `rgft()`'s `error_map=`.
    Call it inside `jax.jit` (`nnx.jit` for NNX); it works on any batch size.

    `measure` limits the attribution to those component names; the others
    get NaN (which `rgft()` reads as "not measured": their EMA is kept) and
    their outputs are not perturbed, so the backward pass need not reach them.

    `detach` names components whose output is detached: `h` becomes
    `stop_gradient(h) + d`, so no gradient flows back through the component
    (XLA drops its whole backward pass, weight and input gradients) while
    the rest of the model is differentiated as usual. A detached component is
    still measured: `dL/dd` is the cotangent at its output, so its attribution
    equals the undetached one on the same batch. Its parameters get zero
    gradients (a head's slice of the output projection still gets its own).

    Inside `jax.shard_map` with the batch split over `axis_name` (parameters
    replicated), pass `axis_name`: the loss and the error map are averaged
    over it and the gradients become those of the global batch-mean loss.
    (`shard_map` already sums the gradients of replicated parameters over the
    axis; they are divided by its size, or averaged where they are not summed.)
    Under `jax.jit` with sharded inputs nothing needs to be passed.
    """

    def wrapped(model_or_params, *args, **kwargs):
      params, run, finish = self._bind(loss_fn, model_or_params, args, kwargs)
      recorded, _ = self._record(run, params)
      names = list(dict.fromkeys(n for tap, _ in recorded for n, _ in _columns(tap)))
      if self._owned is not None:
        names = [n for n in names if n in self._owned]
      wanted = set(names) if measure is None else set(measure)
      detached = frozenset(detach)
      for what, given in (("measure", wanted), ("detach", detached)):
        if given - set(names):
          raise ValueError(
            f"{what} names unknown components {sorted(given - set(names))}; "
            f"the components are {names}."
          )
      recorded = [
        (tap, v) for tap, v in recorded if any(n in wanted for n, _ in _columns(tap))
      ]
      measured = {tap for tap, _ in recorded}

      def complete(error_map):
        nan = jnp.full((), jnp.nan, jnp.float32)
        return {n: error_map[n] if n in wanted else nan for n in names}

      if self.method == "ablation":
        taps = [tap for tap, _ in recorded]
        (loss, aux), grads, error_map, state = self._ablation(
          run, has_aux, taps, params, detached
        )
        finish(state)
        error_map = complete(error_map)
        if axis_name is not None:
          loss, grads, error_map = _across(axis_name, loss, grads, error_map)
        return ((loss, aux) if has_aux else loss), grads, error_map

      def perturbed(params, deltas):
        values = []
        it = iter(deltas)

        def visit(tap, value):
          if tap not in measured:
            return _detach(tap, value, detached)
          values.append((tap, value))
          return jax.tree.map(jnp.add, _detach(tap, value, detached), next(it))

        out, state = run(params, visit)
        loss, aux = out if has_aux else (out, None)
        return loss, (aux, values, state)

      zeros = [jax.tree.map(_Abstract.zeros, v) for _, v in recorded]
      (loss, (aux, values, state)), (grads, dgrads) = jax.value_and_grad(
        perturbed, argnums=(0, 1), has_aux=True
      )(params, zeros)
      finish(state)
      error_map = complete(self._cheap_map(values, dgrads))
      if axis_name is not None:
        loss, grads, error_map = _across(axis_name, loss, grads, error_map)
      return ((loss, aux) if has_aux else loss), grads, error_map

    return wrapped

  def _cheap_map(self, values, dgrads) -> dict[str, jax.Array]:
    per_example: dict[str, jax.Array] = {}
    batch = None
    for (tap, h), g in zip(values, dgrads, strict=True):
      h_leaves, g_leaves = jax.tree.leaves(h), jax.tree.leaves(g)
      b = h_leaves[0].shape[0]
      batch = b if batch is None else batch
      if b != batch:
        raise ValueError(
          f"Tapped outputs disagree on the batch size (leading axis): {'/'.join(tap.path)} "
          f"has {b}, an earlier tap has {batch}."
        )
      # Per-example gradient of a batch-mean loss: B times the batch gradient.
      hh = sum(_per_example(x * x, tap) for x in _f32(h_leaves))
      gg = sum(_per_example(x * x, tap) for x in _f32(g_leaves)) * float(b) ** 2
      gh = sum(
        _per_example(x * y, tap)
        for x, y in zip(_f32(g_leaves), _f32(h_leaves), strict=True)
      ) * float(b)
      for name, cols in _columns(tap):
        prev = per_example.get(name)
        if self.method == "norm_product":
          val = (
            jnp.sqrt(gg[:, cols]) * jnp.sqrt(hh[:, cols])
            if cols is not None
            else jnp.sqrt(gg) * jnp.sqrt(hh)
          )
        else:
          val = gh[:, cols] if cols is not None else gh
        per_example[name] = val if prev is None else prev + val
    if self.method == "taylor":
      per_example = {k: jnp.abs(v) for k, v in per_example.items()}
    return {k: jnp.mean(v) for k, v in per_example.items()}

  def _ablation(self, run, has_aux, taps, params, detached):
    names = list(dict.fromkeys(name for tap in taps for name, _ in _columns(tap)))
    position = {name: i for i, name in enumerate(names)}

    known = set(taps)

    def masked_loss(params, keep):
      def visit(tap, value):
        value = _detach(tap, value, detached)
        if tap not in known:
          return value
        idx = np.array([position[name] for name, _ in _columns(tap)])
        k = keep[idx]

        def scale(v):
          if tap.heads is None:
            return v * k[0].astype(v.dtype)
          shape = (1,) * (v.ndim - 2) + (tap.heads, 1)  # Along the head axis.
          return v * k.reshape(shape).astype(v.dtype)

        return jax.tree.map(scale, value)

      out, state = run(params, visit)
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


def _refuse_lifted(path: Path, lifted: str | None) -> None:
  """A clear error for a tap inside a Linen lifted transform (not supported yet)."""
  if lifted is None:
    return
  raise ValueError(
    f"Cannot tap {'/'.join(path)!r}: it runs inside the lifted transform "
    f"{lifted} (flax.linen.scan, remat/checkpoint, vmap, ...: Hugging Face's "
    "gradient_checkpointing uses remat), and taps there are not supported yet. "
    "Unroll the layers (scan=False, no remat) or select modules outside it."
  )


def _describe(select: Select) -> str:
  """What `select` looks for, for error messages."""
  if select == "branches":
    return (
      "'branches' (looks for flax.linen.MultiHeadDotProductAttention, "
      "flax.nnx.MultiHeadAttention, and modules whose class name matches "
      f"{_BRANCH_CLASS.pattern!r})"
    )
  if select == "heads":
    return (
      "'heads' (looks for the `out` projection of flax.linen."
      "MultiHeadDotProductAttention and flax.nnx.MultiHeadAttention)"
    )
  try:
    source = inspect.getsource(select).strip()
  except (OSError, TypeError):
    source = getattr(select, "__qualname__", repr(select))
  return f"the predicate {source!r}"


def _in_order(comps: Components, order: list[str]) -> Components:
  """`comps` with its names in `order` (those that own parameters)."""
  names = [n for n in order if n in comps.names]
  position = {n: i for i, n in enumerate(names)}
  new = np.array([position[n] for n in comps.names] + [-1], np.int32)  # -1 stays.
  return Components(
    tuple(names), jax.tree.map(lambda i: new[np.asarray(i)], comps.index)
  )


@dataclasses.dataclass(frozen=True)
class _Abstract:
  """Shape, dtype and varying manual axes (inside `shard_map`) of a tapped value."""

  shape: tuple[int, ...]
  dtype: Any
  vma: tuple[str, ...] = ()

  @classmethod
  def of(cls, value) -> _Abstract:
    return cls(tuple(value.shape), value.dtype, tuple(sorted(_varying(value))))

  def zeros(self) -> jax.Array:
    z = jnp.zeros(self.shape, self.dtype)
    # Varying like the value it perturbs, so its gradient is per device.
    return jax.lax.pcast(z, self.vma, to="varying") if self.vma else z


def _varying(x) -> frozenset[str]:
  """The manual mesh axes `x` varies over inside `shard_map` (empty outside)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)  # Newer JAX.
  varying = mat.varying if mat is not None else getattr(aval, "vma", ())
  return frozenset(varying or ())


def _across(axis_name, loss, grads, error_map):
  """Loss, gradients and error map of the whole batch split over `axis_name`.

  With `shard_map`'s varying-axes checks on (the default), the loss varies
  over the axis and the gradient of a replicated parameter arrives already
  summed over it; with them off, every gradient is the local one.
  """
  axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  size = jax.lax.psum(1, axes)
  checked = set(axes) <= _varying(loss)

  def grad(g):
    summed = checked and not set(axes) & _varying(g)
    return g / size if summed else jax.lax.pmean(g, axes)

  loss = jax.lax.pmean(loss, axes)
  error_map = {k: jax.lax.pmean(v, axes) for k, v in error_map.items()}
  return loss, jax.tree.map(grad, grads), error_map


def _f32(leaves):
  return [jnp.asarray(x, jnp.float32) for x in leaves]


def _per_example(x: jax.Array, tap: _Tap) -> jax.Array:
  """Sums over all axes but the batch (and the head axis of a per-head tap)."""
  if tap.heads is None:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)
  x = jnp.moveaxis(x, -2, 1)
  return jnp.sum(x.reshape(x.shape[0], x.shape[1], -1), axis=2)


def _detach(tap: _Tap, value: Any, detached: frozenset[str]) -> Any:
  """`value` with the outputs of `detached` components behind `stop_gradient`."""
  cols = [c for name, c in _columns(tap) if name in detached]
  if not cols:
    return value
  if tap.heads is None or len(cols) == tap.heads:
    return jax.tree.map(jax.lax.stop_gradient, value)
  mask = np.zeros(tap.heads, bool)
  mask[cols] = True
  mask = mask[:, None]  # Heads on the second-to-last axis.
  return jax.tree.map(lambda v: jnp.where(mask, jax.lax.stop_gradient(v), v), value)


def _columns(tap: _Tap) -> list[tuple[str, int | None]]:
  name = "/".join(tap.path)
  if tap.heads is None:
    return [(name, None)]
  return [(f"{name}/head{h}", h) for h in range(tap.heads)]


def _check_tappable(tap: _Tap, value: Any) -> None:
  leaves = jax.tree.leaves(value)
  bad = [
    type(v).__name__ if not hasattr(v, "shape") else f"{v.dtype}{list(v.shape)}"
    for v in leaves
    if not hasattr(v, "shape")
    or not jnp.issubdtype(v.dtype, jnp.floating)
    or v.ndim < 1
  ]
  if not leaves or bad:
    raise ValueError(
      f"Cannot tap the output of {'/'.join(tap.path)!r}: every leaf must be a "
      f"floating array with a leading batch axis; got {bad or 'no arrays'}."
    )


def _is_nnx_head_projection(model: nnx.Module) -> Callable[[Path, Any], bool]:
  """Whether `(path, module)` is the output projection of an `nnx.MultiHeadAttention`."""
  attention = {
    tuple(str(k) for k in path)
    for path, m in nnx.iter_modules(model)
    if isinstance(m, nnx.MultiHeadAttention)
  }
  return lambda path, module: (
    bool(path) and path[-1] == "out" and path[:-1] in attention
  )


@contextlib.contextmanager
def _nnx_taps(model: nnx.Module, handle):
  """Routes every `__call__` of `model`'s submodules through `handle`.

  NNX has no method interceptor, so each class defining `__call__` among the
  model's modules gets a wrapper for the duration of the context. The wrapper
  acts only on this model's module objects and only on the outermost
  `__call__` of each (a subclass calling `super().__call__` is one call); any
  other instance runs unchanged. Tracing is single-threaded in practice, but
  another thread calling the same classes meanwhile would see the wrapper too.
  """
  modules = {
    id(m): (tuple(str(k) for k in path), m) for path, m in nnx.iter_modules(model)
  }
  classes = {
    cls
    for _, m in modules.values()
    for cls in type(m).__mro__
    if "__call__" in vars(cls) and cls not in (object, nnx.Module)
  }
  active: set[int] = set()

  def wrap(original):
    @functools.wraps(original)
    def call(self, *args, **kwargs):
      entry = modules.get(id(self))
      if entry is None or entry[1] is not self or id(self) in active:
        return original(self, *args, **kwargs)
      active.add(id(self))
      try:
        return handle(entry[0], self, functools.partial(original, self), args, kwargs)
      finally:
        active.discard(id(self))

    return call

  originals = {cls: vars(cls)["__call__"] for cls in classes}
  try:
    for cls, original in originals.items():
      cls.__call__ = wrap(original)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original
