"""Attention heads found from a model's dataflow, and the parameters each owns.

An attention's output projection is a module whose input, through reshapes
and transposes only, is a `dot_general` with batch dimensions (the
`weights @ values` product), and whose own first matmul contracts the
trailing axes of that input that hold the heads and the head dimension. The
axes are followed through the reshapes: the innermost contracted dimension
must be the head dimension (a free dimension of the values), the others
heads: batch dimensions of the product, or free dimensions of the weights
(the query group of grouped-query attention). So separate or fused q/k/v,
heads kept on their own axis or merged into one, pre-norm or post-norm all
look alike. The attention module is the innermost module above the
projection that read what the product was computed from.

Which parameter entries a head owns is found by running the model: with the
attention's inputs cut from the gradient, a fixed cotangent injected at
head `h`'s slice of the projection's input (the other heads' slices zeroed
in the forward pass) and at its output, the entries with a nonzero gradient are the
ones head `h` computes with: its slices of the query, key and value
kernels, however they are fused, and its rows of the output kernel. An
entry that several heads use (a grouped-query key/value head, an output
bias, a post-norm's scale) belongs to no head and takes the full update.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rgft_jax._components import _is_variable
from rgft_jax._components import path_str
from rgft_jax._intercept import Call
from rgft_jax._intercept import Path
from rgft_jax._intercept import per_head_view
from rgft_jax._structure import Traced

# Primitives that only move a value's entries around or retag them.
_MOVES = {
  "reshape",
  "transpose",
  "squeeze",
  "expand_dims",
  "convert_element_type",
  "copy",
  "copy_p",
  "name",
  "reduce_precision",
}

Atom = tuple[str, int, int]  # (kind, index, size): what one factor of an axis is.
Labels = list[tuple[Atom, ...]]  # Per axis, its factors, major first.


@dataclasses.dataclass(frozen=True)
class Heads:
  """An attention: measured per head at the input of `projection`.

  Attributes:
    attention: the attention module's path (its components are
      `attention/head{h}`).
    projection: the output projection's path.
    heads: the number of heads.
    features: how many trailing axes of the projection's input hold the
      heads and the head dimension, heads major.
  """

  attention: Path
  projection: Path
  heads: int
  features: int


def _shape(var) -> tuple[int, ...]:
  return tuple(getattr(var.aval, "shape", ()))


def _reshape(labels: Labels, old: tuple[int, ...], new: tuple[int, ...]) -> Labels:
  """`labels` of a value of shape `old` carried to its reshape `new`."""
  out: Labels = []
  i = j = 0
  while i < len(old) or j < len(new):
    if i < len(old) and old[i] == 1:
      i += 1
      continue
    if j < len(new) and new[j] == 1:
      out.append(())
      j += 1
      continue
    if i >= len(old) or j >= len(new):
      return [(("?", k, n),) for k, n in enumerate(new)]
    i0, j0, a, b = i, j, old[i], new[j]
    i, j = i + 1, j + 1
    while a != b:
      if a < b and i < len(old):
        a, i = a * old[i], i + 1
      elif b < a and j < len(new):
        b, j = b * new[j], j + 1
      else:
        return [(("?", k, n),) for k, n in enumerate(new)]
    atoms = [t for k in range(i0, i) for t in labels[k]]
    for size in new[j0:j]:  # Split the atoms over the new axes, major first.
      take, prod = [], 1
      while atoms and prod < size and size % (prod * atoms[0][2]) == 0:
        prod *= atoms[0][2]
        take.append(atoms.pop(0))
      out.append(tuple(take) if prod == size else (("?", len(out), size),))
  return out


def _carry(labels: Labels, eqn) -> Labels:
  """`labels` of `eqn`'s first operand carried to its output."""
  name = eqn.primitive.name
  if name == "transpose":
    return [labels[k] for k in eqn.params["permutation"]]
  if name in ("reshape", "squeeze", "expand_dims"):
    return _reshape(labels, _shape(eqn.invars[0]), _shape(eqn.outvars[0]))
  return labels


def _product_labels(eqn) -> tuple[Labels, int, int]:
  """Labels of a `dot_general`'s output: batch `b`, free `l` (lhs) and `r` (rhs)."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = _shape(eqn.invars[0]), _shape(eqn.invars[1])
  out: Labels = [(("b", k, lhs[a]),) for k, a in enumerate(lb)]
  out += [(("l", a, lhs[a]),) for a in range(len(lhs)) if a not in (*lc, *lb)]
  out += [(("r", a, rhs[a]),) for a in range(len(rhs)) if a not in (*rc, *rb)]
  return out, len(lb), len(out)


def _back_to_product(traced: Traced, n: int) -> tuple[int, list[int]] | None:
  """The `dot_general` node `n` is a reshaping of, and the nodes between."""
  g = traced.graph
  chain = []
  while g.prim[n] in _MOVES and len(g.deps[n]) == 1:
    chain.append(n)
    n = g.deps[n][0]
  if g.prim[n] != "dot_general" or g.eqn[n] is None:
    return None
  return n, chain[::-1]


def _contracted_axes(traced: Traced, n: int, shape: tuple[int, ...]) -> set[int] | None:
  """Axes of value `n` that the first matmul reading it (through moves) contracts."""
  g = traced.graph
  frontier: list[tuple[int, Labels]] = [
    (n, [(("p", a, size),) for a, size in enumerate(shape)])
  ]
  while frontier:
    node, labels = frontier.pop(0)
    for user in g.users(node):
      eqn = g.eqn[user]
      if eqn is None:
        continue
      if g.prim[user] == "dot_general":
        (lc, rc), _ = eqn[0].params["dimension_numbers"]
        side = lc if g.args[user][0] == node else rc
        return {atom[1] for k in side for atom in labels[k] if atom[0] == "p"}
      if g.prim[user] in _MOVES and len(g.deps[user]) == 1:
        frontier.append((user, _carry(labels, eqn[0])))
  return None


def _analyse(traced: Traced, n: int, shape: tuple[int, ...]) -> tuple[int, int] | None:
  """`(heads, features)` when input node `n` (of `shape`) is per head."""
  g, rank = traced.graph, len(shape)
  found = _back_to_product(traced, n)
  if found is None:
    return None
  product, moves = found
  # A product and the moves after it are equations: their g.eqn is set.
  labels, batch, _ = _product_labels(g.eqn[product][0])  # type: ignore[index]
  if batch == 0:
    return None
  for m in moves:
    labels = _carry(labels, g.eqn[m][0])  # type: ignore[index]
  contracted = _contracted_axes(traced, n, shape)
  if not contracted:
    return None
  features = len(contracted)
  if contracted != set(range(rank - features, rank)) or features >= rank:
    return None
  atoms = [a for axis in labels[rank - features :] for a in axis]
  if not atoms or any(a[0] == "?" for a in atoms):
    return None
  head_dim, *head_atoms = atoms[::-1]
  if head_dim[0] not in ("l", "r") or not head_atoms:
    return None
  other = "r" if head_dim[0] == "l" else "l"
  if any(a[0] not in ("b", other) for a in head_atoms):
    return None
  if any(a in labels[0] for a in head_atoms):  # The example batch is not a head.
    return None
  heads = math.prod(a[2] for a in head_atoms)
  return (heads, features) if heads > 1 else None


def find_heads(traced: Traced) -> dict[Path, Heads]:
  """The attentions of a traced model, by their output projection's path."""
  g = traced.graph
  out: dict[Path, Heads] = {}
  for path in traced.order:
    for n in traced.inputs_of.get(path, [])[:1]:  # The first input: args[0].
      eqn = g.eqn[n]
      if eqn is None:
        continue
      shape = _shape(eqn[0].outvars[eqn[1]])
      found = _analyse(traced, n, shape)
      if found is None:
        continue
      product = _back_to_product(traced, n)[0]  # type: ignore[index]  # Found above.
      above = [path[:k] for k in range(len(path) - 1, 0, -1)]
      attention = next(
        (p for p in above if g.reads([product], set(traced.inputs_of.get(p, ())))),
        None,
      )
      if attention is not None:
        out[path] = Heads(attention, path, *found)
  # A wrapper module and the projection inside it read the same input: keep
  # the innermost, so each attention is measured once.
  return {
    p: h for p, h in out.items() if not any(q[: len(p)] == p and q != p for q in out)
  }


@jax.custom_vjp
def _inject(x, c):
  del c
  return x


def _inject_fwd(x, c):
  return x, c


def _inject_bwd(c, g):
  del g
  return c, jnp.zeros_like(c)


_inject.defvjp(_inject_fwd, _inject_bwd)


@jax.custom_vjp
def _block(x):
  return x


def _block_fwd(x):
  return x, None


def _block_bwd(_, g):
  # Zeros, not `stop_gradient`'s symbolic zero: what feeds this value still
  # runs its backward pass, so an injection below is never skipped.
  return (jnp.zeros_like(g),)


_block.defvjp(_block_fwd, _block_bwd)


def _stop(x: Any) -> Any:
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact):
    return _block(x)
  return x


def _pattern(shape: tuple[int, ...], dtype) -> jax.Array:
  """A fixed array of nonzero values (no random state needed inside a trace)."""
  n = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape)
  return (jnp.cos(n * 1.618034 + 0.5) + 2.0).astype(dtype)


def head_owners(
  run: Callable[..., Any], params: Any, heads: dict[Path, Heads]
) -> dict[str, tuple[Path, np.ndarray]]:
  """For each parameter leaf under an attention: `(attention, head of each entry)`.

  The head array has the leaf's shape; -1 marks an entry that no head or
  more than one uses. `run(params, handle)` calls the model with every
  module call given to `handle`. Runs one backward pass per head index (one
  compiled function, the index traced) on random parameters of `params`' shapes.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
  paths = [path_str(p) for p, _ in leaves]
  key = jax.random.key(0)
  values = [
    jax.random.normal(jax.random.fold_in(key, i), np.shape(leaf), leaf.dtype)
    if jnp.issubdtype(leaf.dtype, jnp.inexact)
    else jnp.zeros(np.shape(leaf), leaf.dtype)
    for i, (_, leaf) in enumerate(leaves)
  ]
  attentions = {h.attention for h in heads.values()}

  def grads(flat, h):
    """Gradients with head `h` (a traced index, one compile for all) injected."""

    def handle(call: Call, next_fun, args, kwargs):
      if call.path in attentions:
        args, kwargs = jax.tree.map(_stop, (args, kwargs))
      found = heads.get(call.path)
      if found is not None:
        x = per_head_view(args[0], found.heads, found.features)
        mask = (jnp.arange(found.heads) == h).astype(x.dtype)
        mask = mask.reshape((1,) * (x.ndim - 2) + (found.heads, 1))
        x = _inject(x, _pattern(x.shape, x.dtype) * mask) * mask
        args = (x.reshape(args[0].shape), *args[1:])
        # A fixed cotangent at the output too: the projection's rows are
        # found whether or not a gradient reaches it from above.
        return jax.tree.map(
          lambda y: _inject(y, _pattern(y.shape, y.dtype)), next_fun(*args, **kwargs)
        )
      return next_fun(*args, **kwargs)

    def total(flat):
      out = run(jax.tree_util.tree_unflatten(treedef, flat), handle)
      return sum(
        jnp.sum(_pattern(v.shape, jnp.float32) * v.astype(jnp.float32))
        for v in jax.tree.leaves(out)
        if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact)
      )

    return jax.grad(total)(flat)

  mine = {
    i: next(a for a in attentions if p.startswith("/".join(a) + "/"))
    for i, p in enumerate(paths)
    if any(p.startswith("/".join(a) + "/") for a in attentions)
  }
  used: dict[int, list[np.ndarray]] = {i: [] for i in mine}
  grads_of = jax.jit(grads)
  for h in range(max(x.heads for x in heads.values())):
    g = grads_of(values, jnp.asarray(h, jnp.int32))
    for i in mine:
      used[i].append(np.asarray(g[i]) != 0)
  owners = {paths[i]: _resolve(np.stack(used[i])) for i in mine}
  for path, owner in owners.items():
    _from_kernel(path, owner, owners)
  return {paths[i]: (a, np.maximum(owners[paths[i]], -1)) for i, a in mine.items()}


def _from_kernel(path: str, owner: np.ndarray, owners: dict[str, np.ndarray]) -> None:
  """A bias's entries no head reached take the heads of its kernel's columns.

  The gradient of a key bias cancels (softmax ignores a shift of the
  scores), so the probe may see some of its entries reached by no head.
  """
  kernel = owners.get(path.rpartition("/")[0] + "/kernel")
  if owner.ndim != 1 or kernel is None or path == path.rpartition("/")[0] + "/kernel":
    return
  for axis in range(kernel.ndim):
    if kernel.shape[axis] == owner.shape[0]:
      lines = np.moveaxis(kernel, axis, -1).reshape(-1, owner.shape[0])
      if (lines == lines[0]).all():
        owner[owner == -1] = lines[0][owner == -1]
        return


def _resolve(used: np.ndarray) -> np.ndarray:
  """The head of each entry (-1: none) from `used[h]`, where head `h` reached it.

  An entry one head reaches is that head's; one several heads reach is
  shared (-2). An entry no head reaches (-1) is usually one whose gradient
  cancels exactly (a key bias: softmax ignores a shift), so it takes the
  head of its slice: along the one axis the leaf's heads vary on, or, in a
  vector, between two entries of the same head.
  """
  count = used.sum(0)
  owner = np.where(count == 1, used.argmax(0), np.where(count > 1, -2, -1))
  owner = owner.astype(np.int32)
  if owner.ndim >= 2:
    for axis in range(owner.ndim):
      moved = np.moveaxis(owner, axis, 0).reshape(owner.shape[axis], -1)
      heads = []
      for line in moved:
        known = np.unique(line[line != -1])
        if len(known) > 1:
          break
        heads.append(known[0] if len(known) else -1)
      else:
        shape = [1] * owner.ndim
        shape[axis] = owner.shape[axis]
        owner = np.broadcast_to(np.reshape(heads, shape), owner.shape)
        break
  elif owner.ndim == 1:
    known = np.flatnonzero(owner != -1)
    for a, b in itertools.pairwise(known):
      if b > a + 1 and owner[a] == owner[b]:
        owner[a + 1 : b] = owner[a]
  return np.array(owner, np.int32)
