"""Runtime gating: a module call whose backward pass runs only when a flag says so.

`gated(fn, detached, *args)` returns `fn(*args)`; its gradients are those of
`stop_gradient(fn(*args))` where the traced boolean `detached` is set, and the
ordinary ones elsewhere. The whole call is one `custom_vjp` (the values it
closes over, the parameters among them, become its arguments) whose backward pass is a
`lax.cond`: a detached call's weight and input gradients are never computed,
inside `lax.scan` bodies too, and one compiled program serves every detached
set. Only the backward pass branches: the forward pass always runs (the value
is needed downstream, and a `cond` around the forward costs more than it saves).

With `recompute`, the forward pass keeps no residuals for the backward pass:
only the call's inputs are kept, and a trained call recomputes its forward
pass inside the `cond` (remat of the gated call). A detached call then costs
its forward pass alone, in time and memory; a trained one pays a second
forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _inexact(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _zeros(tree: Any) -> Any:
  return jax.tree.map(jnp.zeros_like, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gated(fn, recompute, detached, consts, fixed, args):
  del detached, recompute
  return fn(args, consts, fixed)


def _gated_fwd(fn, recompute, detached, consts, fixed, args):
  if recompute:
    return fn(args, consts, fixed), (detached, fixed, (consts, args))
  out, pull = jax.vjp(lambda a, c: fn(a, c, fixed), args, consts)
  return out, (detached, fixed, pull)


def _gated_bwd(fn, recompute, residuals, g):
  detached, fixed, saved = residuals

  def trained():
    if recompute:
      consts, args = saved
      pull = jax.vjp(lambda a, c: fn(a, c, fixed), args, consts)[1]
    else:
      pull = saved
    return pull(g)

  shapes = jax.eval_shape(trained)
  d_args, d_consts = jax.lax.cond(detached, lambda: _zeros(shapes), trained)
  return None, d_consts, tuple(None for _ in fixed), d_args


_gated.defvjp(_gated_fwd, _gated_bwd)


def gated(
  fn: Callable[..., Any], detached: jax.Array, *args: Any, recompute: bool = False
) -> Any:
  """`fn(*args)`, differentiated as `stop_gradient(fn(*args))` where `detached`.

  Args:
    fn: the call (a module's `__call__` bound to its arguments' keywords); it
      may close over traced values (the module's parameters), which receive
      their gradients as usual when the call is trained.
    detached: a boolean scalar, traced or not.
    *args: the call's positional arguments; gradients reach their inexact
      leaves (the others are held fixed, like integer masks).
    recompute: keep no residuals; recompute the forward pass when trained.

  Returns:
    `fn(*args)`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> w = jnp.float32(3.0)
    >>> def loss(w, x, detached):
    ...   h = gated(lambda x: w * x, detached, x)
    ...   return jnp.sum(x + h)
    >>> [float(g) for g in jax.grad(loss, argnums=(0, 1))(w, 2.0, False)]
    [2.0, 4.0]
    >>> [float(g) for g in jax.grad(loss, argnums=(0, 1))(w, 2.0, True)]
    [0.0, 1.0]
  """
  leaves, treedef = jax.tree.flatten(args)
  diff = [i for i, x in enumerate(leaves) if _inexact(x)]

  def on_inexact(*xs):
    full = list(leaves)
    for i, x in zip(diff, xs, strict=True):
      full[i] = x
    return fn(*jax.tree.unflatten(treedef, full))

  xs = tuple(leaves[i] for i in diff)
  # Every value the call closes over (parameters, integer positions, keys)
  # becomes an explicit argument: the inexact ones get gradients.
  closed, shape = jax.make_jaxpr(on_inexact, return_shape=True)(*xs)
  kinds = [_inexact(c) for c in closed.consts]
  consts = tuple(c for c, k in zip(closed.consts, kinds, strict=True) if k)
  fixed = tuple(c for c, k in zip(closed.consts, kinds, strict=True) if not k)
  jaxpr, out_tree = closed.jaxpr, jax.tree.structure(shape)

  def converted(args, consts, fixed):
    inexact, rest = iter(consts), iter(fixed)
    values = [next(inexact) if k else next(rest) for k in kinds]
    return jax.tree.unflatten(out_tree, jax.core.eval_jaxpr(jaxpr, values, *args))

  detached = jnp.asarray(detached, bool)
  if detached.shape != ():
    raise ValueError(f"detached must be a boolean scalar, got shape {detached.shape}.")
  return _gated(converted, bool(recompute), detached, consts, fixed, xs)
