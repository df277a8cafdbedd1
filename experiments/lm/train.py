"""One run of a method: the loop, its cost accounting, and bits per byte."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import rgft_jax
from experiments.lm import methods as methods_lib

LN2 = math.log(2.0)


def variants_of(method: methods_lib.Method) -> rgft_jax.StepVariants:
  """The compiled steps of `method`, one per variant, shared by its runs."""
  return rgft_jax.StepVariants(method.make_step, max_variants=32)


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


def _variant_name(variant: frozenset[str]) -> str:
  return ",".join(sorted(variant)) if variant else "all"


def run(
  method: methods_lib.Method,
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
  history = {"step": [], "loss": [], "error_map": [], "alpha": []}
  counts: dict[str, int] = {}
  members: dict[str, frozenset[str]] = {}
  wall, compilations = 0.0, 0
  curve: list[tuple[int, dict[str, int], float, float]] = []
  tic = time.perf_counter()
  for step in range(steps):
    batch = batches[step]
    policy.prepare(step, tree, opt_state, batch)  # Timed: part of the method.
    variant = policy.variant(step, opt_state)
    key, extra = variant, ()
    if method.runtime is not None:  # One compiled step takes every set.
      key, extra = methods_lib.RUNTIME, (method.flags(variant),)
    if not variants.has(key, tree, opt_state, batch, *extra):
      jax.block_until_ready(tree)
      wall += time.perf_counter() - tic  # Compilation is reported, not timed.
      variants.compiled(key, tree, opt_state, batch, *extra)
      compilations += 1
      tic = time.perf_counter()
    name = _variant_name(variant)
    counts[name] = counts.get(name, 0) + 1
    members[name] = variant
    tree, opt_state, metrics = variants(key, tree, opt_state, batch, *extra)
    policy.spend(step, variant)
    if (step + 1) % log_every == 0 or step + 1 == steps:
      jax.block_until_ready(tree)
      wall += time.perf_counter() - tic  # Logging is not timed.
      history["step"].append(step + 1)
      history["loss"].append(float(metrics["loss"]))
      if method.components is not None:
        state = rgft_jax.residual_error_state(opt_state)
        history["error_map"].append(np.asarray(state.ema).tolist())
        history["alpha"].append(np.asarray(state.alpha).tolist())
      tic = time.perf_counter()
    if (
      evaluate is not None
      and eval_every
      and ((step + 1) % eval_every == 0 or step + 1 == steps)
    ):
      jax.block_until_ready(tree)
      wall += time.perf_counter() - tic  # Evaluation is not timed.
      probe = float(getattr(policy, "probe_flops", 0.0))
      curve.append((step + 1, dict(counts), probe, float(evaluate(tree))))
      tic = time.perf_counter()
  jax.block_until_ready(tree)
  wall += time.perf_counter() - tic
  flops, peak = {}, 0
  for name, variant in members.items():
    if method.runtime is not None:  # Charged full minus what it skipped.
      extra = (method.flags(variant),)
      _, p = variants.cost(methods_lib.RUNTIME, tree, opt_state, batches[0], *extra)
      f = method.runtime.step(variant)
    else:
      f, p = variants.cost(variant, tree, opt_state, batches[0])
    flops[name], peak = f, max(peak, p)
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
    "compilations": compilations,
    "peak_bytes": int(peak),
    "wall_s": wall,
    "history": history,
  }
  if curve:
    record["curve"] = {
      "step": [c[0] for c in curve],
      "train_flops": [
        float(sum(flops[v] * n for v, n in c[1].items())) + c[2] for c in curve
      ],
      "value": [c[3] for c in curve],
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
