"""The ViT study's source tasks pretrained to a plateau, and the shipped result.

The fine-tuning study (`experiments.finetune`) starts from a ViT pretrained on
each embedded task's source task (label_shift: MNIST 0-4; input_shift: MNIST
0-9). By default it trains one itself for `--pretrain_steps` 400 steps; with
`--pretrained shipped` it loads the checkpoints this command writes into the
repository, pretrained until held-out accuracy stopped improving:

  python -m experiments.vit_plateau                       # both tasks
  python -m experiments.vit_plateau --tasks input_shift   # one

Training: Adam, a linear warmup then a constant rate (the run's length is set
by the stopping rule, not known in advance, so a schedule tied to a fixed
length, such as a cosine, would still be at a high rate when the plateau comes,
or be cut off before its decay; `--schedule cosine` decays to 0 at
`--max_steps` instead); random shifts of up to `--shift` pixels, zero-filled
(digits are not flipped). `--val_fraction` of the source training split
(stratified, fixed seed) is held out and evaluated every `--eval_every` steps;
the source test split is read once, at the end. The run stops at the first
evaluation where the best accuracy of the last `--window` steps' evaluations
is at most `--min_delta` above the best before them (`plateaued`), or at
`--max_steps`. It checkpoints in `--workdir` every `--ckpt_minutes` (orbax,
checksummed), and resumes exactly from there; a checkpoint of other settings
is refused, naming them.

It writes `checkpoints/vit_<task>_plateau.npz` (the best-validation float32
parameters, `/`-joined paths as in the published ViT checkpoints, looped
layout, head included) and a sidecar `.json` (its SHA-256, the command, the
wall time, the model, the validation curve, the source test accuracy, the
settings). `load_shipped` checks both before it returns the parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import pathlib
import shlex
import sys
import time
import types
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from experiments import checkpoint
from experiments import cli
from experiments import configs
from experiments import data as data_lib
from experiments import store
from experiments import vit as vit_lib
from experiments.train import accuracy
from experiments.vit import VisionTransformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED_DIR = ROOT / "checkpoints"
COMMAND = "python -m experiments.vit_plateau"
# Flags that do not change the result (where files go, how often they are saved).
_NOT_SETTINGS = ("tasks", "workdir", "out", "ckpt_minutes")
_SAY = functools.partial(print, flush=True)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # Fixed, so equal arrays give equal files.


@dataclasses.dataclass(frozen=True)
class PlateauConfig:
  """Every setting of the pretraining to a plateau, each a flag."""

  tasks: str = "label_shift,input_shift"  # Embedded tasks whose source to pretrain.
  size: str = "xs"  # ViT size (the study's default).
  patch: int = 7  # Patch size in pixels.
  image_size: int = 0  # 0: the data's own size (28).
  batch_size: int = 64  # Training batch size.
  learning_rate: float = 1e-3  # Adam's rate after warmup.
  warmup_steps: int = 200  # Linear warmup from 0.
  schedule: str = "constant"  # After warmup: "constant", or "cosine" to 0 at max_steps.
  shift: int = 2  # Random translation by up to this many pixels (0: none).
  val_fraction: float = 0.1  # Of the source training split, held out.
  eval_every: int = 250  # Validation accuracy every this many steps.
  # Stop when the best validation accuracy of the last `window` steps is at
  # most `min_delta` above the best before them (`plateaued`).
  window: int = 5000  # Steps the plateau must last.
  min_delta: float = 0.006  # Smallest gain of validation accuracy that counts.
  max_steps: int = 20000  # Stop here at the latest.
  seed: int = 0  # Initialisation, data order and shifts.
  eval_batch_size: int = 500  # Batch size of evaluation.
  ckpt_minutes: float = 3.0  # Checkpoint at most this often (and at the end).
  workdir: str = "workdir/vit_plateau"  # Checkpoints of the runs.
  out: str = str(SHIPPED_DIR)  # Where the .npz and .json go.

  def task_names(self) -> list[str]:
    return [t for t in self.tasks.split(",") if t]

  def settings(self) -> dict[str, Any]:
    """The settings that change the result (a checkpoint's signature)."""
    out = dataclasses.asdict(self)
    return {k: v for k, v in out.items() if k not in _NOT_SETTINGS}

  def validate(self) -> None:
    """Raises ValueError naming the flag and its allowed range."""
    cli.check_integers(
      self,
      {
        "patch": 1,
        "image_size": 0,
        "batch_size": 1,
        "warmup_steps": 0,
        "shift": 0,
        "eval_every": 1,
        "window": 1,
        "max_steps": 1,
        "seed": 0,
        "eval_batch_size": 1,
      },
    )
    cli.check_rate("learning_rate", self.learning_rate)
    cli.check_rate("ckpt_minutes", self.ckpt_minutes)
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"--schedule must be constant or cosine, got {self.schedule!r}.")
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f"--val_fraction must be in (0, 1), got {self.val_fraction}.")
    if not 0.0 <= self.min_delta < 1.0:
      raise ValueError(f"--min_delta must be in [0, 1), got {self.min_delta}.")
    vit_lib.check_flags(self.size, self.patch, self.image_size)
    unknown = sorted(set(self.task_names()) - {"label_shift", "input_shift"})
    if unknown or not self.task_names():
      raise ValueError(
        f"--tasks must name label_shift and/or input_shift, got {self.tasks!r}."
      )


def plateaued(curve: list, window: int, min_delta: float) -> bool:
  """Whether validation accuracy stopped improving, at the curve's last point.

  `curve` holds `(step, accuracy)` pairs in step order; `t` is the last step.
  True when evaluations exist at steps `<= t - window` and the best accuracy at
  steps in `(t - window, t]` is at most `min_delta` above the best before them.
  """
  if not curve:
    return False
  last = curve[-1][0]
  before = [a for s, a in curve if s <= last - window]
  recent = [a for s, a in curve if s > last - window]
  return bool(before) and max(recent) <= max(before) + min_delta


def splits(cfg: PlateauConfig, source: data_lib.Task):
  """`(train, validation)`: the source training split, `val_fraction` held out."""
  return data_lib.split_validation(source.train, cfg.val_fraction)


def batches(cfg: PlateauConfig, train) -> Any:
  """The training batch of each step (`[step]`), shifted at random."""
  return data_lib.train_batches(
    train, cfg.batch_size, cfg.seed, image_size=cfg.image_size or None, shift=cfg.shift
  )


def _evaluate(cfg: PlateauConfig, model, params, source) -> float:
  return accuracy(
    model,
    params,
    data_lib.eval_batches(
      source, cfg.eval_batch_size, image_size=cfg.image_size or None
    ),
  )


def schedule(cfg: PlateauConfig) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant or a cosine to 0."""
  lr = cfg.learning_rate
  if cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  else:
    after = optax.cosine_decay_schedule(lr, max(1, cfg.max_steps - cfg.warmup_steps))
  if not cfg.warmup_steps:
    return after
  warm = optax.linear_schedule(0.0, lr, cfg.warmup_steps)
  return optax.join_schedules([warm, after], [cfg.warmup_steps])


def model_config(cfg, num_classes: int, example) -> dict[str, Any]:
  """What a shipped checkpoint must match: size, patch, input, classes, layout."""
  shape = np.shape(example)
  return {
    "size": cfg.size,
    "patch": cfg.patch,
    "image_size": int(shape[1]),
    "channels": int(shape[3]),
    "num_classes": int(num_classes),
    "layout": "looped",
  }


def _make_step(model, tx):
  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = model.apply({"params": p}, batch["image"])
      labels = batch["label"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(
  cfg: PlateauConfig,
  name: str,
  source: data_lib.Task,
  *,
  halt_at: int | None = None,
  say: Callable[[str], Any] = _SAY,
):
  """Pretrains on `source` until `plateaued` or `max_steps`, resuming if it can.

  Returns `(best parameters, log)`: the log holds the curve, the best step and
  accuracy, the steps run, the wall time (`elapsed_s`, all sessions, compiling
  and evaluating included) and why it stopped. With `halt_at`, it checkpoints
  at that step and returns None (a session cut short; the next one resumes).
  """
  train_split, val = splits(cfg, source)
  cli.check_batch(
    "batch_size", cfg.batch_size, len(train_split), f"the {name} source training split"
  )
  ds = batches(cfg, train_split)
  example = ds[0]["image"][:2]
  model = VisionTransformer(
    num_classes=source.num_classes, patch=cfg.patch, size=cfg.size
  )
  params = model.init(jax.random.key(cfg.seed), example)["params"]
  tx = optax.adam(schedule(cfg))
  state = {"params": params, "opt_state": tx.init(params), "best": params}
  run = types.SimpleNamespace(name="adam_to_plateau", components=None)
  sig = checkpoint.signature(run, state, cfg.settings(), seed=cfg.seed, task=name)
  ckpts = checkpoint.Checkpoints(os.path.join(cfg.workdir, name), sig, every=1)
  found = ckpts.resume(state)
  if found is None:
    log = {
      "step": 0,
      "curve": [],
      "best_step": 0,
      "best_accuracy": -1.0,
      "elapsed_s": 0.0,
      "stopped": None,
    }
  else:
    state, log = found
    say(f"{name}: resumed at step {log['step']} ({ckpts.dir})")
  params, opt_state, best = state["params"], state["opt_state"], state["best"]
  step_fn = _make_step(model, tx)
  start, saved_at = time.perf_counter(), time.perf_counter()
  elapsed = log["elapsed_s"]
  step = log["step"]
  while log["stopped"] is None:
    params, opt_state, loss = step_fn(params, opt_state, ds[step])
    step += 1
    if step % cfg.eval_every == 0 or step == cfg.max_steps:
      acc = _evaluate(cfg, model, params, val)
      log["curve"].append([step, acc])
      if acc > log["best_accuracy"]:
        best, log["best_step"], log["best_accuracy"] = params, step, acc
      if plateaued(log["curve"], cfg.window, cfg.min_delta):
        log["stopped"] = "plateau"
      elif step >= cfg.max_steps:
        log["stopped"] = "max_steps"
      now = elapsed + time.perf_counter() - start
      say(
        f"{name}: step {step} loss {float(loss):.4f} val {acc:.4f} "
        f"(best {log['best_accuracy']:.4f} at {log['best_step']}) {now:.0f} s"
      )
    halting = step == halt_at
    due = time.perf_counter() - saved_at >= 60 * cfg.ckpt_minutes
    if log["stopped"] or halting or due:
      log["step"] = step
      log["elapsed_s"] = elapsed + time.perf_counter() - start
      state = {"params": params, "opt_state": opt_state, "best": best}
      ckpts.save(step, state, log)
      saved_at = time.perf_counter()
    if halting and not log["stopped"]:
      ckpts.close()
      return None
  ckpts.close()
  return best, log


def _npz_bytes(flat: dict[str, np.ndarray]) -> bytes:
  """An uncompressed `.npz` of `flat`, keys sorted and times fixed: the same
  arrays always give the same bytes."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
    for key in sorted(flat):
      array = io.BytesIO()
      np.lib.format.write_array(
        array, np.ascontiguousarray(flat[key]), allow_pickle=False
      )
      archive.writestr(zipfile.ZipInfo(f"{key}.npy", _ZIP_TIME), array.getvalue())
  return buffer.getvalue()


def sha256(path) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def paths(task: str, directory=SHIPPED_DIR) -> tuple[pathlib.Path, pathlib.Path]:
  """The shipped `.npz` of `task` and its sidecar `.json`."""
  npz = pathlib.Path(directory) / f"vit_{task}_plateau.npz"
  return npz, npz.with_suffix(".json")


def export(
  cfg: PlateauConfig, name: str, source: data_lib.Task, params, log, command: str
) -> dict[str, Any]:
  """Writes the best parameters and their sidecar into `cfg.out`; the sidecar."""
  example = batches(cfg, splits(cfg, source)[0])[0]["image"][:2]
  model = VisionTransformer(
    num_classes=source.num_classes, patch=cfg.patch, size=cfg.size
  )
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  npz, sidecar = paths(name, cfg.out)
  os.makedirs(npz.parent, exist_ok=True)
  raw = _npz_bytes(flat)
  with checkpoint.writing("the shipped checkpoint", str(npz)):
    npz.write_bytes(raw)
  record = {
    "sha256": hashlib.sha256(raw).hexdigest(),
    "command": command,
    "wall_time_s": round(log["elapsed_s"], 1),
    "model": model_config(cfg, source.num_classes, example),
    "dtype": "float32",
    "params": int(sum(v.size for v in flat.values())),
    "source_task": source.name,
    "train_examples": len(splits(cfg, source)[0]),
    "val_examples": len(splits(cfg, source)[1]),
    "steps": log["step"],
    "stopped": log["stopped"],
    "best_step": log["best_step"],
    "best_val_accuracy": log["best_accuracy"],
    "source_test_accuracy": _evaluate(cfg, model, params, source.test),
    "val_curve": log["curve"],
    "settings": cfg.settings(),
    "platform": f"jax {jax.__version__}, {jax.devices()[0].platform}",
  }
  store.save_json(str(sidecar), record)
  return record


def recorded_sha256(task: str, directory=SHIPPED_DIR) -> str:
  """The SHA-256 the sidecar of `task`'s shipped checkpoint records."""
  sidecar = paths(task, directory)[1]
  if not sidecar.exists():
    raise ValueError(
      f"No shipped checkpoint for {task}: {sidecar} is missing. Build it with "
      f"`{COMMAND} --tasks {task}`, or use --pretrained train."
    )
  return store.load_json(str(sidecar))["sha256"]


def check_model(task: str, cfg, directory=SHIPPED_DIR) -> None:
  """Raises ValueError, before any compute, when `cfg`'s ViT (`--size`,
  `--patch`, `--image_size`) is not the one `task`'s shipped checkpoint holds,
  or there is none."""
  recorded_sha256(task, directory)  # Raises when there is none.
  saved = store.load_json(str(paths(task, directory)[1])).get("model") or {}
  asked = {"size": cfg.size, "patch": cfg.patch}
  if cfg.image_size:
    asked["image_size"] = cfg.image_size
  diff = [
    f"--{k} {v!r} (it has {saved.get(k)!r})"
    for k, v in asked.items()
    if saved.get(k) != v
  ]
  if diff:
    raise ValueError(
      f"The shipped {task} checkpoint is for another ViT: {', '.join(diff)}. "
      "Use its settings, or --pretrained train to pretrain this one."
    )


def load_shipped(task: str, model: dict[str, Any], directory=SHIPPED_DIR):
  """`(params, sidecar)` of `task`'s shipped checkpoint, for the model `model`
  (a `model_config`), after checking the file against its sidecar.

  Raises:
    ValueError: if the sidecar is missing or is for another model (naming
      what differs), or the file's SHA-256 is not the one recorded (naming the
      file and both hashes).
  """
  npz, sidecar = paths(task, directory)
  recorded_sha256(task, directory)  # Raises when there is none.
  record = store.load_json(str(sidecar))
  if record.get("model") != model:
    saved = record.get("model") or {}
    diff = ", ".join(
      f"{k} {saved.get(k)!r} (requested {model.get(k)!r})"
      for k in sorted(saved.keys() | model.keys())
      if saved.get(k) != model.get(k)
    )
    raise ValueError(
      f"{npz} is for another model than the one requested: {diff} (its sidecar "
      f"{sidecar}). Use the study's model (--size, --patch, --image_size), or "
      "--pretrained train."
    )
  actual = sha256(npz)
  if actual != record["sha256"]:
    raise ValueError(
      f"{npz} is not the file its sidecar {sidecar} records: SHA-256 {actual} on "
      f"disk, {record['sha256']} recorded. It is damaged or was replaced; restore "
      f"it (git checkout) or rebuild it with `{record.get('command', COMMAND)}`."
    )
  with np.load(npz, allow_pickle=False) as archive:
    flat = {k: archive[k] for k in archive.files}
  vit = VisionTransformer(
    num_classes=model["num_classes"], patch=model["patch"], size=model["size"]
  )
  image = jnp.zeros((1, model["image_size"], model["image_size"], model["channels"]))
  abstract = jax.eval_shape(vit.init, jax.random.key(0), image)["params"]
  want = {
    k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()
  }
  if {k: v.shape for k, v in flat.items()} != want:
    raise ValueError(f"{npz} does not hold the arrays of the model {model}.")
  params = {k: jnp.asarray(v) for k, v in flat.items()}
  return traverse_util.unflatten_dict(params, sep="/"), record


def get_config(arg: str = "") -> PlateauConfig:
  """The pretraining's settings: `""` its defaults, `"quick"` a smoke run's (a
  tiny ViT for 10 steps on one task, written under its work directory, not
  over the shipped checkpoints)."""
  configs.check_arg(arg)
  if arg == "quick":
    return PlateauConfig(
      tasks="label_shift",
      size="mu",
      patch=4,
      batch_size=8,
      warmup_steps=2,
      shift=1,
      val_fraction=0.25,
      eval_every=2,
      window=4,
      min_delta=0.0,
      max_steps=10,
      eval_batch_size=16,
      ckpt_minutes=60.0,
      workdir="workdir/vit_plateau_quick",
      out="workdir/vit_plateau_quick/checkpoints",
    )
  return PlateauConfig()


def parse(argv: list[str]) -> PlateauConfig:
  """The config of command-line flags (`cli.parse`: `--config`, then one flag
  per field, with its --help)."""
  return cli.parse(get_config, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = sys.argv[1:] if argv is None else argv
  cfg = parse(argv)
  cfg = dataclasses.replace(cfg, workdir=os.path.expanduser(cfg.workdir))
  cfg.validate()
  command = " ".join([COMMAND, *map(shlex.quote, argv)])
  available = data_lib.embedded_tasks()
  out = {}
  with store.lock(cfg.workdir):
    for name in cfg.task_names():
      source = available[name][0]
      params, log = train(cfg, name, source)
      out[name] = export(cfg, name, source, params, log, command)
      print(
        f"{name}: {log['stopped']} at step {log['step']}, best validation "
        f"{log['best_accuracy']:.4f} at step {log['best_step']}, source test "
        f"{out[name]['source_test_accuracy']:.4f}, {log['elapsed_s']:.0f} s; "
        f"wrote {paths(name, cfg.out)[0]}",
        flush=True,
      )
  return out


if __name__ == "__main__":
  main()
