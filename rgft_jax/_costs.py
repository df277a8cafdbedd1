"""FLOPs of a computation as XLA counts them, with scans counted in full.

XLA's cost analysis counts the body of a while loop once, whatever its trip
count, so a step that scans over L layers is undercounted by about (L - 1)
layers. `flops_of` traces the function, marks every `lax.scan` in it (at any
depth) fully unrolled, and reads XLA's cost analysis of that program: each
iteration is counted, and everything else is counted as XLA counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core


def _unrolled_param(value: Any) -> Any:
  if isinstance(value, jex_core.ClosedJaxpr):
    return jex_core.ClosedJaxpr(_unrolled(value.jaxpr), value.consts)
  if isinstance(value, jex_core.Jaxpr):
    return _unrolled(value)
  if isinstance(value, tuple) and any(
    isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)) for v in value
  ):
    return tuple(_unrolled_param(v) for v in value)
  return value


def _has_scan(jaxpr: jex_core.Jaxpr) -> bool:
  return any(eqn.primitive.name == "scan" for eqn in jaxpr.eqns) or any(
    _has_scan(sub) for sub in jex_core.subjaxprs(jaxpr)
  )


def _unrolled(jaxpr: jex_core.Jaxpr) -> jex_core.Jaxpr:
  """`jaxpr` with every scan (nested ones too) fully unrolled."""
  eqns = []
  for eqn in jaxpr.eqns:
    params = {k: _unrolled_param(v) for k, v in eqn.params.items()}
    if eqn.primitive.name == "scan":
      params["unroll"] = max(int(params["length"]), 1)
    eqns.append(eqn.replace(params=params))
  return jaxpr.replace(eqns=eqns)


def has_scan(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether tracing `fn(*args)` gives a `lax.scan` (at any depth)."""
  return _has_scan(jax.make_jaxpr(fn)(*args).jaxpr)


def lowered_unrolled(fn: Callable[..., Any], *args: Any) -> Any:
  """`jax.jit(fn).lower(*args)` with every scan fully unrolled (as it is
  when there is no scan)."""
  closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  if not _has_scan(closed.jaxpr):
    return jax.jit(fn).lower(*args)
  jaxpr = _unrolled(closed.jaxpr)
  consts = closed.consts
  out_tree = jax.tree.structure(shape)

  def run(*flat):
    return jax.tree.unflatten(out_tree, jax.core.eval_jaxpr(jaxpr, consts, *flat))

  return jax.jit(run).lower(*jax.tree.leaves(args))


def cost_flops(analysis: Any) -> float:
  """The `"flops"` entry of a `cost_analysis()` result (a dict or a list of one)."""
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def flops_of(fn: Callable[..., Any], *args: Any, compiled: bool = False) -> float:
  """FLOPs of `fn(*args)` as XLA counts them, each scan iteration included.

  Args:
    fn: the function (a train step, say); it is traced, not run.
    *args: its arguments (arrays or `jax.ShapeDtypeStruct`s).
    compiled: analyse the compiled program (what runs, after XLA's
      optimisations; slower) rather than the lowered one.

  Returns:
    The FLOPs of one call.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> def f(w, x):
    ...   return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]
    >>> w, x = jnp.ones((4, 8, 8)), jnp.ones((2, 8))
    >>> layer = 2 * 2 * 8 * 8  # One [2, 8] @ [8, 8] matmul.
    >>> round(flops_of(f, w, x) / layer)  # Every layer.
    4
    >>> round(jax.jit(f).lower(w, x).cost_analysis()["flops"] / layer)  # One.
    1
  """
  lowered = lowered_unrolled(fn, *args)
  return cost_flops((lowered.compile() if compiled else lowered).cost_analysis())


def peak_bytes(compiled: Any) -> int:
  """Peak memory of a compiled computation as XLA plans it: arguments +
  outputs - aliased + temporaries (`jax.jit(f).lower(...).compile()`)."""
  mem = compiled.memory_analysis()
  return int(
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
  )


def compiled_cost(compiled: Any) -> tuple[float, int]:
  """(FLOPs, peak bytes) of a compiled computation, as XLA counts them.

  Peak bytes are arguments + outputs - aliased + temporaries. XLA counts a
  while loop's body once, so the FLOPs of a scan over layers are those of
  one layer: use `flops_of` on the function for those.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import rgft_jax
    >>> x = jnp.ones((8, 8))
    >>> flops, peak = rgft_jax.compiled_cost(jax.jit(jnp.dot).lower(x, x).compile())
    >>> print(flops, peak >= 3 * x.nbytes)  # At least two arguments and the output.
    1024.0 True
  """
  return cost_flops(compiled.cost_analysis()), peak_bytes(compiled)
