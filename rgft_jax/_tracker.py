"""ErrorTracker: per-component error attribution from a Flax model.

Component outputs are captured by method interception while the user's own loss
function runs, so the model's code is never edited (`rgft_jax._intercept`).
Each measured output goes through an identity whose backward pass collects
per-example statistics (`rgft_jax._attribution`), so one backward pass gives
every component's attribution; the components and the parameters they own
come from the same calls (`rgft_jax._discovery`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Mapping
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rgft_jax._attribution import METHODS
from rgft_jax._backends import Bound
from rgft_jax._backends import backend
from rgft_jax._collectives import Abstract
from rgft_jax._collectives import across
from rgft_jax._components import Components
from rgft_jax._discovery import NORM_CLASS
from rgft_jax._discovery import Select
from rgft_jax._discovery import build_components
from rgft_jax._discovery import columns
from rgft_jax._discovery import ordered_names
from rgft_jax._discovery import owned_paths
from rgft_jax._heads import Heads
from rgft_jax._heads import head_owners
from rgft_jax._intercept import Call
from rgft_jax._intercept import Path
from rgft_jax._intercept import Tap
from rgft_jax._intercept import check_lifted
from rgft_jax._passes import Runtime
from rgft_jax._passes import ablation
from rgft_jax._passes import cheap
from rgft_jax._plan import Plan
from rgft_jax._plan import all_shared
from rgft_jax._plan import branches_of
from rgft_jax._selectors import Found
from rgft_jax._selectors import selector
from rgft_jax._structure import Structure
from rgft_jax._structure import trace

Module = nn.Module | nnx.Module


class ErrorTracker:
  """Loss, gradients and the batch's error map of a Flax model in one pass.

  Args:
    model: the `flax.linen.Module` the loss function applies, or the
      `flax.nnx.Module` it calls (taps are found on the model object that
      `value_and_grad`'s wrapper receives, so it works under `nnx.jit`).
    select: which submodules are components: `"branches"` (the residual
      branches, found from the model's dataflow: a module whose output is
      added back to the value it read, measured at that output and owning the
      parameters only it computes with, e.g. its pre-norm (a parameter
      several branches compute with belongs to none); each call of a module
      is a site of its own, so a dropout or drop-path reused after several
      branches carries one component per call, named after the module whose
      output it carries (`block0/fc2`, `block0/mlp`); where a module returns
      a tuple, only the entry added to the stream is measured and detached;
      names and classes do not matter, see `rgft_jax._structure`; a model with no
      such add falls back to every `nn.MultiHeadDotProductAttention` /
      `nnx.MultiHeadAttention` and every module whose class name says
      MLP/FeedForward/FFN), `"heads"` (every head of every attention, found
      from the dataflow: measured on its slice of the output projection's
      input, and owning the entries of the query/key/value kernels and
      biases (separate or fused) and of the output kernel that it alone
      computes with; entries several heads share, such as a grouped-query
      key/value head or the output bias, belong to no head; see
      `rgft_jax._heads`; falls back to flax's attention classes), or a
      predicate `select(path, module)` on the module path (a tuple of names)
      and the module.
    method: `"norm_product"` (per example `||dL/dh|| ||h||`, batch mean),
      `"taylor"` (per example `|<dL/dh, h>|`, batch mean) or `"ablation"`
      (exact `L - L(component output zeroed)`, one extra forward per component).
    owns: which parameters each component scales, where that is not what
      `select` measures: `owns(path, module)` gets a tapped module's path and
      module and returns the module paths (tuples of names, or `/`-joined
      strings, from the model's root) whose parameters the component owns, in
      place of the default (the tapped module's own parameters and the norm
      layer called just before it). Use it to measure at a Dense inside a
      module that adds the residual itself (Hugging Face's `FlaxBertSelfOutput`)
      while scaling the whole attention. A parameter under several components'
      paths goes to the deepest path; two components claiming it through the
      same path is an error. Not for `select="heads"`.

  The loss function must return the mean over the batch of per-example losses,
  and tapped outputs must have the batch on their leading axis (or the batch
  with other axes flattened into it, batch-major, `[B * T, D]`: each
  example's rows are summed; the batch size is the inputs' most common
  leading axis): then
  `dL_b/dh[b] = B dL/dh[b]` gives every per-example gradient from one backward
  pass. Models that couple examples (batch norm in training mode) break that
  identity; their per-example attributions are then approximate.

  The tracker keeps nothing between calls, so no call changes what another
  returns: `plan()` gives what discovery finds in a model's call (the
  components, the residual branches or heads found, the layer groups of a
  scan) as an immutable `Plan`, `components()` its components, and
  `value_and_grad` finds the same from each trace's own arguments unless it is
  given that plan.

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
    self,
    model: Module,
    select: Select = "branches",
    method: str = "norm_product",
    owns: Callable[[Path, Module], Any] | None = None,
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
    self._selector = selector(select)
    self._backend = backend(model)  # Linen or NNX, decided once.
    self.model = model
    if owns is not None and (not self._selector.takes_owns or not callable(owns)):
      raise ValueError(
        "owns must be a callable owns(path, module) -> module paths, and heads "
        f"own their slices: got owns={owns!r} with select={select!r}."
      )
    self.select = select
    self.method = method
    self.owns = owns
    # The only state written after construction: what was warned about.
    self._nonfinite: set[str] = set()  # Components warned about.

  # Interception.

  def _handler(
    self,
    structure: Structure | None,
    attentions: Mapping[Path, Heads] | None,
    visit,
    calls: list | None,
    is_head_projection,
    around=None,
  ):
    """`handle(call, next_fun, args, kwargs)` for one module call, tapping
    what the selector wants given the residual branches (`structure`) or the
    attentions (by output projection path) found.

    Passes each tapped value through `visit(tap, value, read)`; with `calls`,
    also records `(path, module)` of every call, in order. With `around`, a
    whole-output tap's call runs as `around(tap, fn, args, read)`, where
    `fn(*args)` makes the call (runtime gating of its backward pass).
    """
    branches, shared = branches_of(structure), all_shared(structure)
    last_done: dict[Path, tuple[Path, Module]] = {}
    counts: dict[Path, int] = {}  # Calls of each module path so far.

    def tap(
      call: Call, path: Path, heads: int | None, feeder: Path | None, k: int = 0
    ) -> Tap:
      check_lifted(path, call.lifted)
      stacked = call.stacked()
      layers, root = stacked if stacked is not None else (None, ())
      owns, leaf = None, None
      if self.owns is not None and heads is None:
        owns = owned_paths(path, self.owns(path, call.module))
      elif branches and heads is None:
        branch = branches[(path, k)]
        path, leaf = branch.name, branch.leaf
        owns = tuple(tuple(p.split("/")) for p in branch.owns)
      return Tap(path, heads, feeder, call.path, layers, root, owns, call=k, leaf=leaf)

    def part(t: Tap, out, read):
      """`visit` on the leaf of `out` that `t` measures (all of it by default)."""
      if t.leaf is None:
        return visit(t, out, read)
      leaves, treedef = jax.tree.flatten(out)
      leaves[t.leaf] = visit(t, leaves[t.leaf], read)
      return jax.tree.unflatten(treedef, leaves)

    def handle(call: Call, next_fun, args, kwargs):
      path, module = call.path, call.module
      k = counts.get(path, 0)
      counts[path] = k + 1
      if calls is not None:
        calls.append((path, module))
      found = self._selector.heads_at(
        path, module, attentions, is_head_projection, args
      )
      if found is not None:
        t = dataclasses.replace(
          tap(call, found.attention, found.heads, None), features=found.features
        )
        return next_fun(visit(t, args[0], call.read), *args[1:], **kwargs)
      before = last_done.get(path[:-1]) if path else None
      feeder = None
      if before is not None and NORM_CLASS.search(type(before[1]).__name__):
        feeder = before[0]
      wanted = bool(path) and self._selector.wants_output(
        path, module, k, branches, shared
      )
      if wanted and around is not None:
        out = around(
          tap(call, path, None, feeder, k),
          lambda *a: next_fun(*a, **kwargs),
          args,
          call.read,
        )
      else:
        out = next_fun(*args, **kwargs)
      if path:
        last_done[path[:-1]] = (path, module)
      if not wanted:
        return out
      return part(tap(call, path, None, feeder, k), out, call.read)

    return handle

  def _runner(
    self,
    bound: Bound,
    structure: Structure | None = None,
    attentions: Mapping[Path, Heads] | None = None,
  ):
    """`run(params, visit, embed=None, calls=None, handle=None, around=None)`
    for a bound loss function: calls it on `params` with the taps that
    `structure` or `attentions` (what discovery found) place (or every module
    call given to `handle`; `around` see `_handler`) and returns `(output,
    state)`, `state` what `bound.finish` writes back."""

    def run(params, visit, embed=None, calls=None, handle=None, around=None):
      def make_handle(is_head_projection):
        if handle is not None:
          return handle
        return self._handler(
          structure, attentions, visit, calls, is_head_projection, around
        )

      return bound.call(params, make_handle, embed)

    return run

  def _record(
    self, run, params, inputs, shared: bool = False
  ) -> tuple[list[tuple[Tap, Any]], list]:
    """Taps (with abstract values) and module calls of `run(params, ...)`;
    `inputs` (the model's or the loss's arguments) tell the batch size;
    `shared`: every residual branch found computes only with shared
    parameters (then finding no tap is no error)."""
    taps: list[tuple[Tap, Any]] = []
    calls: list[tuple[Path, Module]] = []

    def visit(tap, value, read):
      del read
      _check_tappable(tap, value)
      taps.append((tap, jax.tree.map(Abstract.of, value)))
      return value

    with _rng_hint(self.model):
      jax.eval_shape(lambda p: run(p, visit, None, calls)[0], params)
    if not taps and not shared:
      modules = sorted({"/".join(p) for p, _ in calls if p})
      raise ValueError(
        f"select={self._selector.describe()} matched no submodule of "
        f"{type(self.model).__name__}; its submodules are: {modules}."
      )
    _batch_of(taps, inputs)
    return taps, calls

  def _find(self, bound: Bound, inputs: Any) -> tuple[Found, list[tuple[Tap, Any]]]:
    """`((structure, attentions), recorded)` for the bound call, from its own
    arguments alone: the residual branches or attention heads found by
    dataflow (nothing for a predicate: the selector's `find_structure`), and
    the taps recorded under them (with abstract values, see `_record`)."""
    plain = self._runner(bound)
    with _rng_hint(self.model):
      found = self._selector.find_structure(
        lambda: trace(
          lambda p, handle: plain(p, None, handle=handle), _abstract(bound.params)
        )
      )
    run = self._runner(bound, *found)
    recorded, _ = self._record(run, bound.params, inputs, all_shared(found[0]))
    return found, recorded

  def _plan_of(self, bound: Bound, inputs: Any, params: Any) -> tuple[Plan, list[str]]:
    """`(plan, notes)` for the bound call: the plan (its components indexing
    `params`) and a warning's text for each thing discovery could not place.
    Taps that own no parameter (a dropout, a parent of tapped children) are
    no component; a head's entries are found by `head_owners`' probe."""
    found, recorded = self._find(bound, inputs)
    structure, attentions = found
    taps = [tap for tap, _ in recorded]
    entries = {}
    if attentions:
      plain = self._runner(bound)
      owners = head_owners(
        lambda p, handle: plain(p, None, handle=handle)[0],
        _abstract(bound.params),
        attentions,
      )
      entries = _head_entries(taps, owners)
    comps = build_components(params, taps, ordered_names(taps), entries)
    notes: list[str] = []
    if structure is not None:
      comps, notes = _placed(comps, params, structure, type(self.model).__name__)
    if attentions and len(comps.names) < len(ordered_names(taps)):
      lost = [n for n in ordered_names(taps) if n not in comps.names]
      notes.append(
        f"The heads {lost} own no parameter entry that other heads do not "
        "share, so they are no component; value_and_grad without plan= "
        "measures every head of an attention found, so pass it "
        "plan=tracker.plan(...) to leave them out of its error map too."
      )
    groups = tuple(
      group
      for tap in dict.fromkeys(taps)
      if tap.layers is not None and tap.heads is None
      for group in [tuple(n for n, _, _ in columns(tap) if n in comps.names)]
      if group
    )
    comps = dataclasses.replace(comps, layer_groups=groups)
    return Plan(comps, structure, attentions), notes

  # Components.

  def plan(
    self, params: Any, *inputs: Any, rngs: Any = None, **call_kwargs: Any
  ) -> Plan:
    """What discovery finds in the model's call on `inputs`, as an immutable `Plan`.

    Takes what `components` takes and finds the same (see there): the plan's
    `components` are what `components(params, *inputs, ...)` returns, and it
    also holds the residual branches or attentions found from the dataflow,
    and the `layer_groups` (`scanned`). Give it to `value_and_grad(loss_fn,
    plan=plan)` to measure what it says instead of discovering the same again
    from each trace's arguments. Nothing is kept on the tracker: calling this
    (or `components`) first never changes what `value_and_grad` returns.

    Examples:
      >>> import flax.linen as nn
      >>> import jax, jax.numpy as jnp
      >>> import rgft_jax
      >>> class Block(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, _):
      ...     return x + nn.Dense(4, name="mlp")(x), None
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     scan = nn.scan(Block, variable_axes={"params": 0},
      ...                    split_rngs={"params": True}, length=3)
      ...     return scan(name="layers")(x, None)[0]
      >>> model, x = Net(), jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> plan = rgft_jax.ErrorTracker(model).plan(params, x)
      >>> plan.names
      ('layers/0/mlp', 'layers/1/mlp', 'layers/2/mlp')
      >>> plan.layer_groups
      (('layers/0/mlp', 'layers/1/mlp', 'layers/2/mlp'),)
    """
    return self._planned(params, inputs, rngs, call_kwargs)

  def _planned(self, params: Any, inputs: tuple, rngs: Any, call_kwargs: dict) -> Plan:
    """`plan(params, *inputs, rngs=rngs, **call_kwargs)`, warning (at the
    caller of `plan` or `components`) about what could not be placed."""
    # Abstract inputs (jax.ShapeDtypeStruct) stand for arrays of their shape.
    inputs = jax.tree.map(
      lambda a: (
        jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a
      ),
      inputs,
    )
    call, first, params = self._backend.model_call(params, inputs, rngs, call_kwargs)
    bound = self._backend.bind(call, first, (), {})
    plan, notes = self._plan_of(bound, (inputs, call_kwargs), params)
    for note in notes:
      warnings.warn(note, stacklevel=3)
    return plan

  def components(
    self, params: Any, *inputs: Any, rngs: Any = None, **call_kwargs: Any
  ) -> Components:
    """The components the taps define, with the parameters each one owns.

    Calls the model on `inputs` abstractly (no FLOPs, no state change; inputs
    and parameters may be `jax.ShapeDtypeStruct`s) to find
    the tapped modules: `model.apply({"params": params}, *inputs, **call_kwargs)`
    for Linen, `model(*inputs, **call_kwargs)` for NNX, where `params` is
    `nnx.state(model, nnx.Param)`. A whole-output tap owns the parameters under
    its module, and the norm layer called just before it in the same parent
    (the pre-norm that feeds a residual branch); a head owns its slices of the
    query/key/value kernels and biases and of the output kernel (with
    `select="heads"` these are found by running one backward pass per head
    index on random parameters of the same shapes). Every other
    parameter (embeddings, a new head, shared biases) is in no component;
    `Components.unassigned(params)` lists them. Names come in the order the
    model calls the tapped modules (input side first).

    A model that draws random numbers when called (dropout on, set at
    construction) needs `rngs`: for Linen what `model.apply` takes
    (`{"dropout": jax.random.key(0)}`), for NNX what the model's call takes,
    if anything (an NNX model usually holds its own `nnx.Rngs`). Any key will
    do: discovery does not depend on the values drawn.

    With `select="branches"`, a parameter computed into several branches (a
    shared position bias, a final norm every cross-attention reads, a layer
    reused across depth) belongs to none and trains at the full rate; they
    are listed in `Components.shared`; so is a norm that parallel branches
    summed before their residual add both read (GPT-J's `attn(ln(x)) +
    mlp(ln(x)) + x`). A model whose every branch computes only with shared
    parameters (ALBERT's one layer applied at every depth) has no component,
    which is warned about (it does not fall back to class names). A residual add
    that brings in parameters no branch explains is warned about, naming the
    module and the parameters, which are then in no component (measure them
    with a `select=` predicate, or give them to a component with `owns=`).

    Inside a scan over layers (`nn.scan` or `nnx.scan` of a module whose
    parameters are stacked on a leading layer axis, with or without remat),
    each layer is a component of its own, owning its slice of the stacked
    parameters and named like the same model unrolled into a list:
    `layers/3/mlp` for layer 3 of the scanned module `layers`. Taps inside
    other lifted transforms (vmap, nested scans) are refused here, naming the
    transform. Their `Components.layer_groups` list each tapped module's layers.

    A tap that owns no parameter (a dropout, a parent of tapped children) is
    no component, here or in `value_and_grad`'s error map. This is
    `plan(params, *inputs, ...).components`.
    """
    return self._planned(params, inputs, rngs, call_kwargs).components

  def _check_finite(self, error_map: dict[str, jax.Array]) -> None:
    """A warning, the first time, naming each component whose measured value
    is not finite (the transformation ignores such values and counts them).

    Under `jit` the check is a `lax.cond` on one reduction: the host is
    called back only on a step with a non-finite value, so a healthy run
    pays one `isfinite` over the map.
    """
    names = list(error_map)
    if not names:
      return
    values = jnp.stack([jnp.asarray(error_map[n], jnp.float32) for n in names])
    bad = ~jnp.isfinite(values)

    def report(bad):
      fresh = [
        n
        for n, b in zip(names, np.asarray(bad), strict=True)
        if b and n not in self._nonfinite
      ]
      if fresh:
        self._nonfinite.update(fresh)
        warnings.warn(
          f"The error map holds non-finite values for {fresh} (the loss or "
          "the component's output overflowed, or an output that is not added "
          "to the residual stream was measured). rgft() ignores them (its "
          "state counts them per component: ScaleByResidualErrorState."
          "nonfinite); this warning is given once per component.",
          RuntimeWarning,
          stacklevel=2,
        )

    jax.lax.cond(
      bad.any(),
      lambda b: jax.debug.callback(report, b),
      lambda b: None,
      bad,
    )

  @property
  def layer_groups(self) -> tuple[tuple[str, ...], ...]:
    """Not kept on the tracker: the layer groups come from the model's call.

    Read them from the plan or the components, `tracker.plan(params,
    *inputs).layer_groups` or `tracker.components(...).layer_groups`
    (`Components.layer_groups`); the tracker keeps nothing between calls.
    """
    raise ValueError(
      "The tracker keeps no layer groups: they come from the model's call. "
      "Read them from the plan or the components: tracker.plan(params, "
      "*inputs).layer_groups (.scanned), or tracker.components(params, "
      "*inputs).layer_groups."
    )

  @property
  def scanned(self) -> bool:
    """Not kept on the tracker: `tracker.plan(params, *inputs).scanned`, or
    whether `components(...).layer_groups` holds any (see `layer_groups`)."""
    return bool(self.layer_groups)

  # Attribution.

  def value_and_grad(
    self,
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
    measure: Collection[str] | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    detach: Collection[str] | jax.Array = (),
    recompute: bool = False,
    plan: Plan | None = None,
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

    A model that draws random numbers (dropout on) gets its keys through the
    loss function's own arguments: `value_and_grad(loss_fn)(params, x,
    rngs={"dropout": key})` hands `rngs` to `loss_fn`, which passes them to
    `model.apply`. A non-finite value in the map is warned about the first
    time for each component (a `lax.cond` on one `isfinite` reduction calls
    the host back only then); `rgft()` ignores such values and counts them.

    `measure` limits the attribution to those component names; the others
    get NaN (which `rgft()` reads as "not measured": their EMA is kept) and
    their outputs are not probed.

    `detach` names components whose output is detached: `h` becomes
    `stop_gradient(h)`, so no gradient flows back through the component
    (XLA drops its whole backward pass, weight and input gradients) while
    the rest of the model is differentiated as usual. A detached component is
    still measured: the cotangent at its output is computed anyway. Its
    parameters get zero gradients (a head's slice of the output projection
    still gets its own). Given as names, the detached set is static (one
    compiled program per set): inside a scan over layers, detaching some
    layers of a tap and not others is then a mask: the gradients are those of
    the detached model, but the scan's one body still runs every layer's
    backward pass, so only detaching a tap in every layer saves compute.

    Given as a boolean array with one entry per component (in the order of
    `components().names`; it may be traced), the set is decided at run time:
    each tapped call's backward pass sits in a `lax.cond` on its flag and runs
    only when the component is trained, in looped and scanned models alike,
    and one compiled program serves every set. The gradients are the same.
    Heads share their attention's computation: a detached head is masked
    (same gradients, no saving). With `recompute`, gated calls keep no
    residuals for the backward pass and a trained call recomputes its forward
    pass (less memory; see `rgft_jax._gate`).

    Inside `jax.shard_map` with the batch split over `axis_name` (parameters
    replicated), pass `axis_name`: the loss and the error map are averaged
    over it and the gradients become those of the global batch-mean loss.
    (`shard_map` already sums the gradients of replicated parameters over the
    axis; they are divided by its size, or averaged where they are not summed.)
    Under `jax.jit` with sharded inputs nothing needs to be passed.

    The components are those of `components()` on the same model: the taps
    that own some parameter, named in call order (a tapped dropout or a
    parent of tapped children is in no error map). Each trace finds them from
    its own arguments, whatever was called before: the residual branches or
    attentions from the dataflow, the parameters each whole-output tap owns,
    and every head of an attention found (each owns its rows of the output
    projection; the probe that `components()` runs for a head's other entries
    needs concrete values, so it runs there only). `plan`, from `plan()`,
    gives them instead, found once.
    """

    def wrapped(model_or_params, *args, **kwargs):
      bound = self._backend.bind(loss_fn, model_or_params, args, kwargs)
      params, finish = bound.params, bound.finish
      if plan is None:  # Found from this call's own arguments.
        found, recorded = self._find(bound, (args, kwargs))
        owned = set(_owned_names(recorded, found, _abstract(params)))
        run = self._runner(bound, *found)
      else:
        owned, run = set(plan.names), self._runner(bound, plan.structure, plan.heads)
        recorded, _ = self._record(run, params, (args, kwargs), plan.all_shared)
      taps = list(dict.fromkeys(tap for tap, _ in recorded))
      # Taps owning no parameter are no component.
      names = [n for n in ordered_names(taps) if n in owned]
      wanted = set(names) if measure is None else set(measure)
      detached = _detached(detach, names, recompute)
      static = detached if isinstance(detached, frozenset) else frozenset()
      for what, given in (("measure", wanted), ("detach", static)):
        if given - set(names):
          raise ValueError(
            f"{what} names unknown components {sorted(given - set(names))}; "
            f"the components are {names}."
          )
      measured = [t for t in taps if any(n in wanted for n, _, _ in columns(t))]

      def complete(error_map):
        nan = jnp.full((), jnp.nan, jnp.float32)
        return {n: error_map[n] if n in wanted else nan for n in names}

      if self.method == "ablation":
        (loss, aux), grads, error_map, state = ablation(
          run, has_aux, recorded, measured, params, detached
        )
      else:
        (loss, aux), grads, error_map, state = cheap(
          self.method,
          run,
          has_aux,
          recorded,
          measured,
          params,
          detached,
          _batch_of(recorded, (args, kwargs)),
        )
      finish(state)
      error_map = complete(error_map)
      if axis_name is not None:
        loss, grads, error_map = across(axis_name, loss, grads, error_map)
      self._check_finite({n: error_map[n] for n in names if n in wanted})
      return ((loss, aux) if has_aux else loss), grads, error_map

    return wrapped


def _detached(detach: Any, names: list[str], recompute: bool) -> Any:
  """`detach` as a frozenset of names (static) or a `Runtime` (flags)."""
  if detach is None or isinstance(detach, str):
    raise TypeError(
      f"detach must be a collection of component names or a boolean array with "
      f"one entry per component, got {detach!r}; pass () to detach nothing."
    )
  if not hasattr(detach, "dtype"):
    detach = list(detach)
    if not detach or all(isinstance(n, str) for n in detach):
      return frozenset(detach)
    raise TypeError(
      "detach must hold component names, or be a boolean array with one entry "
      f"per component (jnp.array([...], bool)); got {detach!r}."
    )
  if detach.dtype != bool or tuple(detach.shape) != (len(names),):
    raise ValueError(
      f"A runtime detach array must be boolean of shape ({len(names)},), one "
      f"entry per component in the order {names}; got {detach.dtype}"
      f"{list(detach.shape)}."
    )
  return Runtime({n: detach[i] for i, n in enumerate(names)}, bool(recompute))


def _owned_names(
  recorded: list[tuple[Tap, Any]], found: Found, params: Any
) -> list[str]:
  """The names of the `recorded` taps that own some parameter of `params`, in
  call order: `components()`'s names, without its per-head probe.

  Every head of an attention found by dataflow counts: each owns at least
  its rows of the output projection's kernel (the probe finds them whatever
  the inputs, where the projection multiplies its input by a kernel of the
  attention's), and `components()` keeps every head of an attention that owns
  some entry; `plan()` warns about an attention that owns none.
  """
  taps = [tap for tap, _ in recorded]
  if found[1]:
    return ordered_names(taps)
  return list(build_components(params, taps, ordered_names(taps)).names)


def _placed(
  comps: Components, params: Any, structure: Structure, model: str
) -> tuple[Components, list[str]]:
  """`comps` listing the shared parameters, and a warning's text for each
  residual add that discovery could not place (in `model`, named)."""
  unassigned = set(comps.unassigned(params))
  shared = tuple(p for p in structure.shared if p in unassigned)
  notes = []
  if all_shared(structure):
    notes.append(
      f"{model} has no component: each of its residual "
      "branches computes only with parameters several branches share (a "
      f"layer reused across depth), so they are in none and shared: {shared}. "
      "They train at the full rate. Measure other modules with a predicate, "
      "select=lambda path, module: ..., or select='heads'."
    )
  for where, leaves in structure.undecided:
    missed = [p for p in leaves if p in unassigned and p not in shared]
    if not missed:
      continue
    module = where or model
    notes.append(
      f"Discovery could not place a residual add in {module!r}: it adds a "
      f"value computed with the parameters {missed} to what it was computed "
      "from, but no module's output there is added back to what the module "
      "read, so these parameters are in no component. Measure that branch "
      "with a predicate, select=lambda path, module: ..., or give the "
      "parameters to a component with owns=."
    )
  return Components(comps.names, comps.index, shared), notes


def _abstract(params: Any) -> Any:
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
    params,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def _head_entries(taps, owners) -> dict[str, tuple[Tap, np.ndarray]]:
  """`head_owners`' result with each attention's tap in place of its path."""
  by_path = {tap.path: tap for tap in taps if tap.heads is not None}
  return {
    leaf: (by_path[attention], heads)
    for leaf, (attention, heads) in owners.items()
    if attention in by_path
  }


def _check_tappable(tap: Tap, value: Any) -> None:
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


@contextlib.contextmanager
def _rng_hint(model: Any):
  """Flax's missing-PRNG error, with how to pass the keys."""
  try:
    yield
  except flax.errors.InvalidRngError as e:
    raise ValueError(
      f"{type(model).__name__} draws random numbers (dropout, say): "
      f"{str(e).split(' (https')[0]}. Pass them: components(params, *inputs, "
      "rngs={'dropout': jax.random.key(0)}) (any key: discovery does not "
      "depend on the values), and apply the model with its rngs in the loss "
      "function given to value_and_grad, e.g. model.apply({'params': p}, x, "
      "rngs={'dropout': key}) with the key an argument of the loss."
    ) from None


def _batch_of(recorded: list[tuple[Tap, Any]], inputs: Any = ()) -> int:
  """The batch size: the most common leading axis of the `inputs`' arrays
  (the smallest leading axis of the tapped values where they have none).

  A leading axis that is a multiple of it is the batch with other axes
  flattened into it, batch-major (`[B, T, D] -> [B * T, D]`, as OPT does
  before its MLP): measured per example by summing each example's rows. Any
  other leading axis is refused, naming the tap.
  """
  leads = [(tap, jax.tree.leaves(v)[0].shape[0]) for tap, v in recorded]
  given = [
    a.shape[0]
    for a in jax.tree.leaves(inputs)
    if hasattr(a, "shape") and len(a.shape) >= 1
  ]
  if 0 in given or any(b == 0 for _, b in leads):
    raise ValueError(
      "The batch is empty (leading axis 0): per-example attributions need at "
      "least one example. Skip empty batches before calling the tracker."
    )
  if given:
    batch = max(set(given), key=lambda b: (given.count(b), b))
    if any(b % batch for _, b in leads) and all(b % min(given) == 0 for _, b in leads):
      batch = min(given)
  else:
    batch = min(b for _, b in leads)
  for tap, b in leads:
    if b % batch:
      raise ValueError(
        f"Cannot measure {'/'.join(tap.path)!r} (the output of "
        f"{'/'.join(tap.site)!r}) per example: its leading axis has {b} "
        f"entries, neither the batch size {batch} (the inputs' leading axis) "
        "nor the batch with other axes flattened into it "
        "(a multiple). Leave it out of the components with select= (a "
        "predicate on the module path), or measure a module whose output "
        "keeps the batch on its leading axis."
      )
  return batch
