"""The study's summaries, tables and plots, from the runs' records."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from experiments import compare
from experiments import methods as methods_lib
from experiments.vit import short_name


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
      "learning_rate": rs[0].get("settings", {}).get("learning_rate"),
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
  compare.versus_peers(
    runs,
    out,
    key="test_accuracy",
    mean="accuracy_mean",
    higher_is_better=True,
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
      "| method | steps | LR | test acc (mean ± sd) | vs full, paired (95% CI) | "
      "vs best peer at its budget, paired (95% CI) | source "
      "acc after (forgetting) | FLOPs vs full | FLOPs to reach full - 0.5 pt | wall s "
      "| time vs full | time / FLOPs vs full | peak MiB | update ratio | step "
      "variants (compiled) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in info["summary"].items():
      diff = s.get("diff_vs_full")
      paired = (
        "n/a"
        if diff is None or name == "full"
        else f"{diff * 100:+.1f} pt (± {_fmt(s['diff_ci95'] * 100, '.1f')})"
      )
      lines.append(
        f"| {name} | {s['steps']} | {_rate(s.get('learning_rate'))} | "
        f"{s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} | "
        f"{paired} | {_peer(s)} | {_source(s)} | "
        f"{_fmt(s.get('flops_vs_full'), '.3f')} | "
        f"{_fmt(s.get('flops_to_reach_vs_full'), '.3f')} | "
        f"{s['wall_s']:.1f} | {_fmt(s.get('time_vs_full'), '.2f')} | "
        f"{_fmt(s.get('time_per_flop_vs_full'), '.2f')} | "
        f"{s['peak_bytes'] / 2**20:.1f} | {s['update_ratio']:.3f} | "
        f"{s['step_variants']} ({s['compilations']}) |"
      )
    for name, why in info.get("infeasible", {}).items():
      lines.append(f"| {name} | not run: {why} |" + " |" * 13)
    lines.append("")
    lines += head_to_head_markdown(info["runs"])
    lines += tuning_markdown(task, info.get("tuning", {}))
  return "\n".join(lines)


def _peer(s: dict[str, Any]) -> str:
  """`-1.2 pt (± 0.8) vs dropbp@0.5`, or n/a."""
  if "best_peer" not in s:
    return "n/a"
  half = _fmt(s["diff_vs_best_peer_ci95"] * 100, ".1f")
  return f"{s['diff_vs_best_peer'] * 100:+.1f} pt (± {half}) vs {s['best_peer']}"


def _points(p: dict[str, Any]) -> str:
  return f"{p['mean'] * 100:+.1f} pt (± {_fmt(p['ci95'] * 100, '.1f')})"


def head_to_head_markdown(
  runs: list[dict[str, Any]],
  key: str = "test_accuracy",
  cell=_points,
  what: str = "test accuracy",
  method: str = "rgft_budget",
) -> list[str]:
  """Lines of a table: `method` minus each other method at the same budget in
  `key` (`cell` formats a `compare.paired` result), paired over seeds (95%
  CI), one column per budget; none without budgets."""
  names = list(dict.fromkeys(r["method"] for r in runs))
  table = compare.head_to_head(runs, names, method, key)
  if not table:
    return []
  budgets = sorted({b for cells in table.values() for b in cells})
  lines = [
    f"{method} minus each method at the same budget, {what}, paired over "
    'seeds (95% CI); "full" is full fine-tuning given the same FLOPs:',
    "",
    "| against | " + " | ".join(f"@{b:g}" for b in budgets) + " |",
    "|---|" + "---|" * len(budgets),
  ]
  for other, cells in table.items():
    row = ["n/a" if b not in cells else cell(cells[b]) for b in budgets]
    lines.append(f"| {other} | " + " | ".join(row) + " |")
  return [*lines, ""]


def _rate(x: float | None) -> str:
  return "n/a" if x is None else f"{x:g}"


def tuning_markdown(task: str, tuning: dict[str, Any]) -> list[str]:
  """Validation accuracy at each rate of the grid, per method; the chosen in bold."""
  tuned = {
    n: t for n, t in tuning.items() if t.get("val_accuracy") and "tuned_as" not in t
  }
  if not tuned:
    return []
  reused = sorted({t["tuned_as"] for t in tuning.values() if "tuned_as" in t})
  grid = sorted({r for t in tuned.values() for r in t["grid"]})
  lines = [
    f"#### {task}: learning-rate tuning (validation accuracy, mean over "
    f"{len(next(iter(tuned.values()))['seeds'])} tuning seed(s))",
    "",
    "| method | " + " | ".join(_rate(r) for r in grid) + " | chosen |",
    "|---|" + "---|" * (len(grid) + 1),
  ]
  for name, t in tuned.items():
    cells = []
    for r in grid:
      if r not in t["grid"]:
        cells.append("n/a")
        continue
      v = f"{t['val_accuracy_mean'][t['grid'].index(r)]:.3f}"
      cells.append(f"**{v}**" if r == t["chosen"] else v)
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {_rate(t['chosen'])} |")
  if reused:
    lines += [
      "",
      f"The same methods at the other budgets run at the rate chosen for "
      f"{', '.join(reused)} (--tune_budget).",
    ]
  return [*lines, ""]


def figure_saver(where: str):
  """`(save, files)`: `save(fig, name)` writes `fig` to `where/name` (PNG),
  closes it and appends the path to `files`."""
  import matplotlib.pyplot as plt

  os.makedirs(where, exist_ok=True)
  files: list[str] = []

  def save(fig, name: str) -> None:
    path = os.path.join(where, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(path)

  return save, files


def plots(results: dict[str, Any], where: str) -> list[str]:
  """Error map heat maps, alpha distributions and accuracy against FLOPs."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from rgft_jax import viz

  save, files = figure_saver(where)

  for task, info in results["tasks"].items():
    for r in info["runs"]:
      if r["seed"] != 0 or not r["history"]["alpha"]:
        continue
      h = r["history"]
      fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
      viz.error_map_heatmap(
        h["error_map"], h["step"], r["components"], ax=axes[0], label=short_name
      )
      axes[0].set_title(f"{task}, {r['method']}: EMA error map / max")
      viz.alpha_distribution(h["alpha"], h["step"], ax=axes[1])
      axes[1].set_title("multipliers across components")
      save(fig, f"{task}_{r['method']}_error_map.png")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    bases = list(methods_lib.REGISTRY)
    colors = plt.get_cmap("tab20")
    # Colour by method, marker and line by budget (none, 0.3, 0.5, 0.7, other).
    looks = {None: ("o", "-"), 0.3: ("v", ":"), 0.5: ("s", "--"), 0.7: ("D", "-.")}
    for name, s in info["summary"].items():
      base, budget = methods_lib.parse_name(name)
      color = colors(bases.index(base) % 20)
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
    tuned = {n: t for n, t in info.get("tuning", {}).items() if t.get("val_accuracy")}
    if tuned:
      fig, ax = plt.subplots(figsize=(7, 4.5))
      for i, (name, t) in enumerate(tuned.items()):
        ax.plot(t["grid"], t["val_accuracy_mean"], marker="o", color=colors(i % 20))
        ax.plot([t["chosen"]], [max(t["val_accuracy_mean"])], "k*", markersize=9)
        ax.annotate(name, (t["grid"][-1], t["val_accuracy_mean"][-1]), fontsize=7)
      ax.set_xscale("log")
      ax.set_xlabel("learning rate")
      ax.set_ylabel("validation accuracy (mean over tuning seeds)")
      ax.set_title(f"{task}: learning-rate tuning (star: chosen)")
      save(fig, f"{task}_lr_tuning.png")
  return files
