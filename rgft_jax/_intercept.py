"""Method interception: where the taps sit in a Flax model's call.

Linen has an interceptor API (`flax.linen.intercept_methods`); NNX does not,
so each class defining `__call__` among the model's modules gets a scoped
wrapper. Both backends hand every module call to one `handle(call, next_fun,
args, kwargs)`, with a `Call` that says where the call runs: its path, the
lifted transforms around it, and, for a module inside a scan over layers,
the stacked layer axis its parameters are a slice of.

Values a tap needs per layer (the probe that collects its statistics, its
detach mask) cannot be closed over inside a scan: they ride along as extra
parameter leaves at the call's module (`embed`), which the scan slices like
the module's own parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from rgft_jax._components import leaves_by_path

Path = tuple[str, ...]
Module = nn.Module | nnx.Module
Handle = Callable[..., Any]  # handle(call, next_fun, args, kwargs) -> output.
Embed = dict[Path, dict[str, Any]]  # Call path -> {key: stacked leaf}.

# Lifted transforms a tap may sit in. Their Linen classes are named after the
# transforms they stack, e.g. `ScanCheckpointBlock` for nn.scan(nn.remat(Block)).
_SUPPORTED_LIFTS = {"Scan", "Checkpoint"}
_LIFT_KINDS = r"scan|checkpoint|remat|vmap|jit|map|vjp|jvp|while|cond|switch"
_LIFTED_MODULES = ("flax.linen.transforms", "flax.linen.partitioning")


def per_head_view(x: Any, heads: int, features: int) -> Any:
  """`x` with its `features` trailing axes as `(heads, head_dim)`."""
  return x.reshape((*x.shape[: x.ndim - features], heads, -1))


@dataclasses.dataclass(frozen=True)
class Tap:
  """One tapped value: a module's output, or the per-head input of a projection.

  Attributes:
    path: the component's module path (the attention module, for heads).
    heads: the number of heads of a per-head tap, None for a whole output.
    feeder: a norm layer called just before, owned with the tap.
    site: the path of the module whose call is intercepted.
    layers: the length of the stacked layer axis the module's parameters are
      a slice of (inside a scan over layers), None outside a scan.
    root: the path of the scanned module (with `layers`).
    owns: the module paths whose parameters the component owns, when given
      apart from where it is measured (None: `path` and `feeder`).
    features: for a per-head tap, how many trailing axes of the value hold
      the heads and the head dimension (heads major).
    call: which call of the module at `site` (0 for the first): each call is
      a site of its own (a reused dropout carries several branches).
    leaf: which leaf of the call's flattened output is measured (the one
      added to the residual stream), None for the whole output.
  """

  path: Path
  heads: int | None
  feeder: Path | None = None
  site: Path = ()
  layers: int | None = None
  root: Path = ()
  owns: tuple[Path, ...] | None = None
  features: int = 2
  call: int = 0
  leaf: int | None = None

  def key(self, name: str) -> str:
    """The key of this tap's `name` leaf embedded at its site (`probe`, say);
    several calls of one module each have their own."""
    if self.call == 0 and self.leaf is None:
      return name
    return f"{name}_{self.call}_{self.leaf}"

  def per_head(self, fn: Callable[[Any], Any], value: Any) -> Any:
    """`fn(value)` with the heads on axis -2 of each leaf (as `(heads, dim)`)."""
    heads = self.heads
    if heads is None:
      return fn(value)
    shapes = [v.shape for v in jax.tree.leaves(value)]
    out = fn(jax.tree.map(lambda v: per_head_view(v, heads, self.features), value))
    leaves, treedef = jax.tree.flatten(out)
    return jax.tree.unflatten(
      treedef, [v.reshape(s) for v, s in zip(leaves, shapes, strict=True)]
    )


@dataclasses.dataclass(frozen=True)
class Call:
  """Where a module call runs.

  Attributes:
    path: the module's path in the model.
    module: the bound module (Linen) or the module object (NNX).
    lifted: names of the lifted transforms around the call, outermost first.
    stacked: `() -> (layers, root) | None`, the stacked layer axis the
      module's parameters are a slice of, from comparing their shapes with the
      model's parameters.
    read: `read(key)` is this call's slice of the leaf embedded under `key`.
  """

  path: Path
  module: Any
  lifted: tuple[str, ...]
  stacked: Callable[[], tuple[int, Path] | None]
  read: Callable[[str], Any]


def lift_kinds(lifted: tuple[str, ...]) -> list[str]:
  """`['Scan', 'Checkpoint']` for `('ScanCheckpoint(Block)',)`.

  Hugging Face's gradient checkpointing (`flax.linen.partitioning.remat`)
  names its class `Core_remat_static...`: that is a remat too.
  """
  kinds = []
  for name in lifted:
    for kind in re.findall(_LIFT_KINDS, name.split("(")[0], flags=re.IGNORECASE):
      kind = kind.capitalize()
      kinds.append("Checkpoint" if kind == "Remat" else kind)
  return kinds


def check_lifted(path: Path, lifted: tuple[str, ...]) -> None:
  """A clear error for a tap inside a lifted transform that is not supported."""
  kinds = lift_kinds(lifted)
  bad = [k for k in kinds if k not in _SUPPORTED_LIFTS]
  if not bad and kinds.count("Scan") <= 1:
    return
  why = f"the lifted transform(s) {bad}" if bad else "nested scans over layers"
  raise ValueError(
    f"Cannot tap {'/'.join(path)!r}: it runs inside {list(lifted)}, and taps "
    f"inside {why} are not supported (only one scan over layers, with or "
    "without remat/checkpoint). Select modules outside it, or unroll it."
  )


def compare_stacked(path: Path, inner: dict[str, Any], outer: dict[str, Any]):
  """Layer count of `outer` leaves over `inner` ones (same relative paths).

  None when the shapes agree (no layer axis); an error when they relate in
  any other way than one leading axis.
  """
  common = [k for k in inner if k in outer]
  if not common:
    return None
  layers: set[int | str | None] = set()  # "?": shapes that do not relate.
  for k in common:
    s_in, s_out = tuple(np.shape(inner[k])), tuple(np.shape(outer[k]))
    if s_in == s_out:
      layers.add(None)
    elif s_out[1:] == s_in:
      layers.add(s_out[0])
    else:
      layers.add("?")
  if len(layers) != 1 or "?" in layers:
    raise ValueError(
      f"Cannot map the parameters of {'/'.join(path)!r} inside a lifted "
      "transform onto the model's: their shapes are not the model's with one "
      "leading (layer) axis removed. Only scans over layers whose parameters "
      "are stacked on axis 0 are supported."
    )
  return layers.pop()


def _lift_name(cls: type) -> str:
  """`'Scan(Block)'` for the class of nn.scan(Block): the transforms, then the
  user's class, so that a class named `ConditionalMap` reads as no transform."""
  base = next(c for c in cls.__mro__ if c.__module__ not in _LIFTED_MODULES)
  prefix = cls.__name__.removesuffix(base.__name__)
  return f"{prefix}({base.__name__})"


def _embed_key(key: str) -> str:
  return f"__rgft_{key}__"


# Linen.


def _with_leaves(tree: Any, leaves: dict[Path, Any]) -> Any:
  """`tree` (nested mappings) with extra leaves at the given paths."""
  if not leaves:
    return tree
  out = dict(tree)
  children: dict[str, dict[Path, Any]] = {}
  for path, leaf in leaves.items():
    if len(path) == 1:
      out[path[0]] = leaf
    else:
      children.setdefault(path[0], {})[path[1:]] = leaf
  for key, sub in children.items():
    out[key] = _with_leaves(out.get(key, {}), sub)
  return out


def linen_run(loss_fn, params, handle: Handle, embed: Embed | None, args, kwargs):
  """Runs `loss_fn(params, *args, **kwargs)` with every module call handled."""
  outer = {tuple(p.split("/")): v for p, v in leaves_by_path(params).items()}
  if embed:
    params = _with_leaves(
      params,
      {(*site, _embed_key(k)): v for site, kv in embed.items() for k, v in kv.items()},
    )
  # Flax calls a lifted transform's class (`ScanCheckpointBlock` for
  # nn.scan(nn.remat(Block)), say) on a test scope just before running its
  # body in a scope of its own, rooted at the transformed module's path.
  pending: list[str] = []
  lifted: dict[Path, tuple[str, ...]] = {}  # Lifted root path -> class names.

  def lifts_of(path: Path) -> list[tuple[Path, tuple[str, ...]]]:
    return [(p, names) for p, names in lifted.items() if path[: len(p)] == p]

  def own_params(scope):
    return {
      tuple(p.split("/")): v
      for p, v in leaves_by_path(scope.variables().get("params", {})).items()
      if not p.split("/")[-1].startswith("__rgft_")
    }

  def stacked(module, path):
    # A module without parameters (a dropout carrying a branch's output, say)
    # is on the layer axis of the nearest enclosing scope that has some.
    scope, at = module.scope, path
    inner = own_params(scope)
    while not inner and scope.parent is not None and at:
      scope, at = scope.parent, at[:-1]
      inner = own_params(scope)
    mine = {k[len(at) :]: v for k, v in outer.items() if k[: len(at)] == at}
    layers = compare_stacked(path, inner, mine)
    if layers is None:
      return None
    scans = [p for p, names in lifts_of(path) if "Scan" in lift_kinds(names)]
    if not scans:
      raise ValueError(
        f"The parameters of {'/'.join(path)!r} are stacked along a layer axis "
        f"inside {[n for _, ns in lifts_of(path) for n in ns]}, which is not a scan."
      )
    return layers, scans[0]

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if type(module).__module__ in _LIFTED_MODULES:  # nn.scan(Block), say.
      pending.append(_lift_name(type(module)))
      return next_fun(*call_args, **call_kwargs)
    root = module.scope
    while root.parent is not None:
      root = root.parent
    if root.path and tuple(root.path) not in lifted:
      lifted[tuple(root.path)] = tuple(pending) or ("a lifted transform",)
    pending.clear()
    if context.method_name != "__call__":
      return next_fun(*call_args, **call_kwargs)
    path = tuple(module.scope.path)
    call = Call(
      path=path,
      module=module,
      lifted=tuple(n for _, names in lifts_of(path) for n in names),
      stacked=functools.partial(stacked, module, path),
      read=lambda key: module.scope.get_variable("params", _embed_key(key)),
    )
    return handle(call, next_fun, call_args, call_kwargs)

  with nn.intercept_methods(interceptor):
    return loss_fn(params, *args, **kwargs)


# NNX.

_SITE = "_rgft_site"


class Embedded(nnx.Param):
  """A leaf the tracker attaches to a module for one call (a `Param`, so that
  scans over a model's parameters slice it like them)."""


def _module_params(module: nnx.Module) -> dict[Path, Any]:
  state = nnx.state(module, nnx.Param)
  return {
    tuple(p.split("/")): v
    for p, v in leaves_by_path(state).items()
    if not isinstance(v, Embedded)
  }


def nnx_run(
  loss_fn, live: nnx.Module, handle: Handle, embed: Embed | None, args, kwargs
):
  """Runs `loss_fn(live, *args, **kwargs)` with every module call handled.

  `live` is the tracker's own copy of the model: its modules are tagged with
  their paths (a static attribute, so the tag survives `nnx.scan` and
  `nnx.remat`, which call fresh module objects) and carry the embedded leaves.
  """
  modules = {tuple(str(k) for k in path): m for path, m in nnx.iter_modules(live)}
  for path, m in modules.items():
    setattr(m, _SITE, path)
  for site, kv in (embed or {}).items():
    for key, value in kv.items():
      setattr(modules[site], _embed_key(key), Embedded(value))
  outer = {path: _module_params(m) for path, m in modules.items()}

  calling: list[tuple[Path, nnx.Module]] = []  # The calls under way, outermost first.

  def stacked(module, path):
    at, inner = path, _module_params(module)
    # A module without parameters is on the layer axis of the innermost call
    # under way that has some (the block around a dropout, say).
    for p, m in reversed(calling):
      if inner:
        break
      at, inner = p, _module_params(m)
    layers = compare_stacked(path, inner, outer[at])
    if layers is None:
      return None
    # The scanned module: the outermost call under way on a layer's slice.
    for p, m in calling:
      if compare_stacked(p, _module_params(m), outer[p]) == layers:
        return layers, p
    return layers, path

  def read(module, key):
    return getattr(module, _embed_key(key))[...]

  classes = {
    cls
    for m in modules.values()
    for cls in type(m).__mro__
    if "__call__" in vars(cls) and cls not in (object, nnx.Module)
  }
  active: set[int] = set()

  def wrap(original):
    @functools.wraps(original)
    def call(self, *args, **kwargs):
      path = getattr(self, _SITE, None) if isinstance(self, nnx.Module) else None
      if path is None or id(self) in active:
        return original(self, *args, **kwargs)
      active.add(id(self))
      calling.append((path, self))
      try:
        where = Call(
          path=path,
          module=self,
          lifted=(),
          stacked=functools.partial(stacked, self, path),
          read=functools.partial(read, self),
        )
        return handle(where, functools.partial(original, self), args, kwargs)
      finally:
        calling.pop()
        active.discard(id(self))

    return call

  originals = {cls: vars(cls)["__call__"] for cls in classes}
  with contextlib.ExitStack() as stack:
    for cls, original in originals.items():
      # Patched on the (user's) class for this call only; restored below.
      cls.__call__ = wrap(original)  # type: ignore[method-assign]
      stack.callback(setattr, cls, "__call__", original)
    return loss_fn(live, *args, **kwargs)


def nnx_head_projections(model: nnx.Module) -> Callable[[Path, Any], bool]:
  """Whether `(path, module)` is the output projection of an `nnx.MultiHeadAttention`."""
  attention = {
    tuple(str(k) for k in path)
    for path, m in nnx.iter_modules(model)
    if isinstance(m, nnx.MultiHeadAttention)
  }
  return lambda path, module: (
    bool(path) and path[-1] == "out" and path[:-1] in attention
  )


def linen_head_projection(path: Path, module: nn.Module) -> bool:
  """The output projection of `nn.MultiHeadDotProductAttention` (its input is per head)."""
  del path
  return (
    isinstance(module, nn.DenseGeneral)
    and module.name == "out"
    and isinstance(module.parent, nn.MultiHeadDotProductAttention)
  )
