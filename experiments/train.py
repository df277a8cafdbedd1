"""One fine-tuning run: jitted steps, XLA cost accounting, logging, resume."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import rgft_jax
from experiments import methods as methods_lib
from rgft_jax._sparse import StepVariants
from rgft_jax._sparse import hold_masked
from rgft_jax.tensorboard import ErrorMapWriter


def loss_and_accuracy(model: nn.Module, model_params, batch):
  logits = model.apply({"params": model_params}, batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = jnp.argmax(logits, -1) == batch["label"]
  return loss.mean(), correct.mean()


def make_step(model: nn.Module, method: methods_lib.Method, variant: frozenset[str]):
  """`step(params, opt_state, batch) -> (params, opt_state, metrics)` of a variant.

  Budgeted RGFT (`method.detaches`): `variant` names the components whose
  output is detached (`rgft_jax.train_step`). Otherwise only
  `method.trainable - variant` is differentiated: the other parameters are
  closed over, so XLA prunes their gradient work; their updates are zero and,
  for paths in `variant` (LISA's sampled-out blocks), their optimizer state is
  kept as it was, so a block resumes where it left off.
  """
  loss_fn = functools.partial(loss_and_accuracy, model)
  if method.detaches:
    sparse = rgft_jax.train_step(
      method.tracker,
      method.tx,
      loss_fn,
      method.components,
      has_aux=True,
      exact=method.exact,
    )

    def step(params, opt_state, batch):
      (loss, acc), params, new_state = sparse(
        params, opt_state, batch, detached=variant
      )
      return params, new_state, _metrics(method, loss, acc, new_state)

    return step

  train = method.trainable - variant

  def step(params, opt_state, batch):
    leaves = methods_lib.flat(params)
    fixed = {p: v for p, v in leaves.items() if p not in train}

    def partial_loss(trained, batch):
      tree = methods_lib.unflat({**fixed, **trained})
      return loss_and_accuracy(model, method.to_model(tree), batch)

    trained = {p: v for p, v in leaves.items() if p in train}
    extra = {}
    if method.tracker is not None:
      (loss, acc), grads, error_map = method.tracker.value_and_grad(
        loss_fn, has_aux=True
      )(params, batch)
      extra["error_map"] = error_map
    else:
      (loss, acc), g = jax.value_and_grad(partial_loss, has_aux=True)(trained, batch)
      grads = methods_lib.unflat(
        {p: g[p] if p in g else jnp.zeros_like(v) for p, v in leaves.items()}
      )
    updates, new_state = method.tx.update(grads, opt_state, params, **extra)
    if variant:
      keep = methods_lib.unflat({p: p in variant for p in leaves})
      updates, new_state = hold_masked(method.tx, keep, updates, new_state, opt_state)
    params = optax.apply_updates(params, updates)
    return params, new_state, _metrics(method, loss, acc, new_state)

  return step


def _metrics(method, loss, acc, opt_state) -> dict[str, Any]:
  metrics = {"loss": loss, "accuracy": acc}
  if method.tracker is not None:
    metrics["error_map"] = optax.tree.get(opt_state, "error_map")  # The EMA.
    metrics["alpha"] = optax.tree.get(opt_state, "alpha")
  return metrics


def variants_of(model: nn.Module, method: methods_lib.Method) -> StepVariants:
  """The compiled steps of `method`, one per variant (seeds may share them)."""
  return StepVariants(lambda v: make_step(model, method, v), max_variants=32)


def measure_costs(
  model: nn.Module, params: Any, example: jax.Array, hyper, batch
) -> methods_lib.Costs:
  """Per-step FLOPs that size the budgeted methods, from compiled steps."""

  def step_flops(name):
    method = methods_lib.make(name, model, params, example, hyper, jax.random.key(0))
    state = method.tx.init(method.params)
    variant = method.policy.variant(0, state)
    return variants_of(model, method).cost(variant, method.params, state, batch)[0]

  # The budgeted methods' step without its metrics (the study's results were
  # sized by this; the metrics change a step's count by about 1e-6).
  rgft = methods_lib.make(
    "rgft_blocks", model, params, example, hyper, jax.random.key(0)
  )
  sparse = rgft_jax.train_step(
    rgft.tracker,
    rgft.tx,
    functools.partial(loss_and_accuracy, model),
    rgft.components,
    has_aux=True,
  )
  detach = rgft_jax.detach_costs(
    sparse,
    rgft.components.names,
    params,
    rgft.tx.init(params),
    batch,
    compiled=True,
  )
  return methods_lib.Costs(detach, step_flops("full"), step_flops("lisa"))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _correct(model, to_model, params, batch):
  logits = model.apply({"params": to_model(params)}, batch["image"])
  return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"])


def accuracy(model: nn.Module, params, batches, to_model=methods_lib.identity) -> float:
  """Accuracy over padded, masked `batches` of `to_model(params)`."""
  hits, total = 0.0, 0.0
  for batch in batches:
    hits += float(_correct(model, to_model, params, batch))
    total += float(np.sum(batch["mask"]))
  return hits / total


def evaluate(model, method, params, batches) -> float:
  """Accuracy of `method`'s parameters (LoRA's merged) over `batches`."""
  return accuracy(model, params, batches, method.to_model)


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
  variants: StepVariants | None = None,
  val_batches: Callable[[], Any] | None = None,
  eval_every: int = 0,
  config: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Any]:
  """Fine-tunes for `steps` steps, resuming from `workdir`'s checkpoint if any.

  `train_batches[step]` is the batch of a step (so a resumed run sees the same
  data). `method.steps`, when set, replaces `steps` (equal-FLOPs baselines).
  `variants` holds the compiled step variants (`variants_of`); runs that
  differ only in seed and parameter values can share it. With `val_batches`
  and `eval_every`, held-out accuracy is logged every `eval_every` steps next
  to the FLOPs spent so far. `config` (the settings that change the result)
  is part of the checkpoint's signature. Returns the run's record (accuracy,
  counted FLOPs, peak bytes, wall time without compilation, update ratio, the
  logged trajectories) and the final parameters.
  """
  steps = method.steps or steps
  params = jax.tree.map(jnp.copy, method.params)
  opt_state = method.tx.init(params)
  history = {"step": [], "loss": [], "accuracy": [], "error_map": [], "alpha": []}
  history.update(val_step=[], val_accuracy=[], val_flops=[])
  counts: dict[str, int] = {}  # Steps run per step variant, by variant name.
  names: dict[str, list[str]] = {}  # Its set (paths or components), by name.
  start, wall, compilations = 0, 0.0, 0
  ckpt_dir = os.path.abspath(os.path.join(workdir, "ckpt"))
  signature = _signature(method, (params, opt_state), config)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (params, opt_state))
  found = _restore(ckpt_dir, abstract, signature)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=ckpt_every)
  mngr = ocp.CheckpointManager(ckpt_dir, options=options, item_names=("state", "log"))
  if found is not None:
    (params, opt_state), log = found
    history, counts, names = log["history"], log["counts"], log["variants"]
    start, wall, compilations = log["step"], log["wall"], log["compilations"]
    if start > steps:
      raise ValueError(
        f"The checkpoint in {mngr.directory} is at step {start}, past this run's "
        f"{steps} steps; it is left as it is."
      )
    method.policy.load_state_dict(log["policy"])
  else:
    method.policy.reset()

  if variants is None:
    variants = variants_of(model, method)
  by_block = isinstance(method.policy, methods_lib.LisaPolicy)

  def flops_so_far():
    return sum(
      variants.cost(frozenset(names[v]), params, opt_state, train_batches[0])[0] * n
      for v, n in counts.items()
    )

  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, desc=method.name, leave=False)
  tic = time.perf_counter()
  for step in range(start, steps):
    batch = train_batches[step]
    variant = method.policy.variant(step, opt_state)
    if not variants.has(variant, params, opt_state, batch):
      jax.block_until_ready(params)
      wall += time.perf_counter() - tic  # Compilation is reported, not timed.
      variants.compiled(variant, params, opt_state, batch)
      compilations += 1
      tic = time.perf_counter()
    name = _variant_name(variant, by_block=by_block)
    counts[name] = counts.get(name, 0) + 1
    if name not in names:
      names[name] = sorted(variant)
    params, opt_state, metrics = variants(variant, params, opt_state, batch)
    method.policy.spend(step, variant)
    logging = (step + 1) % log_every == 0 or step + 1 == steps
    evaluating = val_batches is not None and eval_every > 0
    evaluating = evaluating and ((step + 1) % eval_every == 0 or step + 1 == steps)
    if logging or evaluating:
      jax.block_until_ready(params)
      wall += time.perf_counter() - tic  # Logging and evaluation are not timed.
    if logging:
      metrics = jax.device_get(metrics)
      history["step"].append(step + 1)
      history["loss"].append(float(metrics["loss"]))
      history["accuracy"].append(float(metrics["accuracy"]))
      alpha = metrics.get("alpha")
      if alpha is not None:
        history["error_map"].append(np.asarray(metrics["error_map"]).tolist())
        history["alpha"].append(np.asarray(alpha).tolist())
      history.setdefault("update_ratio", []).append(
        update_ratio(method, variant, alpha)
      )
      if writer is not None:
        _log(writer, method, step + 1, metrics, opt_state)
    if evaluating:
      history["val_step"].append(step + 1)
      history["val_accuracy"].append(evaluate(model, method, params, val_batches()))
      history["val_flops"].append(flops_so_far())
    if logging or evaluating:
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
              "variants": names,
              "step": step + 1,
              "wall": wall,
              "compilations": compilations,
              "policy": method.policy.state_dict(),
              "signature": signature,
              "checksum": checksum((params, opt_state)),
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

  # Cost of every variant that ran (compiled again if this process resumed).
  flops, peak = {}, 0
  for name, members in names.items():
    f, p = variants.cost(frozenset(members), params, opt_state, train_batches[0])
    flops[name] = f
    peak = max(peak, p)
  accuracy = evaluate(model, method, params, eval_batches())
  record = {
    "method": method.name,
    "seed": seed,
    "steps": steps,
    "test_accuracy": accuracy,
    "train_flops": float(sum(flops[v] * n for v, n in counts.items())),
    "step_flops": flops,
    "steps_per_variant": counts,
    "step_variants": len(flops),
    "compilations": compilations,
    "peak_bytes": peak,
    "wall_s": wall,
    "update_ratio": float(np.mean(history["update_ratio"])),
    "trainable_params": methods_lib.count(method.params, method.trainable),
    "model_params": methods_lib.count(method.to_model(method.params)),
    "components": list(method.components.names) if method.components else [],
    "history": history,
  }
  if isinstance(method.policy, methods_lib.BudgetPolicy):
    budget = method.policy.budget
    record["budget"] = {
      "target": budget.budget,
      "planned_fraction": budget.fraction,
      "decisions": budget.decisions,
    }
  return record, params


def checksum(tree: Any) -> str:
  """SHA-256 of the arrays of `tree` (dtypes, shapes and bytes, in leaf order)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _restore(ckpt_dir: str, abstract: Any, signature: dict[str, Any]):
  """`(state, log)` of the newest whole checkpoint in `ckpt_dir`, or None if none.

  A checkpoint is whole when its log and arrays restore and the arrays match
  the SHA-256 saved with them. Damaged checkpoints newer than the one used are
  moved to `ckpt_corrupt/<step>` beside `ckpt_dir` (never trained on, never
  overwritten), with a warning. When checkpoints exist but none is whole,
  ValueError names each one and what is wrong, and nothing is moved. A
  checkpoint written by another setup is refused (`_check_signature`).
  """
  if not os.path.isdir(ckpt_dir):
    return None
  with ocp.CheckpointManager(ckpt_dir, item_names=("state", "log")) as mngr:
    damaged = []
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        log = mngr.restore(
          step, args=ocp.args.Composite(log=ocp.args.JsonRestore())
        ).log
      except Exception as e:  # Any failure means a damaged file.
        damaged.append((step, f"its log does not restore ({type(e).__name__})"))
        continue
      _check_signature(log.get("signature"), signature, ckpt_dir)
      try:
        state = mngr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        ).state
      except Exception as e:
        damaged.append((step, f"its arrays do not restore ({type(e).__name__})"))
        continue
      if log.get("checksum") != checksum(state):
        damaged.append((step, "its arrays differ from the checksum saved with them"))
        continue
      break
    else:
      if damaged:
        raise ValueError(
          f"No whole checkpoint in {ckpt_dir}; left as it is: "
          + "; ".join(f"step {t}: {why}" for t, why in damaged)
        )
      return None
  for bad, why in damaged:
    aside = os.path.join(os.path.dirname(ckpt_dir), "ckpt_corrupt", str(bad))
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.replace(os.path.join(ckpt_dir, str(bad)), aside)
    warnings.warn(
      f"The checkpoint at step {bad} in {ckpt_dir} is damaged ({why}); moved to "
      f"{aside}, resuming from step {step}.",
      RuntimeWarning,
      stacklevel=3,
    )
  return state, log


def _signature(
  method: methods_lib.Method, state: Any, config: dict[str, Any] | None
) -> dict[str, Any]:
  """What a checkpoint must match to be resumed: method, settings, state layout."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {
    "method": method.name,
    "config": config or {},
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
    if saved.get(key) != current[key]:
      problems.append(f"{key}: checkpoint {saved.get(key)}, this run {current[key]}")
  if saved.get("config") != current["config"]:
    old, new = saved.get("config") or {}, current["config"]
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    problems.append(
      "settings: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
    )
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
  """`all` when nothing is left out, else the frozen blocks (LISA) or detached components."""
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


@contextlib.contextmanager
def lock(workdir: str):
  """Holds `workdir/.lock` while a study runs there; a second one is refused.

  Raises ValueError when another process holds it (its pid is in the file) or
  the directory cannot be written.
  """
  path = os.path.join(workdir, ".lock")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"Cannot write to --workdir {workdir}: {e}.") from None
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    with open(path) as f:
      pid = f.read().strip()
    alive = pid.isdigit() and _alive(int(pid))
    if alive:
      raise ValueError(
        f"Another study (pid {pid}) is running in {workdir}; wait for it or use "
        "another --workdir."
      ) from None
    os.remove(path)  # Left by a process that is gone.
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except OSError as e:
    raise ValueError(f"Cannot write to --workdir {workdir}: {e}.") from None
  try:
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    yield
  finally:
    os.remove(path)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def load_json(path: str) -> Any:
  """The JSON in `path`; a malformed file is an error that names it."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}); it is left as it is. Remove it to redo "
      "what it recorded."
    ) from None
