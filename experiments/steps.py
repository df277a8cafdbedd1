"""The ViT methods' train steps (what each `Method.make_step` builds).

Each builder returns `step(params, opt_state, batch) -> (params, opt_state,
metrics)` for one variant:

* `dense_step`: differentiates the trained paths less `variant` (the rest
  is closed over, so XLA drops its gradient work), or everything through a
  `measure` when the method has an error map; holds the optimizer state of
  the paths in `variant` (LISA's sampled-out blocks) and, bit for bit, the
  entries a `masks.hold_entries` in the optimizer marks.
* `detached_step`: budgeted RGFT, `variant` names the components whose output
  is detached (`rgft_jax.detachable_step`); with `variant == RUNTIME` the step
  takes the detached set as a fourth argument, a boolean array over the
  components (runtime gating: one program for every set, real savings
  inside a scan over layers).

The optimizer holds the learning rate (`frozen.injected`), so a step serves
every rate.
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
from rgft_jax import hold_masked


def _loss(logits, labels):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss.mean(), (jnp.argmax(logits, -1) == labels).mean()


def loss_and_accuracy(model: nn.Module, model_params, batch):
  """Batch-mean cross-entropy and accuracy of `model` with `model_params`."""
  return _loss(model.apply({"params": model_params}, batch["image"]), batch["label"])


def logits(model: nn.Module, to_params, forward, tree: Any, images: jax.Array):
  """The logits of a method's trained `tree` (`forward`: adapters; else the
  model on `to_params(tree)`, LoRA merged)."""
  if forward is not None:
    return forward(model, tree, images)
  return model.apply({"params": to_params(tree)}, images)


def method_loss(model: nn.Module, to_params=identity, forward=None):
  """`loss_fn(tree, batch) -> (loss, accuracy)` of a method's trained tree."""
  if forward is None and to_params is identity:
    return functools.partial(loss_and_accuracy, model)

  def loss_fn(tree, batch):
    out = logits(model, to_params, forward, tree, batch["image"])
    return _loss(out, batch["label"])

  return loss_fn


def metrics(tracked: bool, loss, acc, opt_state) -> dict[str, Any]:
  out = {"loss": loss, "accuracy": acc}
  if tracked:
    state = rgft_jax.residual_error_state(opt_state)
    out["error_map"] = state.ema  # The EMA (the record keeps its key).
    out["alpha"] = state.alpha
  return out


def dense_step(
  loss_fn,
  tx: optax.GradientTransformation,
  trainable: frozenset[str],
  variant: frozenset[str],
  measure=None,
):
  """The step of a method that differentiates the paths in `trainable`
  (less `variant`, held), or, with `measure` (`error_maps`), every
  parameter, the error map fed to `tx` (RGFT's)."""
  train = trainable - variant

  def step(params, opt_state, batch):
    leaves = flat(params)
    extra = {}
    if measure is not None:
      (loss, acc), grads, error_map = measure(loss_fn, params, opt_state, batch)
      extra["error_map"] = error_map
    else:
      (loss, acc), grads = frozen.value_and_grad(
        lambda p: loss_fn(p, batch), lambda path: path in train, has_aux=True
      )(params)
    updates, new_state = tx.update(grads, opt_state, params, **extra)
    if variant:
      keep = unflat({p: p in variant for p in leaves})
      updates, new_state = hold_masked(tx, keep, updates, new_state, opt_state)
    new = optax.apply_updates(params, updates)
    held = masks.held_entries(new_state)
    if held is not None:  # Exactly the old values (p + 0 turns -0.0 into 0.0).
      new = jax.tree.map(jnp.where, held, params, new)
    return new, new_state, metrics(measure is not None, loss, acc, new_state)

  return step


def detached_step(
  model: nn.Module,
  tracker,
  tx: optax.GradientTransformation,
  components: rgft_jax.Components,
  variant,
  exact: bool = False,
  recompute: bool = False,
):
  """Budgeted RGFT's step: the components in `variant` are detached."""
  sparse = rgft_jax.detachable_step(
    tracker,
    tx,
    functools.partial(loss_and_accuracy, model),
    components,
    has_aux=True,
    exact=exact,
    recompute=recompute,
  )

  def step(params, opt_state, batch, flags=None):
    detached = flags if variant == RUNTIME else variant
    (loss, acc), params, new_state = sparse(params, opt_state, batch, detached=detached)
    return params, new_state, metrics(True, loss, acc, new_state)

  return step
