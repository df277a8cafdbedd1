"""One run of a method: the loop, its cost accounting, and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

import rgft_jax
from experiments import loop
from experiments.lm import methods as methods_lib
from experiments.registry import Method

LN2 = math.log(2.0)


def bits_per_byte(
  decoder: methods_lib.Decoder, params, windows: np.ndarray, batch_size: int = 64
) -> float:
  """Mean next-byte cross-entropy in bits over every prediction of `windows`.

  `windows` is int32 [N, T + 1] (`data.eval_windows`); the model reads each
  window's first T bytes and predicts the last T. The last batch is padded
  (so one shape is compiled) and the padding is not counted.
  """
  total, n = 0.0, len(windows)
  for start in range(0, n, batch_size):
    chunk = windows[start : start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    nats = np.asarray(decoder.window_nats(params, chunk), np.float64)
    total += nats[: batch_size - pad].sum()
  return total / n / LN2


def run(
  method: Method,
  variants: rgft_jax.StepVariants,
  batches,
  *,
  steps: int,
  learning_rate: float,
  seed: int,
  log_every: int = 10,
  evaluate: Callable[[Any], float] | None = None,
  eval_every: int = 0,
) -> tuple[dict[str, Any], Any]:
  """Trains `method` from its start for `steps` steps (`method.steps` if set).

  `batches[step]` is the batch of a step. Returns the run's record (loss and,
  for RGFT, the EMA error map and multipliers every `log_every` steps; the
  final error map; FLOPs of each compiled variant times the steps it ran;
  the largest variant's peak memory; wall time of the loop without
  compilation and logging) and the trained tree. With `evaluate` and
  `eval_every`, `evaluate(tree)` every `eval_every` steps and after the last
  (not timed) gives the learning curve `record["curve"]`: steps, the FLOPs
  spent by then (the policy's probes included) and the values.
  """
  steps = method.steps or steps
  tree, opt_state = method.init(learning_rate, seed)
  policy = method.policy(seed)
  policy.reset()
  history: dict[str, list] = {"step": [], "loss": [], "error_map": [], "alpha": []}
  curve: list[tuple[int, float, float]] = []

  def cost_of(tree, opt_state):
    return loop.step_cost(method, variants, tree, opt_state, batches[0])

  def log(now: loop.Now) -> None:
    history["step"].append(now.step)
    history["loss"].append(float(now.metrics["loss"]))
    if method.components is not None:
      state = rgft_jax.residual_error_state(now.opt_state)
      history["error_map"].append(np.asarray(state.ema).tolist())
      history["alpha"].append(np.asarray(state.alpha).tolist())

  def validate(now: loop.Now) -> None:
    probe = float(getattr(policy, "probe_flops", 0.0))
    flops = now.progress.counts.flops(cost_of(now.tree, now.opt_state)) + probe
    curve.append((now.step, flops, float(evaluate(now.tree))))

  hooks = [loop.Every(log_every, log)]
  if evaluate is not None:
    hooks.append(loop.Every(eval_every, validate))
  tree, opt_state, done = loop.train(
    method, variants, policy, batches, tree, opt_state, steps=steps, hooks=hooks
  )
  flops, peak = done.counts.costs(cost_of(tree, opt_state))
  counts = done.counts.counts
  probe = float(getattr(policy, "probe_flops", 0.0))
  record = {
    "method": method.name,
    "seed": seed,
    "learning_rate": learning_rate,
    "steps": steps,
    # The steps, and what the policy spent measuring the model (DropBP's
    # sensitivity, GreenTrainer's importance).
    "train_flops": float(sum(flops[v] * n for v, n in counts.items())) + probe,
    "probe_flops": probe,
    "step_flops": flops,
    "steps_per_variant": counts,
    "step_variants": len(flops),
    "compilations": done.compilations,
    "peak_bytes": int(peak),
    "wall_s": done.wall,
    "history": history,
  }
  if curve:
    record["curve"] = {
      "step": [c[0] for c in curve],
      "train_flops": [c[1] for c in curve],
      "value": [c[2] for c in curve],
    }
  if method.components is not None:
    ema = np.asarray(rgft_jax.residual_error_state(opt_state).ema)
    record["components"] = list(method.components.names)
    record["error_map"] = dict(zip(method.components.names, ema.tolist(), strict=True))
  budget = getattr(policy, "budget", None)
  if budget is not None:
    record["budget"] = {
      "target": budget.budget,
      "fraction": budget.fraction,
      "decisions": budget.decisions,
    }
  return record, tree
