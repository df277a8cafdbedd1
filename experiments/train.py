"""One fine-tuning run: jitted steps, XLA cost accounting, logging, resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments import methods as methods_lib
from rgft_jax._sparse import hold_masked
from rgft_jax.tensorboard import ErrorMapWriter


@dataclasses.dataclass
class Compiled:
  fn: Callable[..., Any]
  flops: float
  peak_bytes: int


def cost(compiled) -> tuple[float, int]:
  """(FLOPs, peak bytes) of a compiled computation, as XLA counts them."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0]
  mem = compiled.memory_analysis()
  peak = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
  )
  return float(analysis.get("flops", 0.0)), int(peak)


def loss_and_accuracy(model: nn.Module, model_params, batch):
  logits = model.apply({"params": model_params}, batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = jnp.argmax(logits, -1) == batch["label"]
  return loss.mean(), correct.mean()


def make_step(model: nn.Module, method: methods_lib.Method, frozen: frozenset[str]):
  """The train step with `method.trainable - frozen` differentiated.

  Parameters outside that set are closed over, not differentiated, so XLA
  prunes their gradient work. Their updates are zero and, for paths in
  `frozen` (LISA's sampled-out blocks), their optimizer state is kept as it
  was, so a block resumes where it left off. For sparse RGFT, `frozen` is the
  freezer's set of component names.
  """
  if method.freezer is not None:  # Sparse RGFT: `frozen` names components.
    sparse_step = method.freezer.train_step(
      method.tracker, method.tx, functools.partial(loss_and_accuracy, model), True
    )

    def step(params, opt_state, batch):
      (loss, acc), params, new_state, alpha = sparse_step(
        params, opt_state, batch, frozen=frozen
      )
      metrics = {
        "loss": loss,
        "accuracy": acc,
        "error_map": optax.tree.get(new_state, "error_map"),
        "alpha": alpha,
      }
      return params, new_state, metrics

    return step

  train = method.trainable - frozen

  def step(params, opt_state, batch):
    leaves = methods_lib.flat(params)
    fixed = {p: v for p, v in leaves.items() if p not in train}

    def loss_fn(trained, batch):
      tree = methods_lib.unflat({**fixed, **trained})
      return loss_and_accuracy(model, method.to_model(tree), batch)

    trained = {p: v for p, v in leaves.items() if p in train}
    extra = {}
    if method.tracker is not None:
      (loss, acc), grads, error_map = method.tracker.value_and_grad(
        functools.partial(loss_and_accuracy, model), has_aux=True
      )(params, batch)
      extra["error_map"] = error_map
    else:
      (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(trained, batch)
      grads = methods_lib.unflat(
        {p: g[p] if p in g else jnp.zeros_like(v) for p, v in leaves.items()}
      )
    updates, new_state = method.tx.update(grads, opt_state, params, **extra)
    if frozen:
      keep = methods_lib.unflat({p: p in frozen for p in leaves})
      updates, new_state = hold_masked(method.tx, keep, updates, new_state, opt_state)
    metrics = {"loss": loss, "accuracy": acc}
    if method.tracker is not None:
      metrics["error_map"] = optax.tree.get(new_state, "error_map")  # The EMA.
      metrics["alpha"] = optax.tree.get(new_state, "alpha")
    return optax.apply_updates(params, updates), new_state, metrics

  return step


def compile_step(model, method, frozen, params, opt_state, batch) -> Compiled:
  fn = jax.jit(make_step(model, method, frozen), donate_argnums=(0, 1))
  compiled = fn.lower(params, opt_state, batch).compile()
  flops, peak = cost(compiled)
  return Compiled(compiled, flops, peak)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _correct(model, to_model, params, batch):
  logits = model.apply({"params": to_model(params)}, batch["image"])
  return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"])


def evaluate(model, method, params, batches) -> float:
  hits, total = 0.0, 0.0
  for batch in batches:
    hits += float(_correct(model, method.to_model, params, batch))
    total += float(np.sum(batch["mask"]))
  return hits / total


def update_ratio(method: methods_lib.Method, frozen: frozenset[str], alpha) -> float:
  """Fraction of the model's parameters a step moves, alpha-weighted for RGFT.

  Frozen parameters (LISA's, sparse RGFT's) count as not moved.
  Counted on the model's parameters: LoRA's update of an adapted kernel counts
  as its factors' size, the way LoRA is usually compared.
  """
  total = methods_lib.count(method.to_model(method.params))
  if method.components is not None:
    sizes = method.components.sizes(method.params)
    alpha = np.where([n in frozen for n in method.components.names], 0.0, alpha)
    return float((np.sum(alpha * sizes) + (total - sizes.sum())) / total)
  return methods_lib.count(method.params, method.trainable - frozen) / total


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
  compiled: dict | None = None,
) -> tuple[dict[str, Any], Any]:
  """Fine-tunes for `steps` steps, resuming from `workdir`'s checkpoint if any.

  `train_batches[step]` is the batch of a step (so a resumed run sees the same
  data). `compiled` caches the compiled step variants; runs that differ only
  in seed and parameter values can share one. Returns the run's record
  (accuracy, counted FLOPs, peak bytes, wall time without compilation, update
  ratio, the logged trajectories) and the final parameters.
  """
  params = jax.tree.map(jnp.copy, method.params)  # The step donates its inputs.
  opt_state = method.tx.init(params)
  history = {"step": [], "loss": [], "accuracy": [], "error_map": [], "alpha": []}
  counts: dict[str, int] = {}  # Steps run per step variant, by variant name.
  variants: dict[str, list[str]] = {}  # Its frozen set, by variant name.
  start, wall, compilations = 0, 0.0, 0
  options = ocp.CheckpointManagerOptions(max_to_keep=1, save_interval_steps=ckpt_every)
  mngr = ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "ckpt")),
    options=options,
    item_names=("state", "log"),
  )
  signature = _signature(method, (params, opt_state))
  if mngr.latest_step() is not None:
    last = mngr.latest_step()
    log = mngr.restore(last, args=ocp.args.Composite(log=ocp.args.JsonRestore())).log
    _check_signature(log.get("signature"), signature, mngr.directory)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (params, opt_state))
    restored = mngr.restore(
      last, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
    params, opt_state = restored.state
    history, counts, variants = log["history"], log["counts"], log["variants"]
    start, wall, compilations = log["step"], log["wall"], log["compilations"]
    if method.freezer is not None:
      method.freezer.load_state_dict(log["freezer"])
  elif method.freezer is not None:
    method.freezer.reset()

  if compiled is None:
    compiled = {}
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, desc=method.name, leave=False)
  tic = time.perf_counter()
  for step in range(start, steps):
    batch = train_batches[step]
    if method.freezer is not None:
      frozen = method.freezer.variant(step)
    else:
      frozen = method.frozen_paths(step, seed)
    if frozen not in compiled:
      jax.block_until_ready(params)
      wall += time.perf_counter() - tic  # Compilation is reported, not timed.
      compiled[frozen] = compile_step(model, method, frozen, params, opt_state, batch)
      compilations += 1
      tic = time.perf_counter()
    variant = _variant_name(frozen, by_block=method.lisa is not None)
    counts[variant] = counts.get(variant, 0) + 1
    variants[variant] = sorted(frozen)
    params, opt_state, metrics = compiled[frozen].fn(params, opt_state, batch)
    if method.freezer is not None:
      method.freezer.observe(jax.device_get(metrics["alpha"]), frozen)
    if (step + 1) % log_every == 0 or step + 1 == steps:
      metrics = jax.device_get(metrics)
      wall += time.perf_counter() - tic
      history["step"].append(step + 1)
      history["loss"].append(float(metrics["loss"]))
      history["accuracy"].append(float(metrics["accuracy"]))
      alpha = metrics.get("alpha")
      if alpha is not None:
        history["error_map"].append(np.asarray(metrics["error_map"]).tolist())
        history["alpha"].append(np.asarray(alpha).tolist())
      history.setdefault("update_ratio", []).append(update_ratio(method, frozen, alpha))
      if writer is not None:
        _log(writer, method, step + 1, metrics, opt_state)
      tic = time.perf_counter()
    if (step + 1) % ckpt_every == 0 or step + 1 == steps:
      jax.block_until_ready(params)
      mngr.save(
        step + 1,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave((params, opt_state)),
          log=ocp.args.JsonSave(
            {
              "history": history,
              "counts": counts,
              "variants": variants,
              "step": step + 1,
              "wall": wall,
              "compilations": compilations,
              "freezer": method.freezer.state_dict() if method.freezer else None,
              "signature": signature,
            }
          ),
        ),
      )
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  mngr.wait_until_finished()
  mngr.close()

  # Cost of every variant that ran, compiled again if this process resumed.
  flops = {}
  peak = 0
  batch = train_batches[0]
  for variant, names in variants.items():
    frozen = frozenset(names)
    if frozen not in compiled:
      compiled[frozen] = compile_step(model, method, frozen, params, opt_state, batch)
    flops[variant] = compiled[frozen].flops
    peak = max(peak, compiled[frozen].peak_bytes)
  accuracy = evaluate(model, method, params, eval_batches())
  return {
    "method": method.name,
    "seed": seed,
    "test_accuracy": accuracy,
    "train_flops": float(sum(flops[v] * n for v, n in counts.items())),
    "step_flops": flops,
    "steps_per_variant": counts,
    "step_variants": len(flops),
    "compilations": compilations,
    "refresh_steps": (
      sum(method.freezer.is_refresh(t) for t in range(steps)) if method.freezer else 0
    ),
    "peak_bytes": peak,
    "wall_s": wall,
    "update_ratio": float(np.mean(history["update_ratio"])),
    "trainable_params": methods_lib.count(method.params, method.trainable),
    "model_params": methods_lib.count(method.to_model(method.params)),
    "components": list(method.components.names) if method.components else [],
    "history": history,
  }, params


def _signature(method: methods_lib.Method, state: Any) -> dict[str, Any]:
  """What a checkpoint must match to be resumed: method, components, state layout."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {
    "method": method.name,
    "components": list(method.components.names) if method.components else [],
    "state": [
      f"{jax.tree_util.keystr(p)}: {np.dtype(v.dtype).name}{list(np.shape(v))}"
      for p, v in leaves
    ],
  }


def _check_signature(saved: dict | None, current: dict, where) -> None:
  """Refuses to resume a checkpoint written by another method or optimizer."""
  if saved == current:
    return
  if saved is None:
    raise ValueError(f"The checkpoint in {where} has no signature; not resuming it.")
  problems = []
  for key in ("method", "components"):
    if saved[key] != current[key]:
      problems.append(f"{key}: checkpoint {saved[key]}, this run {current[key]}")
  if saved["state"] != current["state"]:
    only_saved = [e for e in saved["state"] if e not in current["state"]][:5]
    only_now = [e for e in current["state"] if e not in saved["state"]][:5]
    problems.append(
      f"optimizer state layout: checkpoint only {only_saved}, this run only {only_now}"
    )
  raise ValueError(
    f"The checkpoint in {where} was written by a different setup; it is left as "
    "it is. Use another workdir or remove it. " + "; ".join(problems)
  )


def _variant_name(frozen: frozenset[str], by_block: bool) -> str:
  """`all` when nothing is frozen, else the frozen blocks (LISA) or components."""
  if not frozen:
    return "all"
  if by_block:
    frozen = {p.split("/")[1] for p in frozen}
  return ",".join(sorted(n.replace("Transformer/", "") for n in frozen))


def _log(writer, method, step, metrics, opt_state):
  writer.add_scalar("train/loss", float(metrics["loss"]), step)
  writer.add_scalar("train/accuracy", float(metrics["accuracy"]), step)
  if method.components is not None:
    ErrorMapWriter(writer, method.components.names, every=1)(step, opt_state)


def save_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
