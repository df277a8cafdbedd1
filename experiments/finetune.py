"""ViT fine-tuning study: RGFT against the usual methods, side by side.

The default runs the two embedded transfer tasks (data shipped in pip
packages, no download) on a small ViT, every method with 3 seeds:

  python -m experiments.finetune

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
import json
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import train as train_lib
from experiments.vit import VisionTransformer
from experiments.vit import load_npz


@dataclasses.dataclass
class Config:
  dataset: str = "embedded"  # "embedded", or a tfds name such as "cifar10".
  tasks: str = "label_shift,input_shift"  # Embedded tasks to run.
  methods: str = ",".join(methods_lib.METHODS)
  seeds: int = 3
  size: str = "xs"
  patch: int = 7
  image_size: int = 0  # 0: the data's own size.
  batch_size: int = 64
  steps: int = 200
  pretrain_steps: int = 400
  learning_rate: float = 1e-3
  lora_rank: int = 4
  lisa_layers: int = 1
  lisa_period: int = 20
  freeze_level: float = 0.5
  freeze_patience: int = 20
  refresh_every: int = 50
  augment: bool = False
  init: str = ""  # A vision_transformer .npz checkpoint (tfds datasets).
  data_dir: str = ""
  workdir: str = "workdir/finetune"
  log_every: int = 10
  ckpt_every: int = 50
  eval_batch_size: int = 250
  progress: bool = True

  def hyper(self) -> methods_lib.Hyper:
    return methods_lib.Hyper(
      learning_rate=self.learning_rate,
      steps=self.steps,
      lora_rank=self.lora_rank,
      lisa_layers=self.lisa_layers,
      lisa_period=self.lisa_period,
      freeze_level=self.freeze_level,
      freeze_patience=self.freeze_patience,
      refresh_every=self.refresh_every,
    )


def _image_size(cfg: Config) -> int | None:
  return cfg.image_size or None


def _batches(cfg: Config, task: data_lib.Task, seed: int):
  return data_lib.train_batches(
    task.train, cfg.batch_size, seed, image_size=_image_size(cfg), augment=cfg.augment
  )


def _eval(cfg: Config, task: data_lib.Task):
  return lambda: data_lib.eval_batches(
    task.test, cfg.eval_batch_size, image_size=_image_size(cfg)
  )


def _init(cfg: Config, classes: int, example: jax.Array):
  model = VisionTransformer(num_classes=classes, patch=cfg.patch, size=cfg.size)
  return model, model.init(jax.random.key(0), example)["params"]


def pretrain(cfg: Config, name: str, task: data_lib.Task, example) -> tuple[Any, float]:
  """Full fine-tuning from scratch on the source task, cached in the workdir."""
  where = os.path.join(
    cfg.workdir, "pretrained", f"{name}-{cfg.size}-p{cfg.patch}-{cfg.pretrain_steps}"
  )
  model, params = _init(cfg, task.num_classes, example)
  done = os.path.join(where, "done.json")
  if os.path.exists(done):
    with open(done) as f:
      accuracy = json.load(f)["test_accuracy"]
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
    _batches(cfg, task, seed=0),
    _eval(cfg, task),
    steps=cfg.pretrain_steps,
    seed=0,
    workdir=where,
    log_every=cfg.log_every,
    ckpt_every=cfg.ckpt_every,
    progress=cfg.progress,
  )
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(where, "params")), params, force=True)
  train_lib.save_json(done, {"test_accuracy": record["test_accuracy"]})
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
  names = [m for m in cfg.methods.split(",") if m]
  bad = [m for m in names if m not in methods_lib.METHODS]
  if bad:
    raise ValueError(f"Unknown method(s) {bad}; choose from {methods_lib.METHODS}.")
  if cfg.init and cfg.dataset == "embedded":
    raise ValueError(
      "--init loads a checkpoint for a tfds dataset, not the embedded tasks."
    )
  out = {"config": dataclasses.asdict(cfg), "tasks": {}}
  for task_name, source, target in _tasks(cfg):
    example = _batches(cfg, target, 0)[0]["image"][:2]
    model, fresh = _init(cfg, target.num_classes, example)
    info: dict[str, Any] = {"num_classes": target.num_classes}
    if source is not None:
      pre, info["pretrain_accuracy"] = pretrain(cfg, task_name, source, example)
      params = _new_head(pre, fresh)
    elif cfg.init:
      params = load_npz(cfg.init, fresh)
    else:
      params = fresh
      info["note"] = "no --init: fine-tuning starts from a random initialisation"
    runs = []
    for name in names:
      compiled = {}  # Shared by the seeds: same shapes, same step.
      for seed in range(cfg.seeds):
        runs.append(
          _one_run(cfg, task_name, target, model, params, example, name, seed, compiled)
        )
    info["runs"] = runs
    info["summary"] = summarize(runs)
    out["tasks"][task_name] = info
  return out


def _one_run(cfg, task_name, task, model, params, example, name, seed, compiled):
  where = os.path.join(cfg.workdir, "runs", task_name, name, f"seed{seed}")
  done = os.path.join(where, "result.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  key = jax.random.fold_in(jax.random.key(seed), 1)
  method = methods_lib.make(name, model, params, example, cfg.hyper(), key)
  from tensorboardX import SummaryWriter

  with SummaryWriter(os.path.join(where, "tb")) as writer:
    record, _ = train_lib.run(
      model,
      method,
      _batches(cfg, task, seed=seed + 1),
      _eval(cfg, task),
      steps=cfg.steps,
      seed=seed,
      workdir=where,
      log_every=cfg.log_every,
      ckpt_every=cfg.ckpt_every,
      writer=writer,
      progress=cfg.progress,
      compiled=compiled,
    )
    writer.add_scalar("test/accuracy", record["test_accuracy"], cfg.steps)
  record["task"] = task_name
  train_lib.save_json(done, record)
  return record


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Mean and spread over seeds per method; FLOPs and time relative to full."""
  out = {}
  for name in dict.fromkeys(r["method"] for r in runs):
    rs = [r for r in runs if r["method"] == name]
    acc = np.array([r["test_accuracy"] for r in rs])
    out[name] = {
      "seeds": len(rs),
      "accuracy_mean": float(acc.mean()),
      "accuracy_std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
      "train_flops": float(np.mean([r["train_flops"] for r in rs])),
      "wall_s": float(np.mean([r["wall_s"] for r in rs])),
      "peak_bytes": int(max(r["peak_bytes"] for r in rs)),
      "update_ratio": float(np.mean([r["update_ratio"] for r in rs])),
      "trainable_params": int(rs[0]["trainable_params"]),
      "step_variants": int(max(r["step_variants"] for r in rs)),
      "compilations": int(sum(r["compilations"] for r in rs)),  # Cache shared by seeds.
      "refresh_steps": int(max(r["refresh_steps"] for r in rs)),
    }
  if "full" in out:
    for s in out.values():
      s["flops_vs_full"] = s["train_flops"] / out["full"]["train_flops"]
      s["time_vs_full"] = s["wall_s"] / max(out["full"]["wall_s"], 1e-9)
  return out


def markdown(results: dict[str, Any]) -> str:
  lines = []
  for task, info in results["tasks"].items():
    head = f"### {task}"
    if "pretrain_accuracy" in info:
      head += f" (source-task test accuracy after pretraining: {info['pretrain_accuracy']:.3f})"
    lines += [head, ""]
    lines.append(
      "| method | test acc (mean ± sd) | train GFLOPs | FLOPs vs full | wall s | "
      "time vs full | peak MiB | update ratio | trainable params | step variants "
      "(compiled) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in info["summary"].items():
      lines.append(
        f"| {name} | {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} | "
        f"{s['train_flops'] / 1e9:.1f} | {s.get('flops_vs_full', float('nan')):.3f} | "
        f"{s['wall_s']:.1f} | {s.get('time_vs_full', float('nan')):.2f} | "
        f"{s['peak_bytes'] / 2**20:.1f} | {s['update_ratio']:.3f} | "
        f"{s['trainable_params']:,} | {s['step_variants']} ({s['compilations']}) |"
      )
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
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, s in info["summary"].items():
      accs = [r["test_accuracy"] for r in info["runs"] if r["method"] == name]
      ax.errorbar(
        s["train_flops"] / 1e12, np.mean(accs), yerr=np.std(accs), fmt="o", label=name
      )
    ax.set_xlabel("training TFLOPs (XLA-counted)")
    ax.set_ylabel("test accuracy")
    ax.set_title(task)
    ax.legend(fontsize=8)
    save(fig, f"{task}_accuracy_vs_flops.png")
  return files


def parse(argv: list[str]) -> Config:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for f in dataclasses.fields(Config):
    if f.type == "bool":
      parser.add_argument(
        f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default
      )
    else:
      kind = {"int": int, "float": float}.get(f.type, str)
      parser.add_argument(f"--{f.name}", type=kind, default=f.default)
  return Config(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse(sys.argv[1:] if argv is None else argv)
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
