"""Residual branches found from a model's dataflow, not its class names.

The model is traced once to a jaxpr with every module call's inputs and
outputs tagged (`checkpoint_name`, an identity), each call of a module apart
(its path, call number and output leaf), so a parameterless module reused
after several branches (a drop-path, a dropout) is several sites. In that
graph a residual branch is an `add` of two values where one, `h`, is a module
call's output (one leaf of it, where the module returns a tuple) and the
call read the other, `x` (the stream): `x + h(..x..)`, whatever the classes
are called and wherever the norms sit (pre-norm; post-norm with the add
inside the module, as Hugging Face's BERT and ViT output layers do). Where
the other operand is a module's output (a projection shortcut), the module
that read the same value that one read directly is a branch too (Hugging
Face's ResNet layer and its shortcut both are); where it is computed inline
(`x @ w`, a strided slice), the values it was computed from stand for it.

A branch is measured at the call's output (the leaf added) and owns the
parameters whose every path to the model's outputs runs through `h`: its
own weights, its pre-norm, a layer scale, not what lies below, and not a
parameter that reaches the outputs around it (one several branches compute
with: a position bias passed from layer to layer, an encoder's final norm
that every cross-attention reads, a layer reused across depth). It is named
after the module along `h` that holds the most of its parameters, through
parameterless modules: the MLP branch of `x + drop_path(fc2(gelu(fc1(x))))`
is `fc2`, of `x + drop_path(mlp(x))` is `mlp`.

Sub-jaxprs (jit, remat, custom derivatives, a scan's body) are inlined with
fresh names per call; inside a scan the body's parameter inputs are slices of
the stacked leaves, so the branch owns its slice of each layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
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


Site = tuple[Path, int]  # A module call: its path and how many calls of it came before.


@dataclasses.dataclass(frozen=True)
class Branch:
  """A residual branch.

  Attributes:
    site: the module call whose output is added to the stream (where it is
      measured): its path, and how many calls of that path came before.
    leaf: which leaf of the call's flattened output is added, or None when the
      output has one floating leaf (measure it whole).
    name: the component's name (a module path; see `residual_branches`).
    owns: the parameter leaves (paths) only this branch computes with.
  """

  site: Site
  leaf: int | None
  name: Path
  owns: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Structure:
  """What `residual_branches` found.

  Attributes:
    branches: the branches, in call order.
    shared: parameter leaves computed into several branches (beyond their
      streams): in no branch, they train at the full rate.
    undecided: `(where, leaves)` for each residual-looking add that no branch
      explains: `where` the modules holding `leaves`, parameter leaves that
      add brings in and that no branch owns.
    residual: whether some module output is added back to what the module
      read, even where no such branch owns a parameter (every one of them
      computes only with shared parameters: a layer reused across depth).
  """

  branches: tuple[Branch, ...]
  shared: tuple[str, ...] = ()
  undecided: tuple[tuple[str, tuple[str, ...]], ...] = ()
  residual: bool = False


def _tag(kind: str, path: Path, call: int, tree: Any) -> Any:
  leaves, treedef = jax.tree.flatten(tree)

  def one(i, x):
    if isinstance(x, jax.Array) and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
      return checkpoint_name(x, f"{_TAG}{kind}:{call}:{i}:{'/'.join(path)}")
    return x

  return jax.tree.unflatten(treedef, [one(i, x) for i, x in enumerate(leaves)])


def tagging_handle(order: list[Site]) -> Callable[..., Any]:
  """A `handle` for the interception backends that tags every module call
  (each call of a module apart: its path and call number)."""
  calls: dict[Path, int] = {}

  def handle(call: Call, next_fun, args, kwargs):
    k = calls.get(call.path, 0)
    calls[call.path] = k + 1
    order.append((call.path, k))
    args, kwargs = _tag("in", call.path, k, (args, kwargs))
    return _tag("out", call.path, k, next_fun(*args, **kwargs))

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

  def walk(self, jaxpr, inputs: Sequence[int | None]) -> list[int | None]:
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


Tagged = tuple[Path, int, int]  # (module path, call number, leaf number).


def _tags(graph: _Graph, nodes: list[int], kind: str) -> list[Tagged]:
  """The `(path, call, leaf)` of the `kind` ('in', 'out') tags on `nodes`."""
  prefix = f"{_TAG}{kind}:"
  out = []
  for n in nodes:
    tag = graph.tag[n]
    if tag is not None and tag.startswith(prefix):
      call, leaf, path = tag[len(prefix) :].split(":", 2)
      out.append((tuple(path.split("/")) if path else (), int(call), int(leaf)))
  return out


@dataclasses.dataclass
class Traced:
  """A model's dataflow with every module call's inputs and outputs tagged.

  Attributes:
    graph: the nodes.
    paths: the parameter leaves' paths (bit `i` of a node's `params` is `paths[i]`).
    order: module paths in call order (first calls).
    inputs_of: each module path's input nodes (the tagged values its calls read).
    sites: module calls in call order.
    site_inputs: each call's input nodes.
    outputs: the traced function's output nodes.
    leaves_out: each call's number of output leaves that are tagged.
  """

  graph: _Graph
  paths: list[str]
  order: list[Path]
  inputs_of: dict[Path, list[int]]
  sites: list[Site] = dataclasses.field(default_factory=list)
  site_inputs: dict[Site, list[int]] = dataclasses.field(default_factory=dict)
  outputs: list[int] = dataclasses.field(default_factory=list)
  leaves_out: dict[Site, set[int]] = dataclasses.field(default_factory=dict)

  def position(self, path: Path) -> int:
    if not hasattr(self, "_rank"):
      self._rank = {p: i for i, p in enumerate(self.order)}
    return self._rank.get(path, 0)

  def producer(self, chain: list[int]) -> Path | None:
    """The outermost (then first-called) module whose output is the value."""
    outs = [p for p, _, _ in _tags(self.graph, chain, "out") if p]
    if not outs:
      return None
    return min(outs, key=lambda p: (len(p), self.position(p)))


def trace(run: Callable[[Any, Any], Any], params: Any) -> Traced:
  """The dataflow of the model `run(params, handle)` calls (abstractly)."""
  sites: list[Site] = []
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
  paths = [path_str(p) for p, _ in leaves]

  def fn(*flat):
    return run(jax.tree_util.tree_unflatten(treedef, flat), tagging_handle(sites))

  closed = jax.make_jaxpr(fn)(*[leaf for _, leaf in leaves])
  graph = _Graph()
  inputs = [graph.node("param", (), params=1 << i) for i in range(len(paths))]
  outputs = [n for n in graph.walk(closed.jaxpr, inputs) if n is not None]
  inputs_of: dict[Path, list[int]] = {}
  site_inputs: dict[Site, list[int]] = {}
  leaves_out: dict[Site, set[int]] = {}
  for n, tag in enumerate(graph.tag):
    if tag is None or not tag.startswith(_TAG):
      continue
    for kind in ("in", "out"):
      for path, call, leaf in _tags(graph, [n], kind):
        if kind == "in":
          inputs_of.setdefault(path, []).append(n)
          site_inputs.setdefault((path, call), []).append(n)
        else:
          leaves_out.setdefault((path, call), set()).add(leaf)
  order = list(dict.fromkeys(path for path, _ in sites))
  return Traced(graph, paths, order, inputs_of, sites, site_inputs, outputs, leaves_out)


def _first_out(graph: _Graph, chain: list[int]) -> Tagged | None:
  """The module call output nearest the end of `chain` (the value itself)."""
  outs = [t for t in _tags(graph, chain, "out") if t[0]]
  return outs[0] if outs else None


def _frontier(graph: _Graph, n: int, limit: int = 4096) -> set[int]:
  """The tagged values (module inputs, outputs) an inline computation of `n`
  read, and the nodes on the way: what an inline shortcut was computed from."""
  seen: set[int] = set()
  stack, out = [n], set()
  while stack and len(seen) < limit:
    m = stack.pop()
    if m in seen:
      continue
    seen.add(m)
    out.add(m)
    tag = graph.tag[m]
    if tag is not None and tag.startswith(_TAG) and m != n:
      continue
    if graph.prim[m] in ("param", "const"):
      continue
    stack.extend(graph.deps[m])
  return out


def _escaping(graph: _Graph, cut: set[int], outputs: list[int]) -> int:
  """The parameters (bitmask) that reach `outputs` by a path avoiding `cut`."""
  first = min(cut)
  reach: dict[int, int] = {}
  params, deps = graph.params, graph.deps
  for n in range(first, len(deps)):
    if n in cut:
      reach[n] = 0
      continue
    r = 0
    for d in deps[n]:
      r |= reach.get(d, params[d]) if d >= first else params[d]
    reach[n] = r
  out = 0
  for n in outputs:
    out |= reach.get(n, params[n]) if n >= first else params[n]
  return out


def _name(traced: Traced, h: int, owned: int) -> Path:
  """The module along the added value that holds the most parameters the
  branch owns (the outermost of equals), through parameterless modules
  (dropout, drop-path) to the module whose output they carry."""
  graph = traced.graph
  mine = [traced.paths[i] for i in range(len(traced.paths)) if owned >> i & 1]
  candidates: list[Path] = []
  nodes, seen = graph.chain(h), set()
  while True:
    outs = [t for t in _tags(graph, nodes, "out") if t[0]]
    candidates += [p for p, _, _ in outs]
    if not outs or outs[-1][:2] in seen:
      break
    path, call, _ = outs[-1]
    seen.add((path, call))
    prefix = "/".join(path) + "/"
    if any(p.startswith(prefix) for p in traced.paths):
      break  # A module with parameters: what it computes from is its own.
    inputs = traced.site_inputs.get((path, call), [])
    if not inputs:
      break
    nodes = graph.chain(inputs[0])

  def held(path: Path) -> int:
    prefix = "/".join(path) + "/"
    return sum(p.startswith(prefix) for p in mine)

  best = max(candidates, key=held)  # The first (outermost) of equals.
  return best


def residual_branches(traced: Traced) -> Structure:
  """The residual branches of a traced model, and what no branch explains.

  Each module call is a site of its own (a dropout or drop-path module
  reused after several branches is several sites). A site is a branch where
  its output (one leaf of it) is added to a value the call read: the other
  operand, or what was computed into the other operand (a projection
  shortcut, a module or inline, that read the block's input).

  A branch owns the parameters whose every path to the model's outputs runs
  through the value it adds (its weights, its pre-norm, a layer scale): a
  parameter computed into several branches (a shared position bias, an
  encoder's final norm read by every cross-attention, a layer reused across
  depth, a norm read by parallel branches summed before their add) reaches
  the outputs around each of them and belongs to none. Where branches nest,
  a parameter goes to the innermost. A branch is named after
  the module along the added value that holds the most of its parameters
  (through parameterless modules such as a reused drop-path): `block0/mlp`,
  or `block0/fc2` where the MLP's layers are the block's own.
  """
  graph = traced.graph
  found: dict[tuple[Site, int], list[int]] = {}  # (site, leaf) -> added nodes.
  decided: set[int] = set()  # Adds explained by a branch.
  beyond = 0  # Parameters computed into a branch beyond its stream.
  for i, (a, b) in enumerate(graph.adds):
    for h, x in ((a, b), (b, a)):
      tagged = _first_out(graph, graph.chain(h))
      if tagged is None:
        continue
      site = tagged[:2]
      if site not in traced.site_inputs:
        continue
      # The stream: the other operand, or what the shortcut computing it read
      # (a module's inputs, or the tagged values of an inline computation).
      stream = set(graph.chain(x))
      shortcut = _first_out(graph, graph.chain(x))
      if shortcut is not None and shortcut[:2] != site:
        stream |= {graph.chain(n)[-1] for n in traced.site_inputs.get(shortcut[:2], ())}
      elif shortcut is None and not graph._constant(x):
        stream |= _frontier(graph, graph.chain(x)[-1])
      if graph.reads(traced.site_inputs[site], stream):
        found.setdefault((site, tagged[2]), []).append(h)
        beyond |= graph.params[h] & ~graph.params[x]
        decided.add(i)

  rank = {s: i for i, s in enumerate(traced.sites)}
  keys = sorted(found, key=lambda k: (rank.get(k[0], 0), k[1]))
  owned: dict[tuple[Site, int], int] = {}
  once = several = 0  # Parameters computed into one branch, into several.
  for key in keys:
    cut = set(found[key])
    reached = 0
    for h in cut:
      reached |= graph.params[h]
    several |= once & reached
    once |= reached
    owned[key] = reached & ~_escaping(graph, cut, traced.outputs)
  # Nested branches: a parameter goes to the innermost (its added value first).
  taken = 0
  for key in sorted(keys, key=lambda k: min(found[k])):
    owned[key] &= ~taken
    taken |= owned[key]

  branches, names = [], set()
  for key in keys:
    if not owned[key]:
      continue
    (path, call), leaf = key
    name = _name(traced, min(found[key]), owned[key])
    if name in names:  # The same module carrying two branches.
      name = (*name[:-1], f"{name[-1]}@{call}")
    names.add(name)
    whole = traced.leaves_out.get((path, call), {leaf}) == {leaf}
    owns = tuple(p for i, p in enumerate(traced.paths) if owned[key] >> i & 1)
    branches.append(Branch((path, call), None if whole else leaf, name, owns))

  # Parameters computed into a branch beyond its stream that none owns are
  # read by several branches (or by a branch and the outputs): shared.
  shared_mask = beyond & ~taken

  # Residual adds no branch explains (`x + f(x)` with `f` written inline)
  # and the parameters only `f` computes with, where no branch owns them.
  undecided: dict[str, list[str]] = {}
  for i, (a, b) in enumerate(graph.adds):
    if i in decided:
      continue
    for h, x in ((a, b), (b, a)):
      if graph._constant(h) or graph._constant(x):
        continue
      new = graph.params[h] & ~graph.params[x] & ~taken & ~shared_mask
      if not new or not graph.reads([h], set(graph.chain(x))):
        continue
      new &= ~_escaping(graph, {h}, traced.outputs)  # What only `h` computes with.
      # Branches summed before the add (GPT-J's `attn(ln(x)) + mlp(ln(x)) +
      # x`): what several of them compute with (`ln`) is shared.
      shared_mask |= new & several
      new &= ~several
      if not new:
        continue
      leaves = [p for i, p in enumerate(traced.paths) if new >> i & 1]
      where = _common_module(leaves)
      undecided.setdefault(where, [])
      undecided[where] += [p for p in leaves if p not in undecided[where]]
  shared = tuple(p for i, p in enumerate(traced.paths) if shared_mask >> i & 1)
  return Structure(
    tuple(branches),
    shared,
    tuple((w, tuple(ls)) for w, ls in undecided.items()),
    residual=bool(found),
  )


def _common_module(leaves: list[str]) -> str:
  """The innermost module path holding all of `leaves`."""
  parts = [p.split("/")[:-1] for p in leaves]
  common = []
  for names in zip(*parts, strict=False):
    if len(set(names)) > 1:
      break
    common.append(names[0])
  return "/".join(common)
