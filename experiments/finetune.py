"""ViT fine-tuning study: RGFT against the usual methods, side by side.

The default runs the two embedded transfer tasks (data shipped in pip
packages, no download) on a small ViT, with 5 seeds: full fine-tuning, soft
RGFT, budgeted RGFT at budget 0.5, the same budget spent uniformly at random,
and full fine-tuning and LISA given the same FLOPs:

  python -m experiments.finetune                 # the default
  python -m experiments.finetune --methods all   # every method at every budget

and writes `results.json`, `results.md`, plots and TensorBoard logs under
`--workdir`. The source-task pretraining is cached there, and every run keeps
an orbax checkpoint, so an interrupted study resumes where it stopped. The real
study, on a machine with the data prepared (see README):

  python -m experiments.finetune --dataset cifar10 --init ViT-B_16.npz \
      --size B --patch 16 --image_size 224 --batch_size 128 --steps 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import rgft_jax
from experiments import compare
from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import train as train_lib
from experiments.vit import SIZES
from experiments.vit import VisionTransformer
from experiments.vit import load_npz

# What the default study runs; `--methods all` runs every method at every budget.
DEFAULT_METHODS = (
  "full",
  "rgft_blocks",
  "rgft_budget@0.5",
  "uniform_budget@0.5",
  "full@0.5",
  "lisa@0.5",
)


@dataclasses.dataclass
class Config:
  dataset: str = "embedded"  # "embedded", or a tfds name such as "cifar10".
  tasks: str = "label_shift,input_shift"  # Embedded tasks to run.
  methods: str = ",".join(DEFAULT_METHODS)  # Comma-separated, or "all".
  seeds: int = 5  # Seeds 0..seeds-1 (data order, LoRA init, random draws).
  size: str = "xs"  # ViT size: mu, xs, Ti, S, B or L.
  patch: int = 7  # Patch size in pixels.
  image_size: int = 0  # 0: the data's own size.
  batch_size: int = 64  # Training batch size.
  steps: int = 200  # Fine-tuning steps (equal-FLOPs baselines run fewer).
  pretrain_steps: int = 400  # Source-task pretraining steps (embedded tasks).
  learning_rate: float = 1e-3  # Adam's learning rate, every method.
  beta: float = 0.9  # RGFT: EMA decay of the error map.
  thresh_init: float = 0.1  # RGFT: threshold at the first step.
  thresh_final: float = 0.3  # RGFT: threshold at the last step.
  min_scale: float = 0.01  # RGFT: smallest multiplier.
  lora_rank: int = 4  # LoRA: rank of the factors.
  lisa_layers: int = 1  # LISA: blocks trained at a time.
  lisa_period: int = 20  # LISA: steps between redraws.
  budget_every: int = 20  # Budgeted RGFT: steps between decisions.
  budget_ramp: int = 0  # Steps over which the allowance falls from full steps.
  budget_hysteresis: float = 0.1  # Bonus of the branches trained now ("top").
  budget_refresh: bool = False  # A step with nothing detached before each decision.
  budget_exact: bool = False  # Only exact measurements enter the error map.
  augment: bool = False  # Random crop and flip (tfds datasets).
  init: str = ""  # A vision_transformer .npz checkpoint (tfds datasets).
  data_dir: str = ""  # TFDS data directory (default: TFDS's own).
  workdir: str = "workdir/finetune"  # Results, checkpoints, caches, logs.
  val_fraction: float = 0.1  # Of the target task's training data, held out.
  eval_every: int = 20  # Held-out accuracy logged every this many steps.
  log_every: int = 10  # Loss, error map and multipliers logged this often.
  ckpt_every: int = 100  # Checkpoint every this many steps (two are kept).
  eval_batch_size: int = 250  # Batch size of evaluation.
  progress: bool = True  # Progress bars.

  def hyper(self) -> methods_lib.Hyper:
    return methods_lib.Hyper(
      learning_rate=self.learning_rate,
      steps=self.steps,
      beta=self.beta,
      thresh_init=self.thresh_init,
      thresh_final=self.thresh_final,
      min_scale=self.min_scale,
      lora_rank=self.lora_rank,
      lisa_layers=self.lisa_layers,
      lisa_period=self.lisa_period,
      budget_every=self.budget_every,
      budget_ramp=self.budget_ramp,
      budget_hysteresis=self.budget_hysteresis,
      budget_refresh=self.budget_refresh,
      budget_exact=self.budget_exact,
    )

  def method_names(self) -> list[str]:
    names = (
      list(methods_lib.METHODS)
      if self.methods == "all"
      else [m for m in self.methods.split(",") if m]
    )
    if not names:
      raise ValueError("--methods names no method.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"--methods repeats {repeated}.")
    for name in names:
      methods_lib.parse_name(name)  # Raises on an unknown name.
    return names

  def validate(self) -> None:
    """Raises ValueError naming the flag and its allowed range, before any compute."""
    at_least = {
      "seeds": 1,
      "patch": 1,
      "image_size": 0,
      "batch_size": 1,
      "steps": 1,
      "pretrain_steps": 1,
      "lora_rank": 1,
      "lisa_layers": 1,
      "lisa_period": 1,
      "budget_every": 1,
      "budget_ramp": 0,
      "eval_every": 0,
      "log_every": 1,
      "ckpt_every": 1,
      "eval_batch_size": 1,
    }
    for name, low in at_least.items():
      value = getattr(self, name)
      if not isinstance(value, int) or value < low:
        raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}.")
    if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(
        f"--learning_rate must be finite and > 0, got {self.learning_rate}."
      )
    if not (np.isfinite(self.budget_hysteresis) and self.budget_hysteresis >= 0):
      raise ValueError(
        f"--budget_hysteresis must be finite and >= 0, got {self.budget_hysteresis}."
      )
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f"--val_fraction must be in (0, 1), got {self.val_fraction}.")
    if self.budget_ramp > self.steps:
      raise ValueError(
        f"--budget_ramp must be in [0, --steps={self.steps}], got {self.budget_ramp}."
      )
    if self.size not in SIZES:
      raise ValueError(f"--size must be one of {sorted(SIZES)}, got {self.size!r}.")
    if self.image_size and self.image_size % self.patch:
      raise ValueError(
        f"--image_size ({self.image_size}) must be a multiple of --patch "
        f"({self.patch})."
      )
    if not self.workdir.strip():
      raise ValueError("--workdir must name a directory, got an empty string.")
    self.method_names()
    try:  # RGFT's own checks, on a one-parameter stand-in.
      stand_in = {"w": np.zeros(1, np.float32)}
      rgft_jax.rgft(
        self.learning_rate,
        rgft_jax.Components.from_regex(stand_in, [(r"w", "w")]),
        beta=self.beta,
        thresh_init=self.thresh_init,
        thresh_final=self.thresh_final,
        min_scale=self.min_scale,
      )
    except (TypeError, ValueError) as e:
      raise ValueError(f"RGFT flags (--beta, --thresh_*, --min_scale): {e}") from None

  def run_settings(self) -> dict:
    """The settings that change a fine-tuning run's result (its signature)."""
    keep = (
      "dataset size patch image_size batch_size steps pretrain_steps learning_rate "
      "beta thresh_init thresh_final min_scale "
      "lora_rank lisa_layers lisa_period budget_every budget_ramp budget_hysteresis "
      "budget_refresh budget_exact "
      "augment init val_fraction"
    ).split()
    return {k: getattr(self, k) for k in keep}


def _image_size(cfg: Config) -> int | None:
  return cfg.image_size or None


def _batches(cfg: Config, source, seed: int):
  return data_lib.train_batches(
    source, cfg.batch_size, seed, image_size=_image_size(cfg), augment=cfg.augment
  )


def _eval(cfg: Config, source):
  return lambda: data_lib.eval_batches(
    source, cfg.eval_batch_size, image_size=_image_size(cfg)
  )


def _init(cfg: Config, classes: int, example: jax.Array):
  model = VisionTransformer(num_classes=classes, patch=cfg.patch, size=cfg.size)
  return model, model.init(jax.random.key(0), example)["params"]


def pretrain_dir(cfg: Config, name: str) -> tuple[str, dict[str, Any]]:
  """Where the pretraining of task `name` is cached, and the settings naming it."""
  settings = {
    k: getattr(cfg, k)
    for k in "dataset size patch image_size batch_size pretrain_steps "
    "learning_rate augment".split()
  }
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
  another setup gets its own and never reuses this one.
  """
  where, settings = pretrain_dir(cfg, name)
  model, params = _init(cfg, task.num_classes, example)
  done = os.path.join(where, "done.json")
  if os.path.exists(done):
    record = train_lib.load_json(done)
    if record.get("settings") != settings:
      raise ValueError(f"{done} was written by another setup; it is left as it is.")
    accuracy = record["test_accuracy"]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(
        os.path.abspath(os.path.join(where, "params")), abstract
      ), accuracy
  method = methods_lib.make(
    "full", model, params, example, cfg.hyper(), jax.random.key(0)
  )
  record, params = train_lib.run(
    model,
    method,
    _batches(cfg, task.train, seed=0),
    _eval(cfg, task.test),
    steps=cfg.pretrain_steps,
    seed=0,
    workdir=where,
    log_every=cfg.log_every,
    ckpt_every=cfg.ckpt_every,
    progress=cfg.progress,
    config=settings,
  )
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(where, "params")), params, force=True)
  train_lib.save_json(
    done, {"test_accuracy": record["test_accuracy"], "settings": settings}
  )
  return params, record["test_accuracy"]


def _new_head(params, fresh):
  """`params` with the head of `fresh` (a new task's zero-initialised head)."""
  return {**params, "head": fresh["head"]}


def _tasks(cfg: Config):
  """(name, source task or None, target task) triples."""
  if cfg.dataset == "embedded":
    available = data_lib.embedded_tasks()
    names = [t for t in cfg.tasks.split(",") if t]
    unknown = [t for t in names if t not in available]
    if unknown:
      raise ValueError(f"Unknown embedded task(s) {unknown}; have {sorted(available)}.")
    return [(n, *available[n]) for n in names]
  return [(cfg.dataset, None, data_lib.tfds_task(cfg.dataset, cfg.data_dir or None))]


def study(cfg: Config) -> dict[str, Any]:
  """Every method on every task with every seed; records, summary and pretraining."""
  names = cfg.method_names()
  if cfg.init and cfg.dataset == "embedded":
    raise ValueError(
      "--init loads a checkpoint for a tfds dataset, not the embedded tasks."
    )
  out = {"config": dataclasses.asdict(cfg), "tasks": {}}
  for task_name, source, target in _tasks(cfg):
    train, val = data_lib.split_validation(target.train, cfg.val_fraction)
    example = _batches(cfg, train, 0)[0]["image"][:2]
    model, fresh = _init(cfg, target.num_classes, example)
    info: dict[str, Any] = {"num_classes": target.num_classes}
    forget = None
    if source is not None:
      pre, info["pretrain_accuracy"] = pretrain(cfg, task_name, source, example)
      params = _new_head(pre, fresh)
      # Forgetting: the fine-tuned body with the source task's head, kept aside.
      source_model, _ = _init(cfg, source.num_classes, example)
      forget = (source_model, pre["head"], _eval(cfg, source.test))
    elif cfg.init:
      params = load_npz(cfg.init, fresh)
    else:
      params = fresh
      info["note"] = "no --init: fine-tuning starts from a random initialisation"
    costs = None
    if any(methods_lib.parse_name(n)[1] is not None for n in names):
      costs = train_lib.measure_costs(
        model, params, example, cfg.hyper(), _batches(cfg, train, 0)[0]
      )
      info["costs"] = {
        "full_step_flops": costs.full,
        "lisa_step_flops": costs.lisa,
        "rgft_step_flops": costs.detach.full,
        "all_detached_step_flops": costs.detach.floor,
        "detach_saving": dict(
          zip(costs.detach.names, costs.detach.saving.tolist(), strict=True)
        ),
        "additivity_error": costs.detach.additivity_error,
      }
    runs, infeasible = [], {}
    for name in names:
      why = methods_lib.infeasible(name, costs)
      if why:
        infeasible[name] = why
        continue
      variants = None  # Compiled steps, shared by the seeds.
      for seed in range(cfg.seeds):
        record, variants = _one_run(
          cfg,
          task_name,
          (train, val, target.test),
          model,
          params,
          example,
          name,
          seed,
          costs,
          variants,
          forget,
        )
        runs.append(record)
    info["runs"] = runs
    info["infeasible"] = infeasible
    info["summary"] = summarize(runs)
    out["tasks"][task_name] = info
  return out


def _one_run(
  cfg, task_name, splits, model, params, example, name, seed, costs, variants, forget
):
  train, val, test = splits
  where = os.path.join(cfg.workdir, "runs", task_name, name, f"seed{seed}")
  done = os.path.join(where, "result.json")
  settings = cfg.run_settings()
  if os.path.exists(done):
    record = train_lib.load_json(done)
    if record.get("settings") == settings:
      return record, variants
    raise ValueError(
      f"{done} holds a run with other settings; it is left as it is. Use another "
      "--workdir or remove it. Differences: "
      + ", ".join(
        f"{k} {record.get('settings', {}).get(k)!r} -> {v!r}"
        for k, v in settings.items()
        if record.get("settings", {}).get(k) != v
      )
    )
  key = jax.random.fold_in(jax.random.key(seed), 1)
  method = methods_lib.make(
    name, model, params, example, cfg.hyper(), key, seed=seed, costs=costs
  )
  if variants is None:
    variants = train_lib.variants_of(model, method)
  from tensorboardX import SummaryWriter

  with SummaryWriter(os.path.join(where, "tb")) as writer:
    record, final = train_lib.run(
      model,
      method,
      _batches(cfg, train, seed=seed + 1),
      _eval(cfg, test),
      steps=cfg.steps,
      seed=seed,
      workdir=where,
      log_every=cfg.log_every,
      ckpt_every=cfg.ckpt_every,
      writer=writer,
      progress=cfg.progress,
      variants=variants,
      val_batches=_eval(cfg, val),
      eval_every=cfg.eval_every,
      config=settings,
    )
    writer.add_scalar("test/accuracy", record["test_accuracy"], record["steps"])
  if forget is not None:
    source_model, head, batches = forget
    body = method.to_model(final)
    record["source_accuracy"] = train_lib.accuracy(
      source_model, {**body, "head": head}, batches()
    )
  record["task"] = task_name
  record["settings"] = settings
  train_lib.save_json(done, record)
  return record, variants


def _reach(rs: list[dict[str, Any]], target: float) -> float | None:
  """Mean FLOPs at the first logged step where the seeds' mean held-out accuracy
  reaches `target` (None if it never does)."""
  curves = [r["history"]["val_accuracy"] for r in rs]
  if not curves or not curves[0] or len({len(c) for c in curves}) != 1:
    return None
  mean = np.mean(curves, axis=0)
  hit = np.flatnonzero(mean >= target - 1e-12)
  if not len(hit):
    return None
  return float(np.mean([r["history"]["val_flops"][hit[0]] for r in rs]))


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per method: accuracy over seeds, the paired difference to full fine-tuning
  (same seeds) with its 95% interval, and costs relative to full."""
  out = {}
  full = {r["seed"]: r for r in runs if r["method"] == "full"}
  for name in dict.fromkeys(r["method"] for r in runs):
    rs = [r for r in runs if r["method"] == name]
    acc = np.array([r["test_accuracy"] for r in rs])
    s = {
      "seeds": len(rs),
      "steps": int(rs[0]["steps"]),
      "accuracy_mean": float(acc.mean()),
      "accuracy_std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
      "train_flops": float(np.mean([r["train_flops"] for r in rs])),
      "wall_s": float(np.mean([r["wall_s"] for r in rs])),
      "peak_bytes": int(max(r["peak_bytes"] for r in rs)),
      "update_ratio": float(np.mean([r["update_ratio"] for r in rs])),
      "trainable_params": int(rs[0]["trainable_params"]),
      "step_variants": int(max(r["step_variants"] for r in rs)),
      "compilations": int(sum(r["compilations"] for r in rs)),  # Cache shared by seeds.
    }
    if all("source_accuracy" in r for r in rs):
      source = np.array([r["source_accuracy"] for r in rs])
      s["source_accuracy_mean"] = float(source.mean())
      s["source_accuracy_std"] = float(source.std(ddof=1)) if len(rs) > 1 else 0.0
    vs_full = compare.paired(runs, name, "full") if full else None
    if vs_full is not None:
      s["diff_vs_full"], s["diff_ci95"] = vs_full["mean"], vs_full["ci95"]
    out[name] = s
  if "full" in out:
    base = out["full"]
    finals = [
      full[k]["history"]["val_accuracy"][-1]
      for k in full
      if full[k]["history"]["val_accuracy"]
    ]
    target = float(np.mean(finals)) - 0.005 if finals else None
    for name, s in out.items():
      s["flops_vs_full"] = s["train_flops"] / base["train_flops"]
      s["time_vs_full"] = s["wall_s"] / max(base["wall_s"], 1e-9)
      s["time_per_flop_vs_full"] = s["time_vs_full"] / s["flops_vs_full"]
      if target is not None:
        reach = _reach([r for r in runs if r["method"] == name], target)
        s["reach_target"] = target
        s["flops_to_reach_vs_full"] = (
          None if reach is None else reach / base["train_flops"]
        )
  return out


def _fmt(x: float | None, spec: str) -> str:
  return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


def _source(s: dict[str, Any]) -> str:
  if "source_accuracy_mean" not in s:
    return "n/a"
  return f"{s['source_accuracy_mean']:.3f} ± {s['source_accuracy_std']:.3f}"


def markdown(results: dict[str, Any]) -> str:
  lines = []
  for task, info in results["tasks"].items():
    head = f"### {task}"
    if "pretrain_accuracy" in info:
      head += f" (source-task test accuracy after pretraining: {info['pretrain_accuracy']:.3f})"
    lines += [head, ""]
    lines.append(
      "| method | steps | test acc (mean ± sd) | vs full, paired (95% CI) | source "
      "acc after (forgetting) | FLOPs vs full | FLOPs to reach full - 0.5 pt | wall s "
      "| time vs full | time / FLOPs vs full | peak MiB | update ratio | step "
      "variants (compiled) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in info["summary"].items():
      diff = s.get("diff_vs_full")
      paired = (
        "n/a"
        if diff is None or name == "full"
        else f"{diff * 100:+.1f} pt (± {_fmt(s['diff_ci95'] * 100, '.1f')})"
      )
      lines.append(
        f"| {name} | {s['steps']} | {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} | "
        f"{paired} | {_source(s)} | {_fmt(s.get('flops_vs_full'), '.3f')} | "
        f"{_fmt(s.get('flops_to_reach_vs_full'), '.3f')} | "
        f"{s['wall_s']:.1f} | {_fmt(s.get('time_vs_full'), '.2f')} | "
        f"{_fmt(s.get('time_per_flop_vs_full'), '.2f')} | "
        f"{s['peak_bytes'] / 2**20:.1f} | {s['update_ratio']:.3f} | "
        f"{s['step_variants']} ({s['compilations']}) |"
      )
    for name, why in info.get("infeasible", {}).items():
      lines.append(f"| {name} | not run: {why} |" + " |" * 11)
    lines.append("")
  return "\n".join(lines)


def plots(results: dict[str, Any], where: str) -> list[str]:
  """Error map heat maps, alpha distributions and accuracy against FLOPs."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from rgft_jax import viz

  files = []
  os.makedirs(where, exist_ok=True)

  def save(fig, name):
    path = os.path.join(where, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(path)

  for task, info in results["tasks"].items():
    for r in info["runs"]:
      if r["seed"] != 0 or not r["history"]["alpha"]:
        continue
      h = r["history"]
      fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
      viz.error_map_heatmap(h["error_map"], h["step"], r["components"], ax=axes[0])
      axes[0].set_title(f"{task}, {r['method']}: EMA error map / max")
      viz.alpha_distribution(h["alpha"], h["step"], ax=axes[1])
      axes[1].set_title("multipliers across components")
      save(fig, f"{task}_{r['method']}_error_map.png")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    bases = list(dict.fromkeys(methods_lib.BASE_METHODS + methods_lib.BUDGET_METHODS))
    colors = plt.get_cmap("tab10")
    # Colour by method, marker and line by budget (none, 0.3, 0.5, 0.7, other).
    looks = {None: ("o", "-"), 0.3: ("v", ":"), 0.5: ("s", "--"), 0.7: ("D", "-.")}
    for name, s in info["summary"].items():
      base, budget = methods_lib.parse_name(name)
      color = colors(bases.index(base) % 10)
      marker, line = looks.get(budget, ("x", "-"))
      accs = [r["test_accuracy"] for r in info["runs"] if r["method"] == name]
      axes[0].errorbar(
        s["train_flops"] / 1e12,
        np.mean(accs),
        yerr=np.std(accs, ddof=1) if len(accs) > 1 else 0.0,
        fmt=marker,
        color=color,
        label=name,
      )
      rs = [r for r in info["runs"] if r["method"] == name]
      if rs and rs[0]["history"]["val_accuracy"]:
        curves = [
          r["history"]
          for r in rs
          if len(r["history"]["val_accuracy"]) == len(rs[0]["history"]["val_accuracy"])
        ]
        axes[1].plot(
          np.mean([h["val_flops"] for h in curves], axis=0) / 1e12,
          np.mean([h["val_accuracy"] for h in curves], axis=0),
          marker=marker,
          linestyle=line,
          color=color,
          markersize=3,
          label=name,
        )
    axes[0].set_xlabel("training TFLOPs (XLA-counted)")
    axes[0].set_ylabel("test accuracy (mean ± sd over seeds)")
    axes[0].set_title(f"{task}: accuracy against training FLOPs")
    axes[1].set_xlabel("training TFLOPs so far")
    axes[1].set_ylabel("held-out accuracy (mean over seeds)")
    axes[1].set_title(f"{task}: held-out accuracy during training")
    for ax in axes:
      ax.legend(fontsize=7)
    save(fig, f"{task}_accuracy_vs_flops.png")
  return files


def _field_help() -> dict[str, str]:
  """Each Config field's trailing comment, as its --help text."""
  import inspect
  import re

  helps = {}
  for line in inspect.getsource(Config).splitlines():
    m = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)", line)
    if m:
      helps[m.group(1)] = m.group(2)
  return helps


def parse(argv: list[str]) -> Config:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  helps = _field_help()
  for f in dataclasses.fields(Config):
    if f.type == "bool":
      parser.add_argument(
        f"--{f.name}",
        action=argparse.BooleanOptionalAction,
        default=f.default,
        help=helps.get(f.name),
      )
    else:
      kind = {"int": int, "float": float}.get(f.type, str)
      parser.add_argument(
        f"--{f.name}", type=kind, default=f.default, help=helps.get(f.name)
      )
  return Config(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse(sys.argv[1:] if argv is None else argv)
  cfg.workdir = os.path.expanduser(cfg.workdir)
  cfg.validate()
  with train_lib.lock(cfg.workdir):
    return _main(cfg)


def _main(cfg: Config) -> dict[str, Any]:
  results = study(cfg)
  train_lib.save_json(os.path.join(cfg.workdir, "results.json"), results)
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
