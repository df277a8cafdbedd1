"""Train steps. A method names its step builder; the training loop knows none.

`build(model, method, variant)` returns `step(params, opt_state, batch) ->
(params, opt_state, metrics)`. Two builders cover every method:

* `dense_step`: differentiates `method.trainable - variant` (the rest is
  closed over, so XLA drops its gradient work), or everything through
  `method.measure` when the method has an error map; holds the optimizer
  state of the paths in `variant` (LISA's sampled-out blocks) and, bit for
  bit, the entries a `masks.hold_entries` in the optimizer marks.
* `detached_step`: budgeted RGFT, `variant` names the components whose output
  is detached (`rgft_jax.detachable_step`); with `variant == RUNTIME` the step
  takes the detached set as a fourth argument, a boolean array over the
  components (runtime gating: one program for every set, real savings
  inside a scan over layers).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import rgft_jax
from experiments import frozen
from experiments import masks
from experiments.loop import RUNTIME
from experiments.trees import flat
from experiments.trees import identity
from experiments.trees import unflat
from rgft_jax import StepVariants
from rgft_jax import hold_masked


def _loss(logits, labels):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss.mean(), (jnp.argmax(logits, -1) == labels).mean()


def loss_and_accuracy(model: nn.Module, model_params, batch):
  """Batch-mean cross-entropy and accuracy of `model` with `model_params`."""
  return _loss(model.apply({"params": model_params}, batch["image"]), batch["label"])


def logits(model: nn.Module, method, tree: Any, images: jax.Array) -> jax.Array:
  """`method`'s logits from its parameters `tree` (adapters, LoRA's merge, ...)."""
  if method.forward is not None:
    return method.forward(model, tree, images)
  return model.apply({"params": method.to_model(tree)}, images)


def method_loss(model: nn.Module, method):
  """`loss_fn(tree, batch) -> (loss, accuracy)` of `method`'s parameters."""
  if method.forward is None and method.to_model is identity:
    return functools.partial(loss_and_accuracy, model)

  def loss_fn(tree, batch):
    return _loss(logits(model, method, tree, batch["image"]), batch["label"])

  return loss_fn


def metrics(method, loss, acc, opt_state) -> dict[str, Any]:
  out = {"loss": loss, "accuracy": acc}
  if method.components is not None:
    state = rgft_jax.residual_error_state(opt_state)
    out["error_map"] = state.ema  # The EMA (the record keeps its key).
    out["alpha"] = state.alpha
  return out


def dense_step(model: nn.Module, method, variant: frozenset[str]):
  """The step of a method that differentiates its trainable parameters."""
  loss_fn = method_loss(model, method)
  train = method.trainable - variant

  def step(params, opt_state, batch):
    leaves = flat(params)
    extra = {}
    if method.measure is not None:
      (loss, acc), grads, error_map = method.measure(loss_fn, params, opt_state, batch)
      extra["error_map"] = error_map
    else:
      (loss, acc), grads = frozen.value_and_grad(
        lambda p: loss_fn(p, batch), lambda path: path in train, has_aux=True
      )(params)
    updates, new_state = method.tx.update(grads, opt_state, params, **extra)
    if variant:
      keep = unflat({p: p in variant for p in leaves})
      updates, new_state = hold_masked(method.tx, keep, updates, new_state, opt_state)
    new = optax.apply_updates(params, updates)
    held = masks.held_entries(new_state)
    if held is not None:  # Exactly the old values (p + 0 turns -0.0 into 0.0).
      new = jax.tree.map(jnp.where, held, params, new)
    return new, new_state, metrics(method, loss, acc, new_state)

  return step


def detached_step(model: nn.Module, method, variant: frozenset[str]):
  """Budgeted RGFT's step: the components in `variant` are detached."""
  sparse = rgft_jax.detachable_step(
    method.tracker,
    method.tx,
    functools.partial(loss_and_accuracy, model),
    method.components,
    has_aux=True,
    exact=method.exact,
    recompute=method.recompute,
  )

  def step(params, opt_state, batch, flags=None):
    detached = flags if variant == RUNTIME else variant
    (loss, acc), params, new_state = sparse(params, opt_state, batch, detached=detached)
    return params, new_state, metrics(method, loss, acc, new_state)

  return step


def make_step(model: nn.Module, method, variant: frozenset[str]):
  """`step(params, opt_state, batch) -> (params, opt_state, metrics)` of a variant."""
  return method.build_step(model, method, variant)


def variants_of(model: nn.Module, method) -> StepVariants:
  """The compiled steps of `method`, one per variant (seeds may share them).

  Whatever differs between seeds lives in the parameters or the optimizer
  state (LoRA's and the adapters' init, masks, the random map's seed), so a
  step compiled for one seed runs every other.
  """
  return StepVariants(lambda v: make_step(model, method, v), max_variants=32)
