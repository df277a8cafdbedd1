"""One fine-tuning run: the training loop, evaluation and the run's record.

The pieces live beside it: `steps` (what a step computes), `checkpoint`
(resume), `accounting` (FLOPs, memory, update ratio), `store` (files).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import methods as methods_lib
from experiments.accounting import StepCounts
from experiments.accounting import measure_costs
from experiments.accounting import step_cost
from experiments.accounting import update_ratio
from experiments.checkpoint import Checkpoints
from experiments.checkpoint import checksum
from experiments.checkpoint import signature
from experiments.steps import loss_and_accuracy
from experiments.steps import make_step
from experiments.steps import variants_of
from experiments.store import load_json
from experiments.store import lock
from experiments.store import save_json
from experiments.trees import identity
from rgft_jax import StepVariants
from rgft_jax.tensorboard import ErrorMapWriter

__all__ = (  # Names other modules use from here.
  "accuracy",
  "checksum",
  "evaluate",
  "load_json",
  "lock",
  "loss_and_accuracy",
  "make_step",
  "measure_costs",
  "run",
  "save_json",
  "update_ratio",
  "variants_of",
)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _correct(model, to_model, forward, params, batch):
  if forward is None:
    logits = model.apply({"params": to_model(params)}, batch["image"])
  else:
    logits = forward(model, params, batch["image"])
  return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"])


def accuracy(
  model: nn.Module, params, batches, to_model=identity, forward=None
) -> float:
  """Accuracy over padded, masked `batches` of `to_model(params)`.

  With `forward(model, params, images) -> logits`, that gives the logits.
  """
  hits, total = 0.0, 0.0
  for batch in batches:
    hits += float(_correct(model, to_model, forward, params, batch))
    total += float(np.sum(batch["mask"]))
  return hits / total


def evaluate(model, method, params, batches) -> float:
  """Accuracy of `method`'s parameters (LoRA's merged, adapters in) over `batches`."""
  return accuracy(model, params, batches, method.to_model, method.forward)


class _Clock:
  """Wall time of the loop, paused for compilation, logging and evaluation."""

  def __init__(self, elapsed: float):
    self.elapsed, self._tic = elapsed, time.perf_counter()

  def pause(self, sync: Any) -> None:
    jax.block_until_ready(sync)
    self.elapsed += time.perf_counter() - self._tic

  def resume(self) -> None:
    self._tic = time.perf_counter()


def _new_history() -> dict[str, list]:
  history = {"step": [], "loss": [], "accuracy": [], "error_map": [], "alpha": []}
  history.update(val_step=[], val_accuracy=[], val_flops=[])
  return history


def _log_metrics(history, method, step, metrics, variant) -> None:
  """Appends a logged step's loss, accuracy, error map, multipliers, update ratio."""
  history["step"].append(step)
  history["loss"].append(float(metrics["loss"]))
  history["accuracy"].append(float(metrics["accuracy"]))
  alpha = metrics.get("alpha")
  if alpha is not None:
    history["error_map"].append(np.asarray(metrics["error_map"]).tolist())
    history["alpha"].append(np.asarray(alpha).tolist())
  history.setdefault("update_ratio", []).append(update_ratio(method, variant, alpha))


def _write(writer, method, step, metrics, opt_state):
  writer.add_scalar("train/loss", float(metrics["loss"]), step)
  writer.add_scalar("train/accuracy", float(metrics["accuracy"]), step)
  if method.components is not None:
    ErrorMapWriter(writer, method.components.names, every=1)(step, opt_state)


def run(
  model: nn.Module,
  method: methods_lib.Method,
  train_batches,
  eval_batches: Callable[[], Any],
  *,
  steps: int,
  seed: int,
  workdir: str,
  log_every: int = 10,
  ckpt_every: int = 100,
  writer=None,
  progress: bool = True,
  variants: StepVariants | None = None,
  val_batches: Callable[[], Any] | None = None,
  eval_every: int = 0,
  config: dict[str, Any] | None = None,
  task: str | None = None,
) -> tuple[dict[str, Any], Any]:
  """Fine-tunes for `steps` steps, resuming from `workdir`'s checkpoint if any.

  `train_batches[step]` is the batch of a step (so a resumed run sees the same
  data). `method.steps`, when set, replaces `steps` (equal-FLOPs baselines).
  `variants` holds the compiled step variants (`variants_of`); runs that
  differ only in seed and parameter values can share it. With `val_batches`
  and `eval_every`, held-out accuracy is logged every `eval_every` steps next
  to the FLOPs spent so far. `config` (the settings that change the result)
  is part of the checkpoint's signature, with `task`, the method and `seed`:
  a checkpoint of another run is never resumed. Returns the run's record (accuracy,
  counted FLOPs, peak bytes, wall time without compilation, update ratio, the
  logged trajectories) and the final parameters.
  """
  steps = method.steps or steps
  params = jax.tree.map(jnp.copy, method.params)
  opt_state = method.tx.init(params)
  history, counts = _new_history(), StepCounts()
  start, wall, compilations = 0, 0.0, 0
  sig = signature(method, (params, opt_state), config, seed=seed, task=task)
  ckpts = Checkpoints(workdir, sig, ckpt_every)
  found = ckpts.resume((params, opt_state))
  if found is not None:
    (params, opt_state), log = found
    history, counts = log["history"], StepCounts(log["counts"], log["variants"])
    start, wall, compilations = log["step"], log["wall"], log["compilations"]
    if start > steps:
      raise ValueError(
        f"The checkpoint in {ckpts.dir} is at step {start}, past this run's "
        f"{steps} steps; it is left as it is."
      )
    method.policy.load_state_dict(log["policy"])
  else:
    method.policy.reset()
  if variants is None:
    variants = variants_of(model, method)

  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, desc=method.name, leave=False)
  clock = _Clock(wall)
  for step in range(start, steps):
    batch = train_batches[step]
    method.policy.prepare(step, params, opt_state, batch)
    variant = method.policy.variant(step, opt_state)
    key, extra = method.key(variant)
    if not variants.has(key, params, opt_state, batch, *extra):
      clock.pause(params)  # Compilation is reported, not timed.
      variants.compiled(key, params, opt_state, batch, *extra)
      compilations += 1
      clock.resume()
    counts.add(method.policy.variant_name(variant), variant)
    params, opt_state, metrics = variants(key, params, opt_state, batch, *extra)
    method.policy.spend(step, variant)
    done = step + 1
    logging = done % log_every == 0 or done == steps
    evaluating = val_batches is not None and eval_every > 0
    evaluating = evaluating and (done % eval_every == 0 or done == steps)
    if logging or evaluating:
      clock.pause(params)  # Logging and evaluation are not timed.
    if logging:
      metrics = jax.device_get(metrics)
      _log_metrics(history, method, done, metrics, variant)
      if writer is not None:
        _write(writer, method, done, metrics, opt_state)
    if evaluating:
      history["val_step"].append(done)
      history["val_accuracy"].append(evaluate(model, method, params, val_batches()))
      history["val_flops"].append(
        counts.flops(step_cost(method, variants, params, opt_state, train_batches[0]))
        + float(getattr(method.policy, "probe_flops", 0.0))
      )
    if logging or evaluating:
      clock.resume()
    if ckpts.due(done, last=done == steps):
      ckpts.save(
        done,
        (params, opt_state),
        {
          "history": history,
          "counts": counts.counts,
          "variants": counts.names,
          "step": done,
          "wall": clock.elapsed,
          "compilations": compilations,
          "policy": method.policy.state_dict(),
        },
      )
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  ckpts.close()
  record = report(
    model,
    method,
    params,
    eval_batches,
    seed=seed,
    steps=steps,
    history=history,
    counts=counts,
    costs=counts.costs(
      step_cost(method, variants, params, opt_state, train_batches[0])
    ),
    wall=clock.elapsed,
    compilations=compilations,
  )
  return record, params


def report(
  model,
  method,
  params,
  eval_batches,
  *,
  seed,
  steps,
  history,
  counts,
  costs,
  wall,
  compilations,
) -> dict[str, Any]:
  """The run's record: test accuracy, what it cost, its logged trajectories.

  `costs` is `(FLOPs per variant name, peak bytes)` of the variants that ran
  (compiled again if this process resumed).
  """
  flops, peak = costs
  # What the policy spent measuring the model (DropBP's sensitivity,
  # GreenTrainer's importance) is paid besides the steps.
  probe = float(getattr(method.policy, "probe_flops", 0.0))
  record = {
    "method": method.name,
    "seed": seed,
    "steps": steps,
    "test_accuracy": evaluate(model, method, params, eval_batches()),
    "train_flops": float(sum(flops[v] * n for v, n in counts.counts.items())) + probe,
    "probe_flops": probe,
    "step_flops": flops,
    "steps_per_variant": counts.counts,
    "step_variants": len(flops),
    "compilations": compilations,
    "peak_bytes": peak,
    "wall_s": wall,
    "update_ratio": float(np.mean(history["update_ratio"])),
    "trainable_params": methods_lib.trainable_count(method),
    "model_params": methods_lib.count(method.to_model(method.params)),
    "components": list(method.components.names) if method.components else [],
    "history": history,
  }
  record.update(method.policy.record())
  return record
