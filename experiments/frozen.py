"""Gradients of the parameters a step trains, the rest closed over.

A parameter a step does not train is not differentiated: the loss closes
over it, so XLA drops its weight-gradient work and a step's counted FLOPs
are what the method really costs. Its gradient is returned as zeros, so the
optimizer sees the whole tree (`rgft_jax.hold_masked` then keeps its update
and its optimizer state as they were).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import rgft_jax

ADAM_COUNTS = ("global", "per_entry")


def path_of(key_path) -> str:
  """`"layers/0/attn"` for a pytree key path (string or integer keys)."""
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def value_and_grad(
  loss: Callable[[Any], Any], trains: Callable[[str], bool], has_aux: bool = False
) -> Callable[[Any], tuple[Any, Any]]:
  """`params -> (loss(params), grads)`, differentiating only the leaves whose
  path `trains`; the others get zero gradients and cost no gradient work.

  >>> import jax.numpy as jnp
  >>> params = {"a": jnp.float32(2.0), "b": jnp.float32(3.0)}
  >>> value, grads = value_and_grad(lambda p: p["a"] * p["b"], lambda p: p == "a")(
  ...   params
  ... )
  >>> float(value), float(grads["a"]), float(grads["b"])
  (6.0, 3.0, 0.0)
  """

  def run(params):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    train = [trains(path_of(p)) for p, _ in leaves]
    values = [v for _, v in leaves]

    def partial(trained):
      it = iter(trained)
      tree = [next(it) if t else v for v, t in zip(values, train, strict=True)]
      return loss(jax.tree.unflatten(treedef, tree))

    trained = [v for v, t in zip(values, train, strict=True) if t]
    out, g = jax.value_and_grad(partial, has_aux=has_aux)(trained)
    it = iter(g)
    grads = [
      next(it) if t else jnp.zeros_like(v) for v, t in zip(values, train, strict=True)
    ]
    return out, jax.tree.unflatten(treedef, grads)

  return run


def adam(learning_rate: Any, count: str = "global") -> optax.GradientTransformation:
  """Adam for steps that hold parameters: bias correction by the run's step
  count (`"global"`, `optax.adam` itself) or by each entry's own
  (`"per_entry"`, `rgft_jax.scale_by_adam_per_entry`: a held parameter
  resumes where it left off)."""
  if count == "global":
    return optax.adam(learning_rate)
  if count == "per_entry":
    return optax.chain(
      rgft_jax.scale_by_adam_per_entry(), optax.scale_by_learning_rate(learning_rate)
    )
  raise ValueError(f"Adam's count must be one of {ADAM_COUNTS}, got {count!r}.")


def injected(
  make: Callable[[Any], optax.GradientTransformation], learning_rate: float
) -> optax.GradientTransformation:
  """`make(learning_rate)` with the rate in its state (`optax.inject_hyperparams`):
  its `update` reads the rate from the state, so one compiled step serves
  every rate (and `injected(make, 1.0).update` any state `init` made).
  `make(learning_rate)` is called once here, so a bad setting raises now."""
  make(learning_rate)
  return optax.inject_hyperparams(lambda learning_rate: make(learning_rate))(
    learning_rate=learning_rate
  )
