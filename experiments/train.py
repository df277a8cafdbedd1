"""One fine-tuning run: the training loop, evaluation and the run's record.

The pieces live beside it: `steps` (what a step computes), `checkpoint`
(resume), `accounting` (FLOPs, memory, update ratio), `store` (files).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import loop
from experiments import methods as methods_lib
from experiments.accounting import measure_costs
from experiments.accounting import update_ratio
from experiments.checkpoint import Checkpoints
from experiments.checkpoint import checksum
from experiments.checkpoint import signature
from experiments.loop import Every
from experiments.loop import Now
from experiments.loop import Progress
from experiments.loop import StepCounts
from experiments.loop import When
from experiments.loop import step_cost
from experiments.loop import variants_of
from experiments.steps import loss_and_accuracy
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


def evaluate(model, method, tree, batches) -> float:
  """Accuracy of `method`'s trained tree (LoRA's merged, adapters in) over `batches`."""
  return accuracy(model, tree, batches, method.to_params, method.forward)


def _new_history() -> dict[str, list]:
  history = {"step": [], "loss": [], "accuracy": [], "error_map": [], "alpha": []}
  history.update(val_step=[], val_accuracy=[], val_flops=[])
  return history


def _log_metrics(history, method, now: Now, metrics) -> None:
  """Appends a logged step's loss, accuracy, error map, multipliers, update ratio."""
  step, variant = now.step, now.variant
  history["step"].append(step)
  history["loss"].append(float(metrics["loss"]))
  history["accuracy"].append(float(metrics["accuracy"]))
  alpha = metrics.get("alpha")
  if alpha is not None:
    history["error_map"].append(np.asarray(metrics["error_map"]).tolist())
    history["alpha"].append(np.asarray(alpha).tolist())
  ratio = update_ratio(method, now.tree, now.opt_state, variant, alpha)
  history.setdefault("update_ratio", []).append(ratio)


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
  learning_rate: float,
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
  """Fine-tunes from `method.init(learning_rate, seed)` for `steps` steps,
  resuming from `workdir`'s checkpoint if any.

  `train_batches[step]` is the batch of a step (so a resumed run sees the same
  data). `method.steps`, when set, replaces `steps` (equal-FLOPs baselines).
  `variants` holds the compiled step variants (`variants_of`); runs of a
  method at any rate and seed can share it. With `val_batches`
  and `eval_every`, held-out accuracy is logged every `eval_every` steps next
  to the FLOPs spent so far. `config` (the settings that change the result)
  is part of the checkpoint's signature, with `task`, the method and `seed`:
  a checkpoint of another run is never resumed. Returns the run's record (accuracy,
  counted FLOPs, peak bytes, wall time without compilation, update ratio, the
  logged trajectories) and the final parameters.
  """
  steps = method.steps or steps
  params, opt_state = method.init(learning_rate, seed)
  params = jax.tree.map(jnp.copy, params)
  policy = method.policy(seed)
  history, at = _new_history(), Progress()
  sig = signature(method, (params, opt_state), config, seed=seed, task=task)
  ckpts = Checkpoints(workdir, sig, ckpt_every)
  found = ckpts.resume((params, opt_state))
  if found is not None:
    (params, opt_state), log = found
    history = log["history"]
    at = Progress(
      log["step"],
      StepCounts(log["counts"], log["variants"]),
      log["wall"],
      log["compilations"],
    )
    if at.step > steps:
      raise ValueError(
        f"The checkpoint in {ckpts.dir} is at step {at.step}, past this run's "
        f"{steps} steps; it is left as it is."
      )
    policy.load_state_dict(log["policy"])
  else:
    policy.reset()
  if variants is None:
    variants = variants_of(method)

  def log_metrics(now: Now) -> None:
    metrics = jax.device_get(now.metrics)
    _log_metrics(history, method, now, metrics)
    if writer is not None:
      _write(writer, method, now.step, metrics, now.opt_state)

  def validate(now: Now) -> None:
    history["val_step"].append(now.step)
    history["val_accuracy"].append(evaluate(model, method, now.tree, val_batches()))
    cost_of = step_cost(method, variants, now.tree, now.opt_state, train_batches[0])
    history["val_flops"].append(
      now.progress.counts.flops(cost_of) + float(getattr(policy, "probe_flops", 0.0))
    )

  def save(now: Now) -> None:
    p = now.progress
    ckpts.save(
      now.step,
      (now.tree, now.opt_state),
      {
        "history": history,
        "counts": p.counts.counts,
        "variants": p.counts.names,
        "step": now.step,
        "wall": p.wall,
        "compilations": p.compilations,
        "policy": policy.state_dict(),
      },
    )

  hooks = [Every(log_every, log_metrics)]
  if val_batches is not None:
    hooks.append(Every(eval_every, validate))
  hooks.append(When(0, save, when=lambda step, last: ckpts.due(step, last=last)))
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=at.step, desc=method.name, leave=False)
    hooks.append(Every(1, lambda now: bar.update(1), timed=True))
  params, opt_state, at = loop.train(
    method,
    variants,
    policy,
    train_batches,
    params,
    opt_state,
    steps=steps,
    hooks=hooks,
    progress=at,
  )
  if bar is not None:
    bar.close()
  ckpts.close()
  record = report(
    model,
    method,
    policy,
    params,
    opt_state,
    eval_batches,
    seed=seed,
    steps=steps,
    history=history,
    counts=at.counts,
    costs=at.counts.costs(
      step_cost(method, variants, params, opt_state, train_batches[0])
    ),
    wall=at.wall,
    compilations=at.compilations,
  )
  return record, params


def report(
  model,
  method,
  policy,
  params,
  opt_state,
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
  probe = float(getattr(policy, "probe_flops", 0.0))
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
    "trainable_params": methods_lib.trainable_count(method, params, opt_state),
    "model_params": methods_lib.count(method.to_params(params)),
    "components": list(method.components.names) if method.components else [],
    "history": history,
  }
  record.update(policy.record())
  return record
