"""The results tables of README.md and docs/, generated from the committed JSON.

A table in a Markdown file sits between two markers,

    <!-- table:NAME -->
    | ... |
    <!-- /table -->

and `TABLES[NAME]` makes its rows from `experiments/results/**.json`,
`benchmarks/results/*.json`, the shipped checkpoints' `checkpoints/*.json`
or the method registry (`methods`), so a table cannot say what its data does not.

    python -m tools.doc_tables          # rewrite every table in place
    python -m tools.doc_tables --check  # exit 1 naming each table that differs
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/*.md")
_BLOCK = re.compile(
  r"(?P<open><!-- table:(?P<name>[\w.@-]+) -->\n)(?P<body>.*?)(?P<close><!-- /table -->)",
  re.S,
)
TASKS = {"label_shift": "label shift", "input_shift": "input shift"}
MIB = 2**20


@functools.cache
def load(path: str) -> Any:
  """The JSON file at `path`, relative to the repository root."""
  return json.loads((ROOT / path).read_text())


def _row(cells: list[Any]) -> str:
  return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def _table(head: list[str], rows: list[list[Any]]) -> str:
  lines = [_row(head), "|" + "---|" * len(head), *(_row(r) for r in rows)]
  return "\n".join(lines)


def _pt(s: dict[str, Any], diff: str = "diff_vs_full", ci: str = "diff_ci95") -> str:
  """A paired accuracy difference in points with its 95% interval."""
  return f"{s[diff] * 100:+.1f} pt (± {s[ci] * 100:.1f})"


def _acc(mean: float, std: float) -> str:
  return f"{mean:.3f} ± {std:.3f}"


def _f(x: float | None, spec: str) -> str:
  return "n/a" if x is None else format(x, spec)


# The fine-tuning study (experiments.finetune) ------------------------------


def vit_summary(path: str = "experiments/results/results.json") -> str:
  """Both tasks of a default run side by side: the README's table."""
  tasks = load(path)["tasks"]
  label, inp = tasks["label_shift"]["summary"], tasks["input_shift"]["summary"]
  rows = []
  for name, a in label.items():
    b = inp[name]
    rows.append(
      [
        f"`{name}`",
        f"{(a['flops_vs_full'] + b['flops_vs_full']) / 2:.3f}",
        f"{max(a['peak_bytes'], b['peak_bytes']) / MIB:.1f}",
        _acc(a["accuracy_mean"], a["accuracy_std"]),
        "" if name == "full" else _pt(a),
        _acc(b["accuracy_mean"], b["accuracy_std"]),
        "" if name == "full" else _pt(b),
      ]
    )
  head = [
    "method",
    "FLOPs vs full",
    "peak MiB",
    "label shift acc",
    "vs full (95% CI)",
    "input shift acc",
    "vs full (95% CI)",
  ]
  return _table(head, rows)


def vit_default(task: str, path: str = "experiments/results/results.json") -> str:
  """Every column of one task of a default run."""
  summary = load(path)["tasks"][task]["summary"]
  rows = []
  for name, s in summary.items():
    rows.append(
      [
        name,
        s["steps"],
        _acc(s["accuracy_mean"], s["accuracy_std"]),
        "n/a" if name == "full" else _pt(s),
        _acc(s["source_accuracy_mean"], s["source_accuracy_std"]),
        f"{s['flops_vs_full']:.3f}",
        _f(s.get("flops_to_reach_vs_full"), ".3f"),
        f"{s['wall_s']:.1f}",
        f"{s['time_vs_full']:.2f}",
        f"{s['time_per_flop_vs_full']:.2f}",
        f"{s['peak_bytes'] / MIB:.1f}",
        f"{s['update_ratio']:.3f}",
        f"{s['step_variants']} ({s['compilations']})",
      ]
    )
  head = [
    "method",
    "steps",
    "test acc (mean ± sd)",
    "vs full, paired (95% CI)",
    "source acc after (forgetting)",
    "FLOPs vs full",
    "FLOPs to reach full - 0.5 pt",
    "wall s",
    "time vs full",
    "time / FLOPs vs full",
    "peak MiB",
    "update ratio",
    "step variants (compiled)",
  ]
  return _table(head, rows)


def vit_all(task: str) -> str:
  """Every method at every budget, by FLOPs; budgets below the floor last."""
  info = load("experiments/results/all/results.json")["tasks"][task]
  summary = sorted(info["summary"].items(), key=lambda kv: -kv[1]["flops_vs_full"])
  rows: list[list[Any]] = [
    [
      name,
      s["steps"],
      _acc(s["accuracy_mean"], s["accuracy_std"]),
      "n/a" if name == "full" else _pt(s),
      f"{s['source_accuracy_mean']:.3f}",
      f"{s['flops_vs_full']:.3f}",
      f"{s['peak_bytes'] / MIB:.1f}",
    ]
    for name, s in summary
  ]
  rows += [
    [name, f"not run: {why}", "", "", "", "", ""]
    for name, why in info["infeasible"].items()
  ]
  head = [
    "method",
    "steps",
    "test acc (mean ± sd)",
    "vs full, paired (95% CI)",
    "source acc after",
    "FLOPs vs full",
    "peak MiB",
  ]
  return _table(head, rows)


def vit_fair(task: str) -> str:
  """The fair study: each method at its tuned learning rate."""
  summary = load("experiments/results/fair/results.json")["tasks"][task]["summary"]
  rows = [
    [
      name,
      f"{s['learning_rate']:g}",
      _acc(s["accuracy_mean"], s["accuracy_std"]),
      "n/a" if name == "full" else _pt(s),
      _acc(s["source_accuracy_mean"], s["source_accuracy_std"]),
      f"{s['flops_vs_full']:.3f}",
      f"{s['update_ratio']:.3f}",
    ]
    for name, s in summary.items()
  ]
  head = [
    "method",
    "LR",
    "test acc (mean ± sd)",
    "vs full, paired (95% CI)",
    "source acc after",
    "FLOPs vs full",
    "update ratio",
  ]
  return _table(head, rows)


def vit_plateau() -> str:
  """The shipped source models (experiments.vit_plateau), next to the default's
  400-step pretraining."""
  default = load("experiments/results/results.json")["tasks"]
  rows = []
  for task, label in TASKS.items():
    r = load(f"checkpoints/vit_{task}_plateau.json")
    minutes, seconds = divmod(round(r["wall_time_s"]), 60)
    rows.append(
      [
        label,
        f"{r['steps']:,} ({r['stopped'].replace('_', ' ')})",
        f"{r['best_val_accuracy']:.3f} (step {r['best_step']:,})",
        f"{r['source_test_accuracy']:.3f}",
        f"{default[task]['pretrain_accuracy']:.3f}",
        f"{minutes} min {seconds:02d} s",
        f"`{r['sha256'][:12]}`",
      ]
    )
  head = [
    "task",
    "steps (why it stopped)",
    "best validation accuracy",
    "source test accuracy",
    "source test, 400-step default",
    "wall time",
    "SHA-256",
  ]
  return _table(head, rows)


def vit_plateau_curve(every: int = 1000) -> str:
  """Validation accuracy every `every` steps, at each run's best and last step."""
  records = {t: load(f"checkpoints/vit_{t}_plateau.json") for t in TASKS}
  curves = {t: dict(map(tuple, r["val_curve"])) for t, r in records.items()}
  marked = {r["best_step"] for r in records.values()} | {
    r["steps"] for r in records.values()
  }
  steps = sorted({s for c in curves.values() for s in c if s % every == 0} | marked)
  rows = [
    [f"{s:,}", *(f"{curves[t][s]:.3f}" if s in curves[t] else "" for t in TASKS)]
    for s in steps
  ]
  return _table(["step", *(f"{label} validation" for label in TASKS.values())], rows)


LM_PLATEAU = "checkpoints/lm_plateau.json"


def lm_plateau() -> str:
  """The shipped decoder (experiments.lm.plateau): how long, where it stopped,
  its best validation and its test bits per byte."""
  r = load(LM_PLATEAU)
  hours, rest = divmod(round(r["wall_s"]), 3600)
  stopped = r["stopped"]
  row = [
    f"{r['parameters'] / 1e6:.2f}M",
    f"{stopped['step']:,} ({stopped['by'].replace('_', ' ')}; cooldown from "
    f"{stopped['cooldown_start']:,})",
    f"{r['best']['bits_per_byte']:.4f} (step {r['best']['step']:,})",
    f"{r['test_bits_per_byte']['bits_per_byte']:.4f}",
    f"{hours} h {rest // 60:02d} min",
    f"`{r['sha256'][:12]}`",
  ]
  head = [
    "parameters",
    "steps (why it stopped)",
    "best validation bits/byte",
    "test bits/byte",
    "wall time",
    "SHA-256",
  ]
  return _table(head, [row])


def lm_plateau_curve(every: int = 600) -> str:
  """Validation bits per byte every `every` steps and at the best and last
  evaluation, as one row."""
  r = load(LM_PLATEAU)
  curve = dict(map(tuple, r["curve"]))
  last = max(curve)
  steps = sorted({t for t in curve if t % every == 0} | {r["best"]["step"], last})
  return _table(
    ["step", *(f"{t:,}" for t in steps)],
    [["validation bits/byte", *(f"{curve[t]:.3f}" for t in steps)]],
  )


def ablation(path: str, reference: str = "default", same: str = "default") -> str:
  """One ablation, both tasks side by side; the update ratio and FLOPs are
  the means over the tasks. `reference` heads the difference columns and
  `same` fills them on the reference row."""
  rows_of = load(path)["rows"]
  labels = list(dict.fromkeys(r["label"] for r in rows_of))
  by = {(r["task"], r["label"]): r for r in rows_of}
  rows = []
  for label in labels:
    pair = [by[(t, label)] for t in TASKS]
    cells: list[Any] = [label]
    for r in pair:
      cells.append(_acc(r["accuracy_mean"], r["accuracy_std"]))
      ref = r["label"] == r["reference"]
      cells.append(same if ref else _pt(r, "diff_vs_reference"))
    cells.append(f"{sum(r['update_ratio'] for r in pair) / 2:.2f}")
    cells.append(f"{sum(r['flops_vs_reference'] for r in pair) / 2:.2f}")
    rows.append(cells)
  head = ["setting"]
  for t in TASKS.values():
    head += [f"{t} acc", f"vs {reference}"]
  head += ["update ratio", "FLOPs vs default"]
  return _table(head, rows)


def vit_scan(task: str) -> str:
  """The default run looped and with `--scan`, one after the other on one
  machine: accuracy, the paired difference scan - loop over seeds, costs and
  compilations."""
  import numpy as np

  from experiments import compare

  loop = load("experiments/results/scan/loop/results.json")["tasks"][task]
  scan = load("experiments/results/scan/scan/results.json")["tasks"][task]
  rows = []
  for name, a in loop["summary"].items():
    b = scan["summary"].get(name)
    if b is None:
      why = scan["infeasible"].get(name, "not run")
      rows.append(
        [name, _acc(a["accuracy_mean"], a["accuracy_std"]), f"not run: {why}"]
      )
      rows[-1] += [""] * 7
      continue
    by = {
      (r["method"], r["seed"]): r["test_accuracy"]
      for r in loop["runs"]
      + [dict(r, method=r["method"] + "/scan") for r in scan["runs"]]
    }
    seeds = sorted(s for m, s in by if m == name and (name + "/scan", s) in by)
    diffs = np.array([by[name + "/scan", s] - by[name, s] for s in seeds])
    mean, half = compare.interval(diffs)
    rows.append(
      [
        name,
        _acc(a["accuracy_mean"], a["accuracy_std"]),
        _acc(b["accuracy_mean"], b["accuracy_std"]),
        f"{mean * 100:+.1f} pt (± {half * 100:.1f})",
        f"{a['flops_vs_full']:.3f} / {b['flops_vs_full']:.3f}",
        f"{a['time_vs_full']:.2f} / {b['time_vs_full']:.2f}",
        f"{a['time_per_flop_vs_full']:.2f} / {b['time_per_flop_vs_full']:.2f}",
        f"{a['peak_bytes'] / MIB:.1f} / {b['peak_bytes'] / MIB:.1f}",
        f"{a['compilations']} / {b['compilations']}",
      ]
    )
  head = [
    "method",
    "test acc, loop",
    "test acc, scan",
    "scan - loop, paired (95% CI)",
    "FLOPs vs full (loop / scan)",
    "time vs full (loop / scan)",
    "time / FLOPs vs full (loop / scan)",
    "peak MiB (loop / scan)",
    "compilations (loop / scan)",
  ]
  return _table(head, rows)


# The language-model study (experiments.lm) ---------------------------------


def lm(path: str = "experiments/results/lm/results.json") -> str:
  """Bits per byte, forgetting and cost of every method."""
  summary = load(path)["summary"]
  rows = [
    [
      name,
      f"{s['learning_rate']:g}",
      f"{s['test_bpb_mean']:.4f} ± {s['test_bpb_std']:.4f}",
      "" if name == "full" else f"{s['diff_vs_full']:+.4f} (± {s['diff_ci95']:.4f})",
      f"{s['source_bpb_mean']:.4f} ± {s['source_bpb_std']:.4f}",
      f"{s['flops_vs_full']:.3f}",
      f"{s['time_vs_full']:.2f}",
      f"{s['peak_bytes'] / MIB:.1f}",
    ]
    for name, s in summary.items()
  ]
  head = [
    "method",
    "lr",
    "target test bpb",
    "vs full, paired (95% CI)",
    "source test bpb after",
    "FLOPs vs full",
    "time vs full",
    "peak MiB",
  ]
  return _table(head, rows)


# Benchmarks (benchmarks/*.py) ------------------------------------------------


def bench_update() -> str:
  r = load("benchmarks/results/update.json")
  rows = [
    ["`optax.adam`", f"{r['median_s']['adam'] * 1e3:.1f}"],
    ["`rgft_jax.rgft`", f"{r['median_s']['rgft'] * 1e3:.1f}"],
    ["ratio", f"{r['ratio']:.3f}"],
  ]
  return _table(["update", "median ms"], rows)


def bench_hold() -> str:
  """The optimizer's part of a runtime-gated step, held blocks masked or skipped."""
  r = load("benchmarks/results/hold.json")
  rows = [
    [
      row.get("layout", "loop"),
      f"`{row['optimizer']}`",
      f"{row['held']:g}",
      f"{row['median_s']['plain'] * 1e3:.0f}",
      f"{row['vs_plain']['masked']:.2f}",
      f"{row['vs_plain']['skipped']:.2f}",
    ]
    for row in r["rows"]
  ]
  head = [
    "layout",
    "optimizer",
    "blocks held",
    "plain ms",
    'hold="mask"',
    'hold="skip"',
  ]
  return _table(head, rows)


TRACKER_STEPS = {
  "plain": "plain Adam",
  "rgft_branches": "RGFT, block branches (24 components)",
  "rgft_heads": "RGFT, heads (36 components)",
}


def bench_tracker_step() -> str:
  r = load("benchmarks/results/tracker.json")
  rows = [
    [
      label,
      f"{r['flops'][k] / 1e9:.3f}",
      f"{r['flops_ratio'][k]:.4f}",
      f"{r['median_s'][k] * 1e3:.1f}",
      f"{r['time_ratio'][k]:.3f}",
    ]
    for k, label in TRACKER_STEPS.items()
  ]
  return _table(["step", "GFLOPs", "FLOPs vs plain", "ms", "time vs plain"], rows)


def bench_tracker_faithfulness() -> str:
  r = load("benchmarks/results/tracker.json")["faithfulness"]
  rows = [
    [
      label,
      s["components"],
      f"{s['spearman_norm_product_vs_abs_ablation']:.3f}",
      f"{s['spearman_taylor_vs_abs_ablation']:.3f}",
      f"{s['spearman_norm_product_vs_ablation']:.3f}",
    ]
    for label, s in (("block branches", r["branches"]), ("heads", r["heads"]))
  ]
  head = [
    "components",
    "n",
    "norm_product vs \\|ablation\\|",
    "taylor vs \\|ablation\\|",
    "norm_product vs signed ablation",
  ]
  return _table(head, rows)


def _sparse_label(v: dict[str, Any]) -> str:
  if v["budget"] is None or not v["detached"]:
    return v["variant"]
  if v["trained_branches"] == 0:
    return "every branch detached (the floor)"
  kinds = [name.rsplit("/", 1)[-1] for name in v["detached"]]
  parts = [
    f"{kinds.count(k)} {word}"
    for k, word in (("attn", "attention"), ("mlp", "MLP"))
    if k in kinds
  ]
  s = "es" if len(v["detached"]) > 1 else ""
  return f"{v['variant']}: {' + '.join(parts)} branch{s} detached"


def bench_sparse() -> str:
  r = load("benchmarks/results/sparse.json")["branches"]
  plain = r["plain"]
  rows = [
    [
      "plain Adam step (no tracking)",
      r["components"],
      f"{plain['compiled_flops'] / 1e9:.1f}",
      "1.000",
      f"{plain['peak_bytes'] / MIB:.0f}",
      "1.000",
    ]
  ]
  for v in r["variants"]:
    rows.append(
      [
        _sparse_label(v),
        v["trained_branches"],
        f"{v['compiled_flops'] / 1e9:.1f}",
        f"{v['vs_plain']:.3f}",
        f"{v['peak_bytes'] / MIB:.0f}",
        f"{v['peak_vs_plain']:.3f}",
      ]
    )
  head = ["step", "branches trained", "GFLOPs", "vs plain", "peak MiB", "vs plain"]
  return _table(head, rows)


RUNTIME_MODES = ("runtime", "recompute", "compiled")


def bench_runtime() -> str:
  """Every row of `bench_runtime`; runs since `hold="skip"` became the
  default also time `hold="mask"` (`runtime_mask`, time only)."""
  r = load("benchmarks/results/runtime.json")
  masked = any(x["mode"] == "runtime_mask" for c in r["cases"] for x in c["rows"])
  rows = []
  for case in r["cases"]:
    by = {(x["mode"], x["fraction_detached"]): x for x in case["rows"]}
    for f in sorted({f for _, f in by}):
      cells = [by[(m, f)] for m in RUNTIME_MODES]
      mask = [f"{by[('runtime_mask', f)]['time_vs_plain']:.2f}"] if masked else []
      rows.append(
        [
          case["case"],
          f"{f:g}",
          f"{cells[0]['predicted_flops_vs_full']:.2f}",
          f"{cells[0]['time_vs_plain']:.2f}",
          *mask,
          *(f"{c['time_vs_plain']:.2f}" for c in cells[1:]),
          *(f"{c['peak_vs_plain']:.2f}" for c in cells),
        ]
      )
  head = [
    "model",
    "detached",
    "FLOPs vs full",
    "time: runtime",
    *(["hold=mask"] if masked else []),
    "recompute",
    "compiled",
    "peak: runtime",
    "recompute",
    "compiled",
  ]
  return _table(head, rows)


def bench_runtime_targets(at: float = 0.75) -> str:
  """The README's view of `bench_runtime`: the issue's targets, per model."""
  r = load("benchmarks/results/runtime.json")
  rows = []
  for case in r["cases"]:
    by = {(x["mode"], x["fraction_detached"]): x for x in case["rows"]}
    half = by[("runtime", at)]
    rows.append(
      [
        case["case"],
        f"{by[('runtime', 0.0)]['time_vs_plain']:.2f}",
        f"{half['predicted_flops_vs_full']:.2f}",
        f"{half['time_vs_plain']:.2f}",
        f"{by[('compiled', at)]['time_vs_plain']:.2f}",
        f"{by[('recompute', at)]['peak_vs_plain']:.2f}",
      ]
    )
  head = [
    "model",
    "runtime, none detached",
    f"FLOPs, {at:g} detached",
    "time: runtime",
    "compiled",
    "peak: recompute",
  ]
  return _table(head, rows)


# The peers study (--methods peers) --------------------------------------


def _vs_peer(s: dict[str, Any], points: bool) -> str:
  if "best_peer" not in s:
    return "n/a"
  d, ci = s["diff_vs_best_peer"], s["diff_vs_best_peer_ci95"]
  text = f"{d * 100:+.1f} pt (± {ci * 100:.1f})" if points else f"{d:+.4f} (± {ci:.4f})"
  return f"{text} vs {s['best_peer']}"


def vit_peers(task: str, path: str) -> str:
  """One task of a ViT peers study: every method with its tuned rate,
  accuracy, differences to full and to the best peer at its budget, costs."""
  summary = load(path)["tasks"][task]["summary"]
  rows = [
    [
      name,
      f"{s['learning_rate']:g}",
      _acc(s["accuracy_mean"], s["accuracy_std"]),
      "n/a" if name == "full" else _pt(s),
      _vs_peer(s, points=True),
      _acc(s["source_accuracy_mean"], s["source_accuracy_std"]),
      f"{s['flops_vs_full']:.3f}",
      _f(s.get("flops_to_reach_vs_full"), ".3f"),
      f"{s['time_vs_full']:.2f}",
      f"{s['peak_bytes'] / MIB:.1f}",
    ]
    for name, s in summary.items()
  ]
  head = [
    "method",
    "LR",
    "test acc (mean ± sd)",
    "vs full, paired (95% CI)",
    "vs best peer at its budget",
    "source acc after",
    "FLOPs vs full",
    "FLOPs to reach full - 0.5 pt",
    "time vs full",
    "peak MiB",
  ]
  return _table(head, rows)


def head_to_head(runs: list[dict[str, Any]], key: str, points: bool) -> str:
  """Budgeted RGFT minus each method at the same budget, paired over seeds."""
  from experiments import compare  # NumPy and SciPy only.

  names = list(dict.fromkeys(r["method"] for r in runs))
  table = compare.head_to_head(runs, names, "rgft_budget", key)
  budgets = sorted({b for cells in table.values() for b in cells})

  def cell(p: dict[str, Any] | None) -> str:
    if p is None:
      return "n/a"
    if points:
      return f"{p['mean'] * 100:+.1f} pt (± {p['ci95'] * 100:.1f})"
    return f"{p['mean']:+.4f} (± {p['ci95']:.4f})"

  rows = [
    [f"`{other}`", *(cell(cells.get(b)) for b in budgets)]
    for other, cells in table.items()
  ]
  return _table(["rgft_budget minus", *(f"@{b:g}" for b in budgets)], rows)


def _peers_both(
  sets: list[tuple[str, dict[str, Any]]], key: str, mean: str, points: bool
) -> str:
  """Budgeted RGFT minus each method at each budget, one column per
  (testbed, budget), paired over seeds, ± the 95% half-width; first its own
  figure and full fine-tuning with all its steps. `sets` holds each
  testbed's label and study (`runs`, `summary`)."""
  from experiments import compare  # NumPy and SciPy only.

  cols, cells = [], {}
  for label, study in sets:
    runs = study["runs"]
    names = list(dict.fromkeys(r["method"] for r in runs))
    table = compare.head_to_head(runs, names, "rgft_budget", key)
    budgets = sorted({b for c in table.values() for b in c})
    for b in budgets:
      cols.append(f"{label} @{b:g}")
      mine = f"rgft_budget@{b:g}"
      own = study["summary"][mine][mean]
      cells[("its own", cols[-1])] = f"{own:.3f}" if points else f"{own:.4f}"
      full = compare.paired(runs, mine, "full", key)
      cells[("`full` (all steps)", cols[-1])] = _short(full, points)
      for other, per in table.items():
        row = "`full@b` (fewer steps)" if other == "full" else f"`{other}`"
        cells[(row, cols[-1])] = _short(per.get(b), points)
  rows_of = list(dict.fromkeys(r for r, _ in cells))
  rows = [[r, *(cells.get((r, c), "n/a") for c in cols)] for r in rows_of]
  return _table(["rgft_budget minus", *cols], rows)


def vit_peers_both(path: str) -> str:
  """`_peers_both` over the ViT's two tasks, in points of test accuracy."""
  tasks = load(path)["tasks"]
  sets = [(label, tasks[task]) for task, label in TASKS.items()]
  table = _peers_both(sets, "test_accuracy", "accuracy_mean", points=True)
  return table.replace("| its own |", "| its accuracy |", 1)


def lm_peers_both(paths: dict[str, str]) -> str:
  """`_peers_both` over the LM's target domains, in test bits per byte
  (lower is better: a positive difference is budgeted RGFT behind)."""
  sets = [(label, load(path)) for label, path in paths.items()]
  table = _peers_both(sets, "test_bpb", "test_bpb_mean", points=False)
  return table.replace("| its own |", "| its bits/byte |", 1)


def _short(p: dict[str, Any] | None, points: bool = True) -> str:
  """A paired difference (in points, or as it is), bold where its 95%
  interval excludes 0."""
  if p is None:
    return "n/a"
  if points:
    text = f"{p['mean'] * 100:+.1f} ± {p['ci95'] * 100:.1f}"
  else:
    text = f"{p['mean']:+.4f} ± {p['ci95']:.4f}"
  return f"**{text}**" if abs(p["mean"]) > p["ci95"] else text


def vit_peers_h2h(task: str, path: str) -> str:
  return head_to_head(load(path)["tasks"][task]["runs"], "test_accuracy", True)


def lm_peers(path: str) -> str:
  """An LM peers study: every method with its picked rate, bits per byte,
  differences to full and to the best peer at its budget, costs."""
  summary = load(path)["summary"]
  rows = [
    [
      name,
      f"{s['learning_rate']:g}",
      f"{s['test_bpb_mean']:.4f} ± {s['test_bpb_std']:.4f}",
      "n/a" if name == "full" else f"{s['diff_vs_full']:+.4f} (± {s['diff_ci95']:.4f})",
      _vs_peer(s, points=False),
      f"{s['source_bpb_mean']:.4f}",
      f"{s['flops_vs_full']:.3f}",
      f"{_f(s.get('flops_to_target'), '.3f')} ({s.get('target_reached', 'n/a')})",
      f"{s['time_vs_full']:.2f}",
      f"{s['peak_bytes'] / MIB:.1f}",
    ]
    for name, s in summary.items()
  ]
  head = [
    "method",
    "LR",
    "target test bpb (mean ± sd)",
    "vs full, paired (95% CI)",
    "vs best peer at its budget",
    "source test bpb after",
    "FLOPs vs full",
    "FLOPs to full + 0.01 (reached)",
    "time vs full",
    "peak MiB",
  ]
  return _table(head, rows)


def lm_peers_h2h(path: str) -> str:
  return head_to_head(load(path)["runs"], "test_bpb", False)


def lm_adam_count(optax_path: str, per_entry_path: str) -> str:
  """Each method of an LM study run with `--adam_count per_entry` beside the
  same method of one run with optax's count: its tuned rate in each, test
  bits/byte, per entry minus optax's count and each minus full fine-tuning
  of its own study (paired over seeds; bold where the 95% interval excludes
  0; negative is better)."""
  from experiments import compare  # NumPy and SciPy only.

  studies = {"optax": load(optax_path), "per entry": load(per_entry_path)}
  runs = [
    {**r, "method": f"{r['method']} ({label})"}
    for label, study in studies.items()
    for r in study["runs"]
  ]

  rows = []
  for name, mine in studies["per entry"]["summary"].items():
    theirs = studies["optax"]["summary"].get(name)
    if theirs is None:
      continue

    def vs(a: str, b: str) -> str:
      return _short(compare.paired(runs, a, b, "test_bpb"), points=False)

    rows.append(
      [
        name,
        f"{theirs['learning_rate']:g} / {mine['learning_rate']:g}",
        _bpb(theirs),
        _bpb(mine),
        vs(f"{name} (per entry)", f"{name} (optax)"),
        "n/a" if name == "full" else vs(f"{name} (optax)", "full (optax)"),
        "n/a" if name == "full" else vs(f"{name} (per entry)", "full (per entry)"),
      ]
    )
  head = [
    "method",
    "LR (optax / per entry)",
    "test bpb, optax's count",
    "test bpb, per entry",
    "per entry minus optax's",
    "minus full, optax's",
    "minus full, per entry",
  ]
  return _table(head, rows)


def lm_levers(
  default_path: str, levers: dict[str, str], method: str, others: tuple[str, ...]
) -> str:
  """Levers of an LM study: each its own study of `method` with settings
  changed, beside the default study's `method` and `others` (paired over
  seeds; bold where the 95% interval excludes 0; negative bits per byte is
  better). Validation bits/byte too: the split a lever should be picked on."""
  from experiments import compare  # NumPy and SciPy only.
  from experiments.lm.study import NOT_IN_SIGNATURE

  default = load(default_path)
  base = default["config"]
  runs = [r for r in default["runs"] if r["method"] in (method, *others)]
  labels = {"default": ("", default["summary"][method])}
  for label, path in levers.items():
    study = load(path)
    changed = ", ".join(
      f"{k} {v}"
      for k, v in study["config"].items()
      if k not in NOT_IN_SIGNATURE and base.get(k) != v
    )
    runs += [{**r, "method": label} for r in study["runs"] if r["method"] == method]
    labels[label] = (changed, study["summary"][method])
  rows = []
  for label, (changed, s) in labels.items():
    mine = method if label == "default" else label
    rows.append(
      [
        label,
        changed,
        f"{s['validation_bpb_mean']:.4f}",
        _bpb(s),
        *(
          _short(compare.paired(runs, mine, other, "test_bpb"), points=False)
          for other in ((method,) if label != "default" else ()) + others
        ),
      ]
    )
  rows[0][4:4] = ["default"]
  head = ["lever", "changed", "validation bpb", "test bpb", "minus default"]
  return _table(head + [f"minus {o}" for o in others], rows)


def lm_curves(studies: dict[str, str], methods: tuple[str, ...]) -> str:
  """Validation bits/byte during fine-tuning, the mean over each method's
  reported seeds, one row per (method, study)."""
  import numpy as np

  rows, steps = [], None
  for method in methods:
    for label, path in studies.items():
      curves = [r["curve"] for r in load(path)["runs"] if r["method"] == method]
      if not curves:
        continue
      steps = steps or curves[0]["step"]
      if any(c["step"] != steps for c in curves):
        raise ValueError(f"{method} in {path}: curves at other steps than {steps}.")
      mean = np.mean([c["value"] for c in curves], axis=0)
      rows.append([f"{method} ({label})", *(f"{v:.3f}" for v in mean)])
  return _table(["step", *(f"{t}" for t in steps or [])], rows)


def lm_decisions(studies: dict[str, str], method: str) -> str:
  """The components a budgeted method trained from each decision on, seed 0
  of each study, and on how many seeds every decision was the same."""
  cols, alike = {}, {}
  for label, path in studies.items():
    runs = sorted(
      (r for r in load(path)["runs"] if r["method"] == method), key=lambda r: r["seed"]
    )
    decided = [
      [(t, sorted(names)) for t, names in r["budget"]["decisions"]] for r in runs
    ]
    cols[label] = dict(decided[0])
    alike[label] = f"{sum(d == decided[0] for d in decided)}/{len(decided)}"
  steps = sorted({t for c in cols.values() for t in c})

  def names(c: dict[int, list[str]], t: int) -> str:
    return "nothing" if c.get(t) == [] else ", ".join(c.get(t, ["n/a"]))

  rows = [[f"{t}", *(names(c, t) for c in cols.values())] for t in steps]
  rows.append(["seeds deciding as seed 0", *alike.values()])
  return _table(["from step", *(f"trained ({k})" for k in cols)], rows)


def _bpb(s: dict[str, Any]) -> str:
  return f"{s['test_bpb_mean']:.4f} ± {s['test_bpb_std']:.4f}"


# The default run from the shipped plateau checkpoints.
SHIPPED = "experiments/results/shipped/results.json"
# The ViT peers study (--methods peers).
VIT_PEERS = "experiments/results/peers/results.json"
# The LM peers studies (--methods peers), by target domain.
LM_PEERS = {
  "pydoc": "experiments/results/lm_peers_pydoc/results.json",
  "cheaders": "experiments/results/lm_peers_cheaders/results.json",
}
# The pydoc peers at budget 0.5 again, every Adam counting each entry's steps.
LM_ADAM_COUNT = "experiments/results/lm_adam_count/results.json"
# Budgeted RGFT at 0.5 with the per-entry count and one setting changed.
LM_LEVERS = {
  k: f"experiments/results/lm_levers/{k}/results.json"
  for k in ("hyst05", "every50", "every75")
}


def methods() -> str:
  """Every method of the harness's one registry, what it is, where it runs."""
  from experiments import methods as _vit  # noqa: F401  Registers the ViT's.
  from experiments import registry
  from experiments.lm import methods as _lm  # noqa: F401  Registers the LM's.

  tasks = {"vit": "ViT digits", "lm": "byte-level LM"}
  budget = {"none": "", "optional": " (also @b)", "required": " (@b)"}
  rows = []
  for name, text in registry.CATALOGUE.items():
    where = []
    for task, label in tasks.items():
      view = registry.METHODS.task(task)
      if name in view:
        where.append(label + budget[view[name].budget])
    rows.append([f"`{name}`", text, ", ".join(where)])
  return _table(["method", "what it is", "runs on"], rows)


TABLES: dict[str, Callable[[], str]] = {
  "vit_summary": vit_summary,
  **{f"vit_default_{t}": functools.partial(vit_default, t) for t in TASKS},
  "vit_summary_shipped": functools.partial(vit_summary, SHIPPED),
  "vit_peers_both": functools.partial(vit_peers_both, VIT_PEERS),
  "lm_peers_both": functools.partial(lm_peers_both, LM_PEERS),
  "lm_adam_count": functools.partial(lm_adam_count, LM_PEERS["pydoc"], LM_ADAM_COUNT),
  "lm_adam_count_curves": functools.partial(
    lm_curves,
    {"optax's count": LM_PEERS["pydoc"], "per entry": LM_ADAM_COUNT},
    ("rgft_budget@0.5", "static_budget@0.5", "full"),
  ),
  "lm_adam_count_decisions": functools.partial(
    lm_decisions,
    {"optax's count": LM_PEERS["pydoc"], "per entry": LM_ADAM_COUNT},
    "rgft_budget@0.5",
  ),
  "lm_levers": functools.partial(
    lm_levers,
    LM_ADAM_COUNT,
    LM_LEVERS,
    "rgft_budget@0.5",
    (
      "full",
      "full@0.5",
      "static_budget@0.5",
      "surgical_last@0.5",
      "dropbp@0.5",
      "greentrainer@0.5",
    ),
  ),
  "lm_levers_decisions": functools.partial(lm_decisions, LM_LEVERS, "rgft_budget@0.5"),
  "lm_peers_per_entry": functools.partial(
    lm_peers_both, {"pydoc, per entry": LM_ADAM_COUNT}
  ),
  **{f"lm_peers_{t}": functools.partial(lm_peers, p) for t, p in LM_PEERS.items()},
  "vit_levers": functools.partial(ablation, "experiments/results/levers/levers.json"),
  "vit_levers_adam": functools.partial(
    ablation, "experiments/results/levers_adam/levers.json"
  ),
  **{f"vit_peers_{t}": functools.partial(vit_peers, t, VIT_PEERS) for t in TASKS},
  **{f"vit_shipped_{t}": functools.partial(vit_default, t, SHIPPED) for t in TASKS},
  **{f"vit_all_{t}": functools.partial(vit_all, t) for t in TASKS},
  **{f"vit_fair_{t}": functools.partial(vit_fair, t) for t in TASKS},
  **{
    f"ablation_{n}": functools.partial(
      ablation, f"experiments/results/ablations/{n}.json"
    )
    for n in (
      "error_method",
      "threshold",
      "warmup",
      "batch_size",
      "learning_rate",
      "grouping",
    )
  },
  "ablation_error_method_thresh_0.5_1.0": functools.partial(
    ablation,
    "experiments/results/ablations_thresh_0.5_1.0/error_method.json",
    reference="norm_product",
    same="reference",
  ),
  **{f"vit_scan_{t}": functools.partial(vit_scan, t) for t in TASKS},
  "vit_plateau": vit_plateau,
  "lm_plateau": lm_plateau,
  "lm_plateau_curve": lm_plateau_curve,
  "vit_plateau_curve": vit_plateau_curve,
  "lm": lm,
  "lm_thresh": functools.partial(lm, "experiments/results/lm_thresh/results.json"),
  "lm_b07": functools.partial(lm, "experiments/results/lm_b07/results.json"),
  "bench_update": bench_update,
  "bench_tracker_step": bench_tracker_step,
  "bench_tracker_faithfulness": bench_tracker_faithfulness,
  "bench_sparse": bench_sparse,
  "bench_runtime": bench_runtime,
  "bench_runtime_targets": bench_runtime_targets,
  "bench_hold": bench_hold,
  "methods": methods,
}


def documents(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
  return sorted({p for pattern in DOCUMENTS for p in root.glob(pattern)})


def render(text: str, where: str = "") -> str:
  """`text` with every marked table made anew; an unknown name is an error."""

  def table(m: re.Match) -> str:
    name = m["name"]
    if name not in TABLES:
      raise KeyError(f"{where}: no table {name!r}; known: {sorted(TABLES)}")
    return f"{m['open']}{TABLES[name]()}\n{m['close']}"

  return _BLOCK.sub(table, text)


def differences(root: pathlib.Path = ROOT) -> list[str]:
  """A unified diff per document whose tables differ from the data's."""
  out = []
  for path in documents(root):
    text = path.read_text()
    new = render(text, str(path.relative_to(root)))
    if new != text:
      rel = str(path.relative_to(root))
      diff = difflib.unified_diff(
        text.splitlines(), new.splitlines(), rel, f"{rel} (from the JSON)", lineterm=""
      )
      out.append("\n".join(diff))
  return out


def used(root: pathlib.Path = ROOT) -> dict[str, list[str]]:
  """Table name -> the documents that show it."""
  out: dict[str, list[str]] = {}
  for path in documents(root):
    for m in _BLOCK.finditer(path.read_text()):
      out.setdefault(m["name"], []).append(str(path.relative_to(root)))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--check", action="store_true", help="change nothing; exit 1 on a difference"
  )
  args = parser.parse_args(argv)
  if args.check:
    diffs = differences()
    for d in diffs:
      print(d)
    if diffs:
      print("\nTables differ from the JSON: run `python -m tools.doc_tables`.")
    return 1 if diffs else 0
  for path in documents():
    text = path.read_text()
    new = render(text, str(path.relative_to(ROOT)))
    if new != text:
      path.write_text(new)
      print(f"rewrote {path.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
