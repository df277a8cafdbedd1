"""Checks shared by the compatibility tests, written without the tracker.

The per-example reference for "norm_product" perturbs the chosen modules'
outputs itself (a `flax.linen.intercept_methods` interceptor of its own for
Linen, a wrapper object swapped into the model for NNX), runs one example at a
time, and takes `jax.grad` of that example's loss with respect to the
perturbation: `||dL_i/dh_i|| * ||h_i||`, averaged over the examples. For
heads it perturbs the input of the output projection instead and splits it
by hand into `(heads, head_dim)`. Nothing here calls `rgft_jax`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rgft_jax._components import leaves_by_path

# XLA's CPU backend at optimisation level 0 compiles these tiny models about
# twice as fast; the tests check values, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(autouse=True, scope="module")
def allow_rank_promotion():
  """tests/conftest.py makes implicit rank promotion an error for our code;
  Hugging Face's Flax models rely on it (GPT-2's `y + bias`, say). Module
  scope, so that it also covers the module-scoped model fixtures; each test
  module imports it (no conftest here: a second `conftest` module clashes
  with tests/conftest.py under `--doctest-modules`)."""
  with jax.numpy_rank_promotion("allow"):
    yield


def jit(fun, **kwargs):
  """`jax.jit` with `FAST_COMPILE`."""
  return jax.jit(fun, compiler_options=FAST_COMPILE, **kwargs)


def expected_owners(
  params: Any, rules: Sequence[tuple[str, str]]
) -> dict[str, str | None]:
  """Leaf path -> the component that should own it, from `(regex, name)` rules.

  The first rule whose pattern matches the whole path wins; a path no rule
  matches should be in no component.
  """
  owners = {}
  for path in leaves_by_path(params):
    owners[path] = None
    for pattern, template in rules:
      m = re.fullmatch(pattern, path)
      if m:
        owners[path] = m.expand(template)
        break
  return owners


def assert_ownership(comps, params, names, rules, unassigned_prefixes) -> None:
  """`comps` has exactly `names` and every leaf has the owner `rules` say.

  Each leaf the rules give to a component is owned by that component alone,
  whole; every other leaf is in no component, and the leaves under
  `unassigned_prefixes` (embeddings, final norm, head) are among them.
  """
  assert comps.names == tuple(names), comps.owned_paths()
  want = expected_owners(params, rules)
  assert sorted({o for o in want.values() if o is not None}) == sorted(names)
  owners_of: dict[str, list[str]] = {p: [] for p in want}
  for name, paths in comps.owned_paths().items():
    for p in paths:
      owners_of[p].append(name)
  got = {p: (o[0] if len(o) == 1 else tuple(o) or None) for p, o in owners_of.items()}
  wrong = {p: (got[p], want[p]) for p in want if got[p] != want[p]}
  assert not wrong, f"path: (owner, expected owner): {wrong}"
  unassigned = comps.unassigned(params)
  assert sorted(unassigned) == sorted(p for p, o in want.items() if o is None)
  for prefix in unassigned_prefixes:
    under = [p for p in want if p.startswith(prefix)]
    assert under, f"no parameter under {prefix!r}"
    assert set(under) <= set(unassigned), prefix
  # Whole leaves: an owned leaf is not partly unassigned.
  assert not set(unassigned) & {p for p, o in want.items() if o is not None}


def _norm(tree: Any) -> float:
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  return float(np.sqrt(sum(np.sum(x * x) for x in leaves)))


def _examples(batch: Sequence[Any]):
  size = jax.tree.leaves(batch)[0].shape[0]
  for i in range(size):
    yield jax.tree.map(lambda a, i=i: a[i : i + 1], batch)


@dataclasses.dataclass(frozen=True)
class Reference:
  """Batch-mean loss, gradients and per-example norm products, one example at a time."""

  loss: float
  grads: Any
  norm_product: dict[str, float]


@dataclasses.dataclass(frozen=True)
class HeadsAt:
  """An attention measured per head at the input of its output projection.

  `name`: the attention's component prefix (`name/head{h}`); the input's
  trailing `features` axes flatten to `heads` blocks of the head dimension.
  """

  name: str
  heads: int
  features: int


def _products(g, h, path: str, heads: dict[str, HeadsAt]) -> dict[str, float]:
  if path not in heads:
    return {path: _norm(g) * _norm(h)}
  at = heads[path]

  def split(x):
    x = np.asarray(x, np.float64)
    return x.reshape((*x.shape[: x.ndim - at.features], at.heads, -1))

  g, h = split(g), split(h)
  return {
    f"{at.name}/head{k}": _norm(g[..., k, :]) * _norm(h[..., k, :])
    for k in range(at.heads)
  }


def _per_example(grad_fn, batch, paths, heads=None) -> Reference:
  """`grad_fn(example) -> ((loss, h), (dL/dd, dL/dparams))` over the batch."""
  heads = heads or {}
  losses, grads, products = [], [], {}
  for example in _examples(batch):
    (loss, h), (g, g_params) = grad_fn(example)
    losses.append(float(loss))
    grads.append(jax.tree.map(lambda x: np.asarray(x, np.float64), g_params))
    for p in paths:
      for name, value in _products(g[p], h[p], p, heads).items():
        products.setdefault(name, []).append(value)
  return Reference(
    loss=float(np.mean(losses)),
    grads=jax.tree.map(lambda *xs: np.mean(xs, axis=0), *grads),
    norm_product={p: float(np.mean(v)) for p, v in products.items()},
  )


def linen_reference(
  loss_one: Callable[..., jax.Array],
  params: Any,
  batch: Sequence[Any],
  paths,
  heads: dict[str, HeadsAt] | None = None,
  parts: dict[str, int] | None = None,
) -> Reference:
  """The reference for the Linen modules at `paths` (`/`-joined module paths).

  `loss_one(params, *example)` applies the model (a Linen module) to one
  example (batch axis of size 1) and returns its loss. A path in `heads` is
  an output projection, measured per head on its input. A path in `parts`
  returns a tuple of which the entry `parts[path]` is what the model adds
  to its residual stream: only that entry is measured.
  """
  heads, parts = heads or {}, parts or {}
  targets = {tuple(p.split("/")): p for p in [*paths, *heads]}

  def run(deltas, params, example):
    outputs = {}

    def interceptor(next_fun, args, kwargs, context):
      name = targets.get(tuple(context.module.scope.path))
      if context.method_name != "__call__" or name is None:
        return next_fun(*args, **kwargs)
      assert name not in outputs, f"{name} called twice"
      if name in heads:
        outputs[name] = args[0]
        if deltas is not None:
          args = (args[0] + deltas[name], *args[1:])
        return next_fun(*args, **kwargs)
      out = next_fun(*args, **kwargs)
      if name in parts:
        i = parts[name]
        outputs[name] = out[i]
        if deltas is None:
          return out
        return (*out[:i], out[i] + deltas[name], *out[i + 1 :])
      outputs[name] = out
      if deltas is None:
        return out
      return jax.tree.map(jnp.add, out, deltas[name])

    with nn.intercept_methods(interceptor):
      loss = loss_one(params, *example)
    return loss, (loss, outputs)

  return _reference(run, params, batch, [*paths, *heads], heads)


def linen_detached_grads(loss, names, parts=None):
  """`grads(params, flags, *batch)`: `jax.grad` of `loss(params, *batch)` with
  the output of the Linen module `names[i]` (the entry `parts[name]` of a
  tuple output) behind `stop_gradient` where `flags[i]`, by an interceptor
  of its own (one compiled program for every set)."""
  parts = parts or {}
  targets = {tuple(n.split("/")): i for i, n in enumerate(names)}

  def grads(params, flags, *batch):
    def interceptor(next_fun, args, kwargs, context):
      i = targets.get(tuple(context.module.scope.path))
      out = next_fun(*args, **kwargs)
      if context.method_name != "__call__" or i is None:
        return out

      def cut(v):
        return jnp.where(flags[i], jax.lax.stop_gradient(v), v)

      if names[i] in parts:
        k = parts[names[i]]
        return (*out[:k], cut(out[k]), *out[k + 1 :])
      return jax.tree.map(cut, out)

    def detached(params):
      with nn.intercept_methods(interceptor):
        return loss(params, *batch)

    return jax.grad(detached)(params)

  return jit(grads)


def _reference(run, params, batch, paths, heads) -> Reference:
  """The reference of `run(deltas, params, example) -> (loss, (loss, values))`."""
  first = next(_examples(batch))
  shapes = jax.eval_shape(lambda p, e: run(None, p, e)[1][1], params, first)
  assert set(shapes) == set(paths), sorted(shapes)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  grad = jit(jax.grad(run, argnums=(0, 1), has_aux=True))

  def grad_fn(example):
    g, aux = grad(zeros, params, example)
    return aux, g

  return _per_example(grad_fn, batch, paths, heads)


class _Perturbed:
  """Stands in for an NNX submodule: its output (or, `at_input`, its first
  argument) plus a perturbation."""

  def __init__(self, inner, delta, sink, name, at_input=False):
    self.inner, self.delta, self.sink, self.name = inner, delta, sink, name
    self.at_input = at_input

  def __getattr__(self, name):  # Attributes of the wrapped module (its shape, say).
    return getattr(self.inner, name)

  def __call__(self, *args, **kwargs):
    if self.at_input:
      self.sink[self.name] = args[0]
      if self.delta is not None:
        args = (args[0] + self.delta, *args[1:])
      return self.inner(*args, **kwargs)
    out = self.inner(*args, **kwargs)
    self.sink[self.name] = out
    if self.delta is None:
      return out
    return jax.tree.map(jnp.add, out, self.delta)


def _child(obj, key: str):
  return obj[int(key)] if key.isdigit() else getattr(obj, key)


def nnx_reference(
  loss_one: Callable[..., jax.Array],
  model: nnx.Module,
  batch: Sequence[Any],
  paths,
  heads: dict[str, HeadsAt] | None = None,
) -> Reference:
  """The reference for the NNX submodules at `paths`; grads of the `nnx.Param`s.

  `loss_one(model, *example)` calls the model on one example and returns its
  loss. Each call works on a fresh copy of the model in which the submodules
  at `paths` (and the projections in `heads`, perturbed at their input) are
  replaced by `_Perturbed` wrappers.
  """
  heads = heads or {}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def run(deltas, params, example):
    live = nnx.merge(graphdef, params, rest)
    outputs = {}
    for p in [*paths, *heads]:
      *parent_keys, last = p.split("/")
      parent = live
      for k in parent_keys:
        parent = _child(parent, k)
      delta = None if deltas is None else deltas[p]
      inner = _child(parent, last)
      setattr(parent, last, _Perturbed(inner, delta, outputs, p, p in heads))
    loss = loss_one(live, *example)
    return loss, (loss, outputs)

  return _reference(run, params, batch, [*paths, *heads], heads)


class _Cut:
  """Stands in for an NNX submodule: its output behind `stop_gradient` where
  `flag` is set."""

  def __init__(self, inner, flag):
    self.inner, self.flag = inner, flag

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def __call__(self, *args, **kwargs):
    out = self.inner(*args, **kwargs)
    return jax.tree.map(
      lambda v: jnp.where(self.flag, jax.lax.stop_gradient(v), v), out
    )


def nnx_detached_grads(loss, model: nnx.Module, names):
  """`grads(params, flags, *batch)`: `jax.grad` over the `nnx.Param`s of
  `loss(model, *batch)` with the output of the NNX submodule `names[i]`
  behind `stop_gradient` where `flags[i]`, by a `_Cut` wrapper swapped in for
  it in a fresh copy of `model` (one compiled program for every set)."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def grads(params, flags, *batch):
    def detached(params):
      live = nnx.merge(graphdef, params, rest)
      for i, p in enumerate(names):
        *parent_keys, last = p.split("/")
        parent = live
        for k in parent_keys:
          parent = _child(parent, k)
        setattr(parent, last, _Cut(_child(parent, last), flags[i]))
      return loss(live, *batch)

    return jax.grad(detached)(params)

  return jit(grads)


def assert_matches(loss, grads, error_map, reference: Reference, rtol=1e-4) -> None:
  """The tracker's loss, gradients and error map against the reference."""
  np.testing.assert_allclose(float(loss), reference.loss, rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(reference.grads)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    grads,
    reference.grads,
  )
  assert_close_maps(error_map, reference.norm_product, rtol=rtol)


def assert_close_maps(error_map, reference, rtol=1e-4) -> None:
  assert sorted(error_map) == sorted(reference)
  got = {k: float(v) for k, v in error_map.items()}
  for k in reference:
    assert reference[k] > 0, (k, reference[k])
  np.testing.assert_allclose(
    [got[k] for k in sorted(reference)],
    [reference[k] for k in sorted(reference)],
    rtol=rtol,
    err_msg=f"tracker {got} vs reference {reference}",
  )
