"""Residual branches found from a model's dataflow, not its class names.

The model is traced once to a jaxpr with every module call's inputs and
outputs tagged (`checkpoint_name`, an identity). In that graph a residual
branch is an `add` of two values where one, `h`, is a module's output and the
module read the other, `x` (the stream): `x + h(..x..)`, whatever the classes
are called and wherever the norms sit (pre-norm; post-norm with the add
inside the module, as Hugging Face's BERT and ViT output layers do). Where the
other operand is a module's output (a projection shortcut), the module that
read the same value that one read directly is a branch too (Hugging Face's
ResNet layer and its shortcut both are). A branch is measured at the
module's output and owns the parameters `h` depends on beyond those `x`
depends on: its own weights and its pre-norm, not what lies below.

Sub-jaxprs (jit, remat, custom derivatives, a scan's body) are inlined with
fresh names per call; inside a scan the body's parameter inputs are slices of
the stacked leaves, so the branch owns its slice of each layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name

from rgft_jax._components import _is_variable
from rgft_jax._components import path_str
from rgft_jax._intercept import Call
from rgft_jax._intercept import Path

_TAG = "rgft:"
# Primitives that pass a value through unchanged (for finding what was added).
_IDENTITY = {
  "name",
  "convert_element_type",
  "copy",
  "copy_p",
  "reduce_precision",
  "neg",
}
# Primitives that only reshape or broadcast (a scale parameter on its way to a multiply).
_SHAPING = {
  "broadcast_in_dim",
  "reshape",
  "squeeze",
  "expand_dims",
  "convert_element_type",
  "name",
}
_SUBJAXPRS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@dataclasses.dataclass(frozen=True)
class Branch:
  """A residual branch: measured at `path`'s output, owning `owns` (leaf paths)."""

  path: Path
  owns: tuple[str, ...]


def _tag(kind: str, path: Path, tree: Any) -> Any:
  name = f"{_TAG}{kind}:{'/'.join(path)}"

  def one(x):
    if isinstance(x, jax.Array) and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
      return checkpoint_name(x, name)
    return x

  return jax.tree.map(one, tree)


def tagging_handle(order: list[Path]) -> Callable[..., Any]:
  """A `handle` for the interception backends that tags every module call."""

  def handle(call: Call, next_fun, args, kwargs):
    if call.path not in order:
      order.append(call.path)
    args, kwargs = _tag("in", call.path, (args, kwargs))
    return _tag("out", call.path, next_fun(*args, **kwargs))

  return handle


class _Graph:
  """Nodes with their inputs, the tags on them, and the parameters below."""

  def __init__(self):
    self.deps: list[tuple[int, ...]] = []
    self.prim: list[str] = []
    self.tag: list[str | None] = []
    self.params: list[int] = []  # Bitmask of parameter leaves each node depends on.
    self.adds: list[tuple[int, int]] = []
    # The equation (and output index) of each primitive's node, and its
    # operands in order (None for a literal).
    self.eqn: list[tuple[Any, int] | None] = []
    self.args: list[tuple[int | None, ...]] = []
    self._users: list[list[int]] | None = None

  def node(
    self, prim: str, deps: tuple[int, ...], tag=None, params=0, eqn=None, args=()
  ) -> int:
    for d in deps:
      params |= self.params[d]
    self.deps.append(deps)
    self.prim.append(prim)
    self.tag.append(tag)
    self.params.append(params)
    self.eqn.append(eqn)
    self.args.append(tuple(args))
    return len(self.deps) - 1

  def users(self, n: int) -> list[int]:
    """The nodes that read `n`, in order."""
    if self._users is None:
      self._users = [[] for _ in self.deps]
      for m, deps in enumerate(self.deps):
        for d in dict.fromkeys(deps):
          self._users[d].append(m)
    return self._users[n]

  def walk(self, jaxpr, inputs: list[int | None]) -> list[int | None]:
    """Adds `jaxpr`'s equations, its inputs bound to `inputs`; returns its outputs."""
    env: dict[Any, int] = {}
    for v in jaxpr.constvars:
      env[v] = self.node("const", ())
    for v, n in zip(jaxpr.invars, inputs, strict=True):
      env[v] = self.node("input", ()) if n is None else n

    def read(v):
      return None if hasattr(v, "val") else env.get(v)  # A Literal has .val.

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      sub = next(
        (eqn.params[k] for k in _SUBJAXPRS if k in eqn.params),
        None,
      )
      sub = getattr(sub, "jaxpr", sub)
      if (
        sub is not None
        and len(sub.invars) == len(ins)
        and len(sub.outvars) == len(eqn.outvars)
      ):
        outs = self.walk(sub, ins)
      else:
        deps = tuple(n for n in ins if n is not None)
        name = eqn.primitive.name
        tag = eqn.params.get("name") if name == "name" else None
        outs = [
          self.node(name, deps, tag, eqn=(eqn, i), args=ins)
          for i in range(len(eqn.outvars))
        ]
        if name == "add" and len(deps) == 2:
          self.adds.append((deps[0], deps[1]))
      for v, n in zip(eqn.outvars, outs, strict=True):
        env[v] = self.node("const", ()) if n is None else n
    return [read(v) for v in jaxpr.outvars]

  def _constant(self, n: int) -> bool:
    """Whether `n` is a parameter or constant, reshaped or broadcast."""
    while self.prim[n] in _SHAPING and len(self.deps[n]) == 1:
      n = self.deps[n][0]
    return self.prim[n] in ("param", "const")

  def chain(self, n: int) -> list[int]:
    """`n` and the nodes it passes through from, nearest first: identities and
    scalings by a literal or a parameter (`0.5 * h`, a layer scale `gamma * h`)."""
    out = [n]
    while True:
      prim, deps = self.prim[n], self.deps[n]
      if len(deps) == 1 and (prim in _IDENTITY or prim in ("mul", "div")):
        n = deps[0]
      elif len(deps) == 2 and prim in ("mul", "div") and self._constant(deps[1]):
        n = deps[0]
      elif len(deps) == 2 and prim == "mul" and self._constant(deps[0]):
        n = deps[1]
      else:
        return out
      out.append(n)

  def reads(self, start: list[int], targets: set[int]) -> bool:
    """Whether any of `targets` is among the ancestors of `start` (inclusive)."""
    seen, stack = set(), list(start)
    while stack:
      n = stack.pop()
      if n in targets:
        return True
      if n in seen:
        continue
      seen.add(n)
      stack.extend(self.deps[n])
    return False


def _tags(graph: _Graph, nodes: list[int], kind: str) -> list[Path]:
  prefix = f"{_TAG}{kind}:"
  out = []
  for n in nodes:
    tag = graph.tag[n]
    if tag is not None and tag.startswith(prefix):
      path = tag[len(prefix) :]
      out.append(tuple(path.split("/")) if path else ())
  return out


@dataclasses.dataclass
class Traced:
  """A model's dataflow with every module call's inputs and outputs tagged.

  Attributes:
    graph: the nodes.
    paths: the parameter leaves' paths (bit `i` of a node's `params` is `paths[i]`).
    order: module paths in call order.
    inputs_of: each module path's input nodes (the tagged values it read).
  """

  graph: _Graph
  paths: list[str]
  order: list[Path]
  inputs_of: dict[Path, list[int]]

  def position(self, path: Path) -> int:
    if not hasattr(self, "_rank"):
      self._rank = {p: i for i, p in enumerate(self.order)}
    return self._rank.get(path, 0)

  def producer(self, chain: list[int]) -> Path | None:
    """The outermost (then first-called) module whose output is the value."""
    outs = [p for p in _tags(self.graph, chain, "out") if p]
    if not outs:
      return None
    return min(outs, key=lambda p: (len(p), self.position(p)))


def trace(run: Callable[[Any, Any], Any], params: Any) -> Traced:
  """The dataflow of the model `run(params, handle)` calls (abstractly)."""
  order: list[Path] = []
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
  paths = [path_str(p) for p, _ in leaves]

  def fn(*flat):
    return run(jax.tree_util.tree_unflatten(treedef, flat), tagging_handle(order))

  closed = jax.make_jaxpr(fn)(*[leaf for _, leaf in leaves])
  graph = _Graph()
  inputs = [graph.node("param", (), params=1 << i) for i in range(len(paths))]
  graph.walk(closed.jaxpr, inputs)
  inputs_of: dict[Path, list[int]] = {}
  for n, tag in enumerate(graph.tag):
    if tag is not None and tag.startswith(f"{_TAG}in:"):
      (path,) = _tags(graph, [n], "in")
      inputs_of.setdefault(path, []).append(n)
  return Traced(graph, paths, order, inputs_of)


def residual_branches(traced: Traced) -> list[Branch]:
  """The residual branches of a traced model.

  Branches are in call order; a parameter leaf goes to the first branch that
  owns it. Empty when the model adds no module output back to what it read.
  """
  graph, inputs_of, producer = traced.graph, traced.inputs_of, traced.producer
  found: dict[Path, int] = {}  # Module path -> parameters owned (bitmask).
  for a, b in graph.adds:
    for h, x in ((a, b), (b, a)):
      module = producer(graph.chain(h))
      if module is None or module not in inputs_of:
        continue
      # The stream: the other operand, or what the module producing it read
      # directly (a projection shortcut reading the block's input).
      stream = set(graph.chain(x))
      shortcut = producer(graph.chain(x))
      if shortcut is not None and shortcut != module:
        stream |= {graph.chain(n)[-1] for n in inputs_of.get(shortcut, ())}
      if graph.reads(inputs_of[module], stream):
        owned = graph.params[h] & ~graph.params[x]
        found[module] = found.get(module, 0) | owned

  taken = 0
  branches = []
  for module in sorted(found, key=traced.position):
    mine = found[module] & ~taken
    taken |= mine
    owns = tuple(p for i, p in enumerate(traced.paths) if mine >> i & 1)
    branches.append(Branch(module, owns))
  return branches
