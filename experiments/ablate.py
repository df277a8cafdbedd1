"""Ablations of RGFT on the embedded tasks: a table (markdown, JSON) and a plot each.

  python -m experiments.ablate                  # every ablation (sized for 2 CPU cores)
  python -m experiments.ablate --config quick   # a smoke run (flags given win)

Each ablation changes one thing of `rgft_blocks` (or of `full` fine-tuning, for
the sensitivity ones) and compares it with the default on the same seeds:
the error-map method, the threshold pair, the warmup length, the batch size,
the learning rate, and the grouping of parameters into components. The
`levers` ablation changes one thing of budgeted RGFT (`rgft_budget@b`) instead
and sets full fine-tuning, with all its steps and with b of them, beside it. Every
other setting is `experiments.finetune`'s, settable with the same flags; runs
are cached under `--workdir` by their settings, so a row shared by two
ablations (the default) runs once, and an interrupted command resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

import numpy as np

from experiments import cli
from experiments import compare
from experiments import configs
from experiments import finetune
from experiments import methods as methods_lib
from experiments import store

ABLATIONS = (
  "error_method",
  "threshold",
  "warmup",
  "batch_size",
  "learning_rate",
  "grouping",
  "levers",
)
# The levers ablation: budgeted RGFT with one thing changed (method, settings).
LEVERS = {
  "default": ("rgft_budget", {}),
  # The trained components' updates are not scaled down (multipliers of 1).
  "hard": ("rgft_budget", {"min_scale": 1.0}),
  "taylor": ("rgft_budget", {"error_method": "taylor"}),
  # A full step before each decision: every component measured afresh.
  "refresh": ("rgft_budget", {"budget_refresh": True}),
  # Only measurements with nothing detached below a component count.
  "exact": ("rgft_budget", {"budget_exact": True}),
  "every5": ("rgft_budget", {"budget_every": 5}),
  "no_hysteresis": ("rgft_budget", {"budget_hysteresis": 0.0}),
  # More of the budget spent early: full steps falling to below b over 50 steps.
  "ramp50": ("rgft_budget", {"budget_ramp": 50}),
  # Drawn in proportion to the error at each decision, not the top set.
  "sample": ("rgft_budget_sample", {}),
  "hard_sample": ("rgft_budget_sample", {"min_scale": 1.0}),
  "ramp80": ("rgft_budget", {"budget_ramp": 80}),
  # Two levers together.
  "refresh_ramp50": ("rgft_budget", {"budget_refresh": True, "budget_ramp": 50}),
  "taylor_ramp50": ("rgft_budget", {"error_method": "taylor", "budget_ramp": 50}),
  # Adam's bias correction by each entry's own steps (`--adam_count`): a
  # branch first trained late, or trained again, starts or resumes Adam as
  # Adam would instead of taking oversized steps.
  "per_entry": ("rgft_budget", {"adam_count": "per_entry"}),
  "ramp80_per_entry": ("rgft_budget", {"budget_ramp": 80, "adam_count": "per_entry"}),
  # The allocation decided once, after the first window, and held.
  "static": ("static_budget", {}),
  # A larger bonus for the components trained now: fewer changes of the set.
  "hyst05": ("rgft_budget", {"budget_hysteresis": 0.5}),
  "hyst05_per_entry": (
    "rgft_budget",
    {"budget_hysteresis": 0.5, "adam_count": "per_entry"},
  ),
  "full": ("full", {}),  # All the steps: b / budget more FLOPs.
  "full@b": ("full", {}),  # Fewer steps, the same FLOPs.
}
GROUPINGS = {"blocks": "rgft_blocks", "heads": "rgft_heads", "mix": "rgft_mix"}
# Flags of the fine-tuning study that mean nothing here.
_NOT_HERE = ("methods", "lr_grid", "tune_seeds", "tune_budget")


@dataclasses.dataclass(frozen=True)
class AblateConfig(finetune.Config):
  """The study's settings (the defaults every row starts from) and the grids."""

  methods: str = "full,rgft_blocks,rgft_heads,rgft_mix"  # Methods the rows use.
  learning_rate: float = 1e-3  # Adam's rate of every row (but learning_rate's).
  seeds: int = 5
  eval_every: int = 0
  workdir: str = "workdir/ablate"
  ablations: str = ",".join(ABLATIONS)  # Which ablations to run, comma-separated.
  # error_method ablation: the attributions compared.
  error_methods: str = "norm_product,taylor,ablation,random,shuffled"
  # threshold ablation: thresh_init:thresh_final pairs.
  thresholds: str = "0.1:0.3,0.1:0.6,0.3:0.9,0.5:1.0"
  warmups: str = "50,100,200"  # warmup ablation: --warmup_steps values.
  batch_sizes: str = "32,64,128"  # batch_size ablation (full and rgft_blocks).
  lr_values: str = "3e-4,1e-3,3e-3,1e-2"  # learning_rate ablation (same two).
  groupings: str = "blocks,heads,mix"  # grouping ablation (mix: heads + MLPs).
  levers: str = ",".join(LEVERS)  # levers ablation: which rows (see LEVERS).
  lever_budget: float = 0.5  # levers ablation: the budget b, of a full step.

  def names(self) -> list[str]:
    names = [a for a in self.ablations.split(",") if a]
    unknown = [a for a in names if a not in ABLATIONS]
    if unknown or not names:
      raise ValueError(f"--ablations must name some of {ABLATIONS}, got {names}.")
    return names

  def validate(self) -> None:
    """The study's checks, then every row's settings, before any compute."""
    super().validate()
    if "levers" in self.names() and not 0.0 < self.lever_budget <= 1.0:
      raise ValueError(f"--lever_budget must be in (0, 1], got {self.lever_budget}.")
    for name in self.names():
      for row in rows(self, name):
        methods_lib.parse_name(row.method)  # A budget out of range names itself.
        finetune.Config.validate(dataclasses.replace(self, **row.overrides))


@dataclasses.dataclass(frozen=True)
class Row:
  """One setting of an ablation: a method with some settings changed."""

  label: str
  method: str
  overrides: dict[str, Any]
  x: Any  # Where the plot puts it: a number, or the label.
  reference: str  # Label of the row it is compared with (the default).


def _list(text: str, kind, flag: str) -> list:
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(
      f"--{flag} must be comma-separated values, got {text!r}."
    ) from None
  if not values:
    raise ValueError(f"--{flag} names no value.")
  if len(set(values)) != len(values):
    raise ValueError(f"--{flag} repeats a value: {values}.")
  return values


def _pair(text: str) -> tuple[float, float]:
  low, sep, high = text.partition(":")
  if not sep:
    raise ValueError(text)
  return float(low), float(high)


def _reference(labels: list[str], default: str) -> str:
  return default if default in labels else labels[0]


def rows(cfg: AblateConfig, name: str) -> list[Row]:
  """The rows of ablation `name` under `cfg` (grids parsed and checked).

  Each row is compared with the row of the default setting (the first row
  when the grid leaves the default out).
  """
  if name == "error_method":
    values = _list(cfg.error_methods, str, "error_methods")
    ref = _reference(values, cfg.error_method)
    return [Row(m, "rgft_blocks", {"error_method": m}, m, ref) for m in values]
  if name == "threshold":
    pairs = _list(cfg.thresholds, _pair, "thresholds")
    labels = [f"{a:g}:{b:g}" for a, b in pairs]
    ref = _reference(labels, f"{cfg.thresh_init:g}:{cfg.thresh_final:g}")
    return [
      Row(label, "rgft_blocks", {"thresh_init": a, "thresh_final": b}, label, ref)
      for label, (a, b) in zip(labels, pairs, strict=True)
    ]
  if name == "warmup":
    values = _list(cfg.warmups, int, "warmups")
    ref = _reference([str(w) for w in values], str(cfg.warmup_steps or cfg.steps))
    return [
      Row(str(w), "rgft_blocks", {"warmup_steps": 0 if w == cfg.steps else w}, w, ref)
      for w in values
    ]
  if name in ("batch_size", "learning_rate"):
    flag = "batch_sizes" if name == "batch_size" else "lr_values"
    values = _list(getattr(cfg, flag), int if name == "batch_size" else float, flag)
    out = []
    for m in ("full", "rgft_blocks"):
      labels = [f"{m} {v:g}" for v in values]
      ref = _reference(labels, f"{m} {getattr(cfg, name):g}")
      out += [
        Row(label, m, {name: v}, v, ref)
        for label, v in zip(labels, values, strict=True)
      ]
    return out
  if name == "levers":
    values = _list(cfg.levers, str, "levers")
    unknown = [v for v in values if v not in LEVERS]
    if unknown:
      raise ValueError(f"--levers must be some of {list(LEVERS)}, got {unknown}.")
    out = []
    for label in values:
      base, overrides = LEVERS[label]
      method = base if label == "full" else f"{base}@{cfg.lever_budget:g}"
      out.append(Row(label, method, overrides, label, _reference(values, "default")))
    return out
  values = _list(cfg.groupings, str, "groupings")
  unknown = [g for g in values if g not in GROUPINGS]
  if unknown:
    raise ValueError(f"--groupings must be some of {sorted(GROUPINGS)}, got {unknown}.")
  return [Row(g, GROUPINGS[g], {}, g, _reference(values, "blocks")) for g in values]


def _where(cfg: finetune.Config, task: str, method: str, seed: int) -> str:
  """Runs are keyed by their settings, so the same row in two ablations is one."""
  key = json.dumps(cfg.run_settings(), sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:10]
  return os.path.join(cfg.workdir, "runs", task, method, digest, f"seed{seed}")


def _stats(records: list[dict], reference: list[dict]) -> dict[str, Any]:
  """A row's summary; its difference to the reference row paired by seed
  (`compare.paired`: rows can share a method, so each is labelled here)."""
  acc = np.array([r["test_accuracy"] for r in records])
  runs = [{**r, "method": "row"} for r in records]
  diff = compare.paired(
    [*runs, *({**r, "method": "ref"} for r in reference)], "row", "ref"
  )
  assert diff is not None  # Both are labelled above.
  if len(diff["seeds"]) != len(records):
    raise ValueError(
      f"seeds {diff['seeds']} of {len(records)} runs have a reference run."
    )
  mean, half = diff["mean"], diff["ci95"]
  flops = float(np.mean([r["train_flops"] for r in records]))
  return {
    "test_accuracy": acc.tolist(),
    "accuracy_mean": float(acc.mean()),
    "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
    "diff_vs_reference": mean,
    "diff_ci95": half,
    "update_ratio": float(np.mean([r["update_ratio"] for r in records])),
    "train_flops": flops,
    "flops_vs_reference": flops / np.mean([r["train_flops"] for r in reference]),
    "wall_s": float(np.mean([r["wall_s"] for r in records])),
  }


def run_ablation(cfg: AblateConfig, name: str, tasks) -> dict[str, Any]:
  """Every row of ablation `name` on every task and seed; its table's data.

  A row's compiled steps are shared by its seeds and dropped after them: kept
  for every row, a levers ablation's compiled variants once used up the
  process's memory mappings and XLA could no longer compile."""
  table = rows(cfg, name)
  out = {"ablation": name, "rows": []}
  for task in tasks:
    records = {}
    for row in table:
      at = dataclasses.replace(cfg, **row.overrides)
      variants: dict = {}
      records[row.label] = [
        finetune.one_run(
          at,
          task,
          row.method,
          seed,
          variants,
          where=_where(at, task.name, row.method, seed),
        )
        for seed in range(cfg.seeds)
      ]
    for row in table:
      out["rows"].append(
        {
          "task": task.name,
          "label": row.label,
          "method": row.method,
          "overrides": row.overrides,
          "x": row.x,
          "reference": row.reference,
          **_stats(records[row.label], records[row.reference]),
        }
      )
  return out


def _ci(r: dict[str, Any]) -> str:
  if r["label"] == r["reference"]:
    return "reference"
  half = "n/a" if not np.isfinite(r["diff_ci95"]) else f"{r['diff_ci95'] * 100:.1f}"
  return f"{r['diff_vs_reference'] * 100:+.1f} pt (± {half})"


def markdown(result: dict[str, Any]) -> str:
  lines = [
    f"### {result['ablation']}",
    "",
    "| task | setting | method | test acc (mean ± sd) | vs reference, paired (95% CI) "
    "| update ratio | FLOPs vs reference | wall s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['task']} | {r['label']} | {r['method']} | {r['accuracy_mean']:.3f} ± "
      f"{r['accuracy_std']:.3f} | {_ci(r)} | {r['update_ratio']:.3f} | "
      f"{r['flops_vs_reference']:.3f} | {r['wall_s']:.1f} |"
    )
  return "\n".join([*lines, ""])


def plot(result: dict[str, Any], path: str) -> None:
  """Test accuracy (mean ± sd over seeds) per setting, one panel per task."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in result["rows"]))
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
  numeric = all(isinstance(r["x"], int | float) for r in result["rows"])
  for ax, task in zip(axes[0], tasks, strict=True):
    rs = [r for r in result["rows"] if r["task"] == task]
    for method in dict.fromkeys(r["method"] for r in rs):
      mine = [r for r in rs if r["method"] == method]
      xs = [r["x"] if numeric else r["label"] for r in mine]
      ax.errorbar(
        xs,
        [r["accuracy_mean"] for r in mine],
        yerr=[r["accuracy_std"] for r in mine],
        marker="o",
        capsize=3,
        linestyle="-" if numeric else "none",
        label=method,
      )
    if numeric and result["ablation"] in ("learning_rate", "batch_size"):
      ax.set_xscale("log")
    ax.set_title(f"{task}: {result['ablation']}")
    ax.set_xlabel(result["ablation"])
    ax.set_ylabel("test accuracy (mean ± sd over seeds)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def ablate(cfg: AblateConfig) -> dict[str, Any]:
  """Runs the ablations; writes `<workdir>/ablations/<name>.{md,json,png}`."""
  tic = time.perf_counter()
  where = os.path.join(cfg.workdir, "ablations")
  os.makedirs(where, exist_ok=True)
  found = finetune.study_tasks(cfg)
  for name in cfg.names():  # Every batch size a row trains with.
    for row in rows(cfg, name):
      finetune.check_sizes(dataclasses.replace(cfg, **row.overrides), found)
  budgeted = any(
    methods_lib.parse_name(row.method)[1] is not None
    for name in cfg.names()
    for row in rows(cfg, name)
  )
  tasks = [
    finetune.prepare(cfg, n, source, target, costs=budgeted)
    for n, source, target in found
  ]
  for task in tasks:  # Budgets below a task's floor, before any run.
    for name in cfg.names():
      for row in rows(cfg, name):
        at = dataclasses.replace(cfg, **row.overrides)
        why = methods_lib.infeasible(row.method, task.costs, at)
        if why:
          raise ValueError(f"{task.name}: {row.method} cannot run: {why}.")
  out = {}
  for name in cfg.names():
    result = run_ablation(cfg, name, tasks)
    result["config"] = dataclasses.asdict(cfg)
    store.save_json(os.path.join(where, f"{name}.json"), result)
    with open(os.path.join(where, f"{name}.md"), "w") as f:
      f.write(markdown(result))
    plot(result, os.path.join(where, f"{name}.png"))
    out[name] = result
    print(markdown(result))
  seconds = time.perf_counter() - tic
  print(f"ablations in {where} ({seconds:.0f} s)")
  store.save_json(os.path.join(where, "time.json"), {"seconds": seconds})
  return out


def get_config(arg: str = "") -> AblateConfig:
  """The ablations' settings: `""` the defaults, `"quick"` a smoke run's (a
  tiny model, few steps, one seed, two values per grid)."""
  configs.check_arg(arg)
  if arg == "quick":
    return AblateConfig(
      tasks="label_shift",
      seeds=1,
      size="mu",
      pretrained="train",  # The shipped source models are ViT-xs.
      steps=6,
      pretrain_steps=6,
      batch_size=16,
      pretrain_batch_size=16,
      log_every=3,
      thresholds="0.1:0.3,0.5:1.0",
      warmups="3,6",
      batch_sizes="8,16",
      lr_values="1e-3,3e-3",
      levers="default,hard,full,full@b",
      lever_budget=0.7,  # 0.5 is below the floor of the quick model.
      progress=False,
    )
  return AblateConfig()


def parse(argv: list[str]) -> AblateConfig:
  """The config of `argv` (`cli.parse`: `--config`, then the flags given)."""
  cfg = cli.parse(get_config, argv, __doc__.split("\n\n")[0], exclude=_NOT_HERE)
  return dataclasses.replace(cfg, workdir=os.path.expanduser(cfg.workdir))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse(sys.argv[1:] if argv is None else argv)
  cfg.validate()
  with store.lock(cfg.workdir):
    return ablate(cfg)


if __name__ == "__main__":
  main()
