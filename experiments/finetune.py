"""ViT fine-tuning study: RGFT against the usual methods, side by side.

The default runs the two embedded transfer tasks (data shipped in pip
packages, no download) on a small ViT pretrained on each task's source to a
plateau (the checkpoints shipped in `checkpoints/`), with 5 seeds: full
fine-tuning, soft RGFT, budgeted RGFT at budget 0.5, the same budget spent uniformly at random,
and full fine-tuning and LISA given the same FLOPs, every method at one
learning rate. `--lr_grid` picks each method's rate from one shared grid on a
validation split instead (on `--tune_seeds` seeds of its own), then the seeds
run at the chosen rate and are scored on the test split. `--methods` adds the
controls (a random error map; random and magnitude masks of the same size)
and bottleneck adapters:

  python -m experiments.finetune                 # the default
  python -m experiments.finetune --methods all   # every method at every budget
  python -m experiments.finetune --methods fair --lr_grid=3e-4,1e-3,3e-3,1e-2
  python -m experiments.finetune --methods peers --lr_grid=1e-3,3e-3,1e-2 \
      --tune_seeds 2 --tune_budget 0.5   # against DropBP, GreenTrainer, controls

and writes `results.json`, `results.md`, plots and TensorBoard logs under
`--workdir`. `experiments.vit_plateau` rebuilds the shipped source models;
`--pretrained train` pretrains them here instead for 400 steps, as the
committed results before the peers study did (cached in the workdir). Every run
(tuning runs too) keeps an orbax checkpoint and its result, so an interrupted
study resumes where it stopped. The real study, on a machine with the data
prepared (see README):

  python -m experiments.finetune --dataset cifar10 --init ViT-B_16.npz \
      --size B --patch 16 --image_size 224 --batch_size 128 --steps 2000
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import accounting
from experiments import checkpoint
from experiments import cli
from experiments import compare
from experiments import configs
from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import store
from experiments import train as train_lib
from experiments import vit as vit_lib
from experiments import vit_plateau
from experiments.budgets import Costs
from experiments.report import markdown
from experiments.report import plots
from experiments.report import summarize
from experiments.vit import SIZES
from experiments.vit import VisionTransformer
from experiments.vit import load_npz
from experiments.vit import scan_params

# What the default study runs; `--methods all` runs every method at every budget.
DEFAULT_METHODS = (
  "full",
  "rgft_blocks",
  "rgft_budget@0.5",
  "uniform_budget@0.5",
  "full@0.5",
  "lisa@0.5",
)
# `--methods fair`: every baseline and control next to the default's methods.
FAIR_METHODS = (
  *DEFAULT_METHODS[:2],
  "rgft_random",
  "random_sparse",
  "magnitude_sparse",
  "adapters",
  *DEFAULT_METHODS[2:],
)
# `--methods peers`: budgeted RGFT beside its peers (DropBP, GreenTrainer),
# the controls and the equal-FLOPs baselines at each budget.
PEER_METHODS = compare.peer_methods(("lisa", "full"))
# Tuning runs use seeds TUNE_SEED, TUNE_SEED + 1, ...: never a reported seed.
TUNE_SEED = 1000
# Settings that change no run's result: which runs a command makes, where they
# are kept, and how they report.
NOT_IN_SIGNATURE = (
  "tasks",
  "methods",
  "seeds",
  "lr_grid",
  "tune_seeds",
  "tune_budget",
  "workdir",
  "data_dir",
  "ckpt_every",
  "progress",
)


@dataclasses.dataclass(frozen=True)
class Config(methods_lib.Hyper, configs.RunConfig):
  """Every setting of the study: the methods' (`Hyper`), the shared run
  settings (`configs.RunConfig`) and its own, each a flag."""

  dataset: str = "embedded"  # "embedded", or a tfds name such as "cifar10".
  tasks: str = "label_shift,input_shift"  # Embedded tasks to run.
  methods: str = ",".join(DEFAULT_METHODS)  # Comma-separated, fair, peers or all.
  # Rates each method is tuned over on validation ("": --learning_rate only).
  lr_grid: str = ""  # e.g. "3e-4,1e-3,3e-3,1e-2"; empty: --learning_rate for all.
  tune_seeds: int = 1  # Seeds per tuning run (1000, 1001, ...; never reported).
  size: str = "xs"  # ViT size: mu, xs, Ti, S, B or L.
  patch: int = 7  # Patch size in pixels.
  # Blocks scanned over layers (big_vision's scan=True); budgeted RGFT then
  # detaches at run time (one compiled step). LISA needs the looped layout.
  scan: bool = False
  image_size: int = 0  # 0: the data's own size.
  batch_size: int = 64  # Fine-tuning batch size.
  # Source model of the embedded tasks: "shipped" loads the one pretrained to
  # a plateau, checkpoints/vit_<task>_plateau.npz (experiments.vit_plateau
  # rebuilds it), checked against its sidecar's SHA-256; "train" pretrains it
  # here for --pretrain_steps steps (cached in the workdir).
  pretrained: str = "shipped"
  pretrain_steps: int = 400  # Source-task pretraining steps (embedded tasks).
  pretrain_learning_rate: float = 1e-3  # Source-task pretraining: Adam's rate.
  pretrain_batch_size: int = 64  # Source-task pretraining: batch size.
  augment: bool = False  # Random crop and flip (tfds datasets).
  init: str = ""  # A vision_transformer .npz checkpoint (tfds datasets).
  data_dir: str = ""  # TFDS data directory (default: TFDS's own).
  workdir: str = "workdir/finetune"
  val_fraction: float = 0.1  # Of the target task's training data, held out.
  ckpt_every: int = 100  # Checkpoint every this many steps (two are kept).
  eval_batch_size: int = 250  # Batch size of evaluation.

  def method_names(self) -> list[str]:
    if self.methods == "all":
      names = list(methods_lib.METHODS)
    elif self.methods == "fair":
      names = list(FAIR_METHODS)
    elif self.methods == "peers":
      names = list(PEER_METHODS)
    else:
      names = [m for m in self.methods.split(",") if m]
    if not names:
      raise ValueError("--methods names no method.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"--methods repeats {repeated}.")
    for name in names:
      methods_lib.parse_name(name)  # Raises on an unknown name.
    return names

  def learning_rates(self) -> list[float]:
    """The tuning grid, ascending; `[learning_rate]` when `lr_grid` is empty."""
    if not self.lr_grid.strip():
      return [self.learning_rate]
    try:
      grid = [float(x) for x in self.lr_grid.split(",")]
    except ValueError:
      raise ValueError(
        f"--lr_grid must be comma-separated numbers, got {self.lr_grid!r}."
      ) from None
    if not all(np.isfinite(x) and x > 0 for x in grid):
      raise ValueError(f"--lr_grid must hold finite rates > 0, got {grid}.")
    if len(set(grid)) != len(grid):
      raise ValueError(f"--lr_grid repeats a rate: {grid}.")
    return sorted(grid)

  def validate(self) -> None:
    """Raises ValueError naming the flag and its allowed range, before any compute."""
    super().validate()
    configs.RunConfig.validate(self)
    at_least = {
      "tune_seeds": 1,
      "patch": 1,
      "image_size": 0,
      "batch_size": 1,
      "pretrain_steps": 1,
      "pretrain_batch_size": 1,
      "ckpt_every": 1,
      "eval_batch_size": 1,
    }
    cli.check_integers(self, at_least)
    cli.check_rate("pretrain_learning_rate", self.pretrain_learning_rate)
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f"--val_fraction must be in (0, 1), got {self.val_fraction}.")
    vit_lib.check_flags(self.size, self.patch, self.image_size)
    if self.pretrained not in ("train", "shipped"):
      raise ValueError(
        f"--pretrained must be train or shipped, got {self.pretrained!r}."
      )
    if self.pretrained == "shipped" and self.dataset == "embedded":
      for task in self.tasks.split(","):
        if task:  # Raises naming a missing checkpoint or another model.
          vit_plateau.check_model(task, self)
    self.learning_rates()
    budgeted = [
      n
      for n in self.method_names()
      if methods_lib.parse_name(n)[0] in methods_lib.BUDGETED_RGFT
    ]
    if budgeted and self.error_method not in methods_lib.BUDGET_ERROR_METHODS:
      raise ValueError(
        f"--error_method {self.error_method!r} cannot drive budgeted RGFT "
        f"({budgeted}); use one of {methods_lib.BUDGET_ERROR_METHODS}."
      )

  def run_settings(self) -> dict:
    """The settings that change a fine-tuning run's result (its signature):
    every field of `Config` but those in `NOT_IN_SIGNATURE`, and the shipped
    source models by their SHA-256."""
    out = {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(Config)
      if f.name not in NOT_IN_SIGNATURE
    }
    if self.pretrained == "shipped" and self.dataset == "embedded":  # By hash.
      out["pretrained"] = {
        t: vit_plateau.recorded_sha256(t) for t in self.tasks.split(",") if t
      }
    return out


def _image_size(cfg: Config) -> int | None:
  return cfg.image_size or None


def train_batches_of(cfg: Config, source, seed: int, batch_size: int | None = None):
  """The study's training batches of `source` (its image size and augmentation)."""
  return data_lib.train_batches(
    source,
    batch_size or cfg.batch_size,
    seed,
    image_size=_image_size(cfg),
    augment=cfg.augment,
  )


def eval_batches_of(cfg: Config, source):
  """A function giving the study's evaluation batches of `source`."""
  return lambda: data_lib.eval_batches(
    source, cfg.eval_batch_size, image_size=_image_size(cfg)
  )


def init_model(cfg: Config, classes: int, example: jax.Array, scan: bool | None = None):
  """The model (scanned with `--scan`, or as `scan` says) and fresh parameters."""
  scan = cfg.scan if scan is None else scan
  model = VisionTransformer(
    num_classes=classes, patch=cfg.patch, size=cfg.size, scan=scan
  )
  return model, model.init(jax.random.key(0), example)["params"]


def pretrain_dir(cfg: Config, name: str) -> tuple[str, dict[str, Any]]:
  """Where the pretraining of task `name` is cached, and the settings naming it."""
  settings = {
    k: getattr(cfg, k)
    for k in "dataset size patch image_size pretrain_steps augment".split()
  }
  # Named as when one batch size and rate served both stages (same caches).
  settings["batch_size"] = cfg.pretrain_batch_size
  settings["learning_rate"] = cfg.pretrain_learning_rate
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
  where = os.path.join(
    cfg.workdir,
    "pretrained",
    f"{name}-{cfg.size}-p{cfg.patch}-{cfg.pretrain_steps}-{key[:10]}",
  )
  return where, settings


def pretrain(cfg: Config, name: str, task: data_lib.Task, example) -> tuple[Any, float]:
  """Full fine-tuning from scratch on the source task, cached in the workdir.

  The cache directory is named by every setting that changes the result, so
  another setup gets its own and never reuses this one; a cache whose arrays
  do not match the checksum saved with them is refused (`load_cached`).
  """
  where, settings = pretrain_dir(cfg, name)
  # Pretrained in the looped layout (one cache for both); `prepare` converts.
  model, params = init_model(cfg, task.num_classes, example, scan=False)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
  found = checkpoint.load_cached(where, abstract, settings, "pretraining")
  if found is not None:
    params, record = found
    return params, record["test_accuracy"]
  method = methods_lib.make("full", model, params, example, cfg)
  record, params = train_lib.run(
    model,
    method,
    train_batches_of(cfg, task.train, seed=0, batch_size=cfg.pretrain_batch_size),
    eval_batches_of(cfg, task.test),
    steps=cfg.pretrain_steps,
    learning_rate=cfg.pretrain_learning_rate,
    seed=0,
    workdir=where,
    log_every=cfg.log_every,
    ckpt_every=cfg.ckpt_every,
    progress=cfg.progress,
    config=settings,
    task=f"{name} (source pretraining)",
  )
  checkpoint.save_cached(
    where, params, {"test_accuracy": record["test_accuracy"], "settings": settings}
  )
  return params, record["test_accuracy"]


def shipped(cfg: Config, name: str, task: data_lib.Task, example):
  """The shipped source model of task `name` (`vit_plateau.load_shipped`), and
  what to record of it: its path, SHA-256 and source test accuracy."""
  model = vit_plateau.model_config(cfg, task.num_classes, example)
  params, record = vit_plateau.load_shipped(name, model)
  npz = vit_plateau.paths(name)[0]
  info = {
    "path": str(npz.relative_to(vit_plateau.ROOT)),
    "sha256": record["sha256"],
    "source_test_accuracy": record["source_test_accuracy"],
    "best_val_accuracy": record["best_val_accuracy"],
    "steps": record["steps"],
  }
  return params, info


def _new_head(params, fresh):
  """`params` with the head of `fresh` (a new task's zero-initialised head)."""
  return {**params, "head": fresh["head"]}


def study_tasks(cfg: Config):
  """(name, source task or None, target task) triples."""
  if cfg.dataset == "embedded":
    available = data_lib.embedded_tasks()
    names = [t for t in cfg.tasks.split(",") if t]
    unknown = [t for t in names if t not in available]
    if unknown:
      raise ValueError(f"Unknown embedded task(s) {unknown}; have {sorted(available)}.")
    return [(n, *available[n]) for n in names]
  return [(cfg.dataset, None, data_lib.tfds_task(cfg.dataset, cfg.data_dir or None))]


def check_sizes(cfg: Config, tasks) -> None:
  """Checks the batch sizes against the data and the memory, before any compute.

  A training batch larger than its split is refused, naming both numbers (the
  exact split, validation held out, is checked again in `prepare`); so is a
  batch whose activations (`cli.activation_bytes`, a low estimate) cannot fit.
  """
  s = SIZES[cfg.size]
  for name, source, target in tasks:
    cli.check_batch(
      "batch_size", cfg.batch_size, len(target.train), f"the {name} training split"
    )
    batches = [("batch_size", cfg.batch_size, target)]
    if source is not None and cfg.pretrained == "train":
      cli.check_batch(
        "pretrain_batch_size",
        cfg.pretrain_batch_size,
        len(source.train),
        f"the {name} source task's training split",
      )
      batches.append(("pretrain_batch_size", cfg.pretrain_batch_size, source))
    image = np.shape(target.train[0]["image"])
    side = cfg.image_size or image[0]
    tokens = (side // cfg.patch) ** 2 + 1
    pixels = 4 * side * side * (image[2] if len(image) > 2 else 1)
    for flag, batch, task in batches:
      need = batch * pixels + cli.activation_bytes(
        batch, tokens, s.width, s.mlp_dim, s.depth, s.heads, task.num_classes
      )
      cli.check_memory(flag, batch, need, "the activations of one training step")
    need = cfg.eval_batch_size * pixels + cli.activation_bytes(
      cfg.eval_batch_size, tokens, s.width, s.mlp_dim, 1, s.heads
    )
    cli.check_memory("eval_batch_size", cfg.eval_batch_size, need, "one layer's output")


@dataclasses.dataclass
class TaskSetup:
  """One task, ready to fine-tune on: model, starting point, splits, costs."""

  name: str
  model: Any
  params: Any
  example: jax.Array
  train: Any
  val: Any
  test: Any
  info: dict[str, Any]
  costs: Costs | None = None
  forget: tuple | None = None  # (source model, source head, source test batches).


def prepare(
  cfg: Config, task_name, source, target, costs: bool, freeze: bool = False
) -> TaskSetup:
  """Splits, the pretrained (or loaded) model with a new head, and with `costs`
  the per-step FLOPs that size the budgeted methods (with `freeze`, also
  GreenTrainer's by tensor)."""
  if cfg.init and cfg.dataset == "embedded":
    raise ValueError(
      "--init loads a checkpoint for a tfds dataset, not the embedded tasks."
    )
  train, val = data_lib.split_validation(target.train, cfg.val_fraction)
  cli.check_batch(
    "batch_size",
    cfg.batch_size,
    len(train),
    f"the {task_name} training split without its validation examples",
  )
  example = train_batches_of(cfg, train, 0)[0]["image"][:2]
  model, fresh = init_model(cfg, target.num_classes, example)
  info: dict[str, Any] = {"num_classes": target.num_classes}
  forget = None
  if source is not None:
    if cfg.pretrained == "shipped":
      pre, info["pretrained"] = shipped(cfg, task_name, source, example)
      info["pretrain_accuracy"] = info["pretrained"]["source_test_accuracy"]
    else:
      pre, info["pretrain_accuracy"] = pretrain(cfg, task_name, source, example)
    pre = scan_params(pre, cfg.scan)
    params = _new_head(pre, fresh)
    # Forgetting: the fine-tuned body with the source task's head, kept aside.
    source_model, _ = init_model(cfg, source.num_classes, example)
    forget = (source_model, pre["head"], eval_batches_of(cfg, source.test))
  elif cfg.init:
    looped = load_npz(cfg.init, scan_params(fresh, scan=False))
    params = scan_params(looped, cfg.scan)
  else:
    params = fresh
    info["note"] = "no --init: fine-tuning starts from a random initialisation"
  task = TaskSetup(task_name, model, params, example, train, val, target.test, info)
  task.forget = forget
  if costs:
    task.costs = accounting.measure_costs(
      model, params, example, cfg, train_batches_of(cfg, train, 0)[0], freeze
    )
    c = task.costs
    info["costs"] = {
      "full_step_flops": c.full,
      "lisa_step_flops": c.lisa,
      "rgft_step_flops": c.detach.full,
      "all_detached_step_flops": c.detach.floor,
      "detach_saving": dict(zip(c.detach.names, c.detach.saving.tolist(), strict=True)),
      "additivity_error": c.detach.additivity_error,
    }
  return task


def choose(grid: list[float], scores: list[list[float]]) -> float:
  """The rate of `grid` whose tuning seeds' mean validation accuracy is highest
  (`scores[i]`: the seeds' accuracies at `grid[i]`); ties go to the smaller rate."""
  means = [float(np.mean(s)) for s in scores]
  best = max(means)
  return min(r for r, m in zip(grid, means, strict=True) if m == best)


def tune(cfg: Config, task: TaskSetup, name: str, variants: dict) -> dict[str, Any]:
  """Picks `name`'s learning rate on the validation split; the tuning record.

  Each rate of the grid trains `--tune_seeds` runs (seeds `TUNE_SEED + k`) on
  the training split and scores their final validation accuracy; the test
  split is never seen. A one-rate grid is taken as it is, without runs.
  """
  grid = cfg.learning_rates()
  if len(grid) == 1:
    return {"grid": grid, "chosen": grid[0]}
  seeds = [TUNE_SEED + k for k in range(cfg.tune_seeds)]
  scores = []
  for rate in grid:
    at = dataclasses.replace(cfg, learning_rate=rate)
    scores.append(
      [
        one_run(at, task, name, seed, variants, tuning=True)["val_accuracy"]
        for seed in seeds
      ]
    )
  return {
    "grid": grid,
    "seeds": seeds,
    "val_accuracy": scores,
    "val_accuracy_mean": [float(np.mean(s)) for s in scores],
    "chosen": choose(grid, scores),
  }


def tuned_as(cfg: Config, name: str, costs) -> str:
  """The method whose tuning picks `name`'s rate: `name` itself, or with
  `--tune_budget` the same method at that budget (where it can run there)."""
  other = compare.tuned_as(name, cfg.tune_budget)
  return name if methods_lib.infeasible(other, costs, cfg) else other


def run_dir(cfg: Config, task: str, name: str, seed: int, tuning: bool) -> str:
  """`runs/<task>/<method>/lr<rate>/seed<k>` (tuning runs: `tune<k>`)."""
  leaf = f"tune{seed}" if tuning else f"seed{seed}"
  return os.path.join(cfg.workdir, "runs", task, name, f"lr{cfg.learning_rate:g}", leaf)


def check_result(
  record: Any,
  done: str,
  task: str,
  name: str,
  seed: int,
  settings: dict,
  tuning: bool,
) -> None:
  """Refuses a `result.json` that is not the record of this run: another task,
  method, seed or role (tuning or reported) than its directory's, or other
  settings (the learning rate among them). It is left as it is, never mixed
  into the results."""
  if not isinstance(record, dict):
    raise ValueError(
      f"{done} does not hold a run's record (a JSON object); it is left as it "
      "is. Remove it to redo the run."
    )
  want = {"task": task, "method": name, "seed": seed}
  wrong = [
    f"{k} {record.get(k)!r} (this run: {v!r})"
    for k, v in want.items()
    if record.get(k) != v
  ]
  score = "val_accuracy" if tuning else "test_accuracy"
  if not wrong and score not in record:
    wrong.append(f"no {score} (this run is a {'tuning' if tuning else 'reported'} run)")
  if wrong:
    raise ValueError(
      f"{done} records another run: {', '.join(wrong)}. It is left as it is and "
      "not used; move it back where it belongs, or remove it to redo this run."
    )
  saved = record.get("settings") or {}
  if saved != settings:
    raise ValueError(
      f"{done} holds a run with other settings; it is left as it is. Use another "
      "--workdir or remove it. Differences: "
      + ", ".join(
        f"{k} {saved.get(k)!r} -> {settings.get(k)!r}"
        for k in sorted(saved.keys() | settings.keys())
        if saved.get(k) != settings.get(k)
      )
    )


def one_run(
  cfg: Config,
  task: TaskSetup,
  name: str,
  seed: int,
  variants: dict,
  tuning: bool = False,
  where: str | None = None,
) -> dict[str, Any]:
  """One run of method `name` (cached in `where`, by default `run_dir`).

  Reported runs are scored on the test split (and the source task's, for
  forgetting) and log validation accuracy every `--eval_every` steps; tuning
  runs are scored on the validation split only (`val_accuracy`). `variants`
  maps `(task, name, settings)` to the compiled steps the seeds share.
  """
  where = where or run_dir(cfg, task.name, name, seed, tuning)
  done = os.path.join(where, "result.json")
  settings = cfg.run_settings()
  if os.path.exists(done):
    record = store.load_json(done)
    check_result(record, done, task.name, name, seed, settings, tuning)
    return record
  method = methods_lib.make(
    name, task.model, task.params, task.example, cfg, task.costs
  )
  # Compiled steps shared by the seeds (one step would serve every rate too,
  # but a run's record counts the compilations it made).
  cache = (task.name, name, json.dumps(settings, sort_keys=True))
  if cache not in variants:
    variants[cache] = train_lib.variants_of(method)
  from tensorboardX import SummaryWriter

  with SummaryWriter(os.path.join(where, "tb")) as writer:
    record, final = train_lib.run(
      task.model,
      method,
      train_batches_of(cfg, task.train, seed=seed + 1),
      eval_batches_of(cfg, task.val if tuning else task.test),
      steps=cfg.steps,
      learning_rate=cfg.learning_rate,
      seed=seed,
      workdir=where,
      log_every=cfg.log_every,
      ckpt_every=cfg.ckpt_every,
      writer=writer,
      progress=cfg.progress,
      variants=variants[cache],
      val_batches=None if tuning else eval_batches_of(cfg, task.val),
      eval_every=cfg.eval_every,
      config=settings,
      task=task.name,
    )
    writer.add_scalar(
      "val/accuracy" if tuning else "test/accuracy",
      record["test_accuracy"],
      record["steps"],
    )
  if tuning:
    record["val_accuracy"] = record.pop("test_accuracy")
  elif task.forget is not None:
    source_model, head, batches = task.forget
    record["source_accuracy"] = train_lib.accuracy(
      source_model,
      methods_lib.replace_head(method, final, head),
      batches(),
      method.to_params,
      method.forward,
    )
  record["task"] = task.name
  record["settings"] = settings
  store.save_json(done, record)
  return record


def study(cfg: Config) -> dict[str, Any]:
  """Every method on every task: learning rate tuned on validation, then
  every seed at the chosen rate; records, tuning, summary and pretraining."""
  names = cfg.method_names()
  budgeted = any(methods_lib.parse_name(n)[1] is not None for n in names)
  out = {"config": dataclasses.asdict(cfg), "tasks": {}}
  tasks = study_tasks(cfg)
  check_sizes(cfg, tasks)
  for task_name, source, target in tasks:
    freeze = any(methods_lib.parse_name(n)[0] == "greentrainer" for n in names)
    task = prepare(cfg, task_name, source, target, costs=budgeted, freeze=freeze)
    runs, infeasible, tuning = [], {}, {}
    for name in names:
      why = methods_lib.infeasible(name, task.costs, cfg)
      if why:
        infeasible[name] = why
        continue
      variants: dict = {}  # Compiled steps, shared by the seeds.
      tuned = tuned_as(cfg, name, task.costs)
      if name in tuning:  # Tuned already, for a method at another budget.
        pass
      elif tuned == name:
        tuning[name] = tune(cfg, task, name, variants)
      else:
        if tuned not in tuning:  # Its tuning runs, even if it is not reported.
          tuning[tuned] = tune(cfg, task, tuned, {})
        tuning[name] = {**tuning[tuned], "tuned_as": tuned}
      at = dataclasses.replace(cfg, learning_rate=tuning[name]["chosen"])
      runs += [one_run(at, task, name, seed, variants) for seed in range(cfg.seeds)]
    tuning = {**{n: tuning[n] for n in names if n in tuning}, **tuning}  # In order.
    task.info.update(
      runs=runs, infeasible=infeasible, tuning=tuning, summary=summarize(runs)
    )
    out["tasks"][task_name] = task.info
  return out


def get_config(arg: str = "") -> Config:
  """The study's settings: `""` its defaults, `"quick"` a smoke run's (one task
  and seed, 20 steps from 20 of pretraining; the notebooks' tiny settings):

    python -m experiments.finetune --config quick
  """
  configs.check_arg(arg)
  if arg == "quick":
    return Config(
      tasks="label_shift",
      seeds=1,
      steps=20,
      budget_every=5,
      pretrain_steps=20,
      progress=False,
    )
  return Config()


def parse(argv: list[str]) -> Config:
  """The Config of command-line flags (`cli.parse`: `--config`, then one flag
  per field, with its --help)."""
  methods = methods_lib.REGISTRY.help()
  return cli.parse(get_config, argv, __doc__.split("\n\n")[0] + f" Methods: {methods}.")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse(sys.argv[1:] if argv is None else argv)
  cfg = dataclasses.replace(cfg, workdir=os.path.expanduser(cfg.workdir))
  cfg.validate()
  with store.lock(cfg.workdir):
    return _main(cfg)


def _main(cfg: Config) -> dict[str, Any]:
  results = study(cfg)
  store.save_json(os.path.join(cfg.workdir, "results.json"), results)
  table = markdown(results)
  with open(os.path.join(cfg.workdir, "results.md"), "w") as f:
    f.write(table)
  files = plots(results, os.path.join(cfg.workdir, "plots"))
  print(table)
  print(
    f"results: {os.path.join(cfg.workdir, 'results.json')}, "
    f"{os.path.join(cfg.workdir, 'results.md')}"
  )
  print("plots:", ", ".join(files))
  print(f"tensorboard --logdir {os.path.join(cfg.workdir, 'runs')}")
  return results


if __name__ == "__main__":
  main()
