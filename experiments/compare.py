"""Paired differences between two methods of a study, on the seeds both ran.

  python -m experiments.compare experiments/results/results.json \\
      rgft_budget@0.5 full@0.5 [more pairs...]

prints, per task, the mean difference in test accuracy (first minus second)
with its 95% t-interval and the per-seed differences.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from experiments import store


def interval(diffs: np.ndarray) -> tuple[float, float]:
  """Mean and half-width of the 95% t-interval of paired differences."""
  if len(diffs) < 2:
    return float(diffs.mean()), float("nan")
  from scipy import stats

  half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
  return float(diffs.mean()), float(half)


def paired(
  runs: list[dict[str, Any]], a: str, b: str, key: str = "test_accuracy"
) -> dict[str, Any] | None:
  """Differences `a - b` of `key` (a run record's metric) on the seeds both
  methods ran, with the 95% t-interval's half-width (`interval`).

  None when `a` or `b` did not run; ValueError when they share no seed, or a
  seed of one method appears twice.
  """
  by: dict[str, dict[int, float]] = {}
  for r in runs:
    seeds = by.setdefault(r["method"], {})
    if r["seed"] in seeds:
      raise ValueError(f"{r['method']} has two runs of seed {r['seed']}.")
    seeds[r["seed"]] = r[key]
  if a not in by or b not in by:
    return None
  seeds = sorted(set(by[a]) & set(by[b]))
  if not seeds:
    raise ValueError(
      f"{a} and {b} share no seed ({a}: seeds {sorted(by[a])}, {b}: seeds "
      f"{sorted(by[b])}); a paired difference needs runs of the same seeds."
    )
  diffs = np.array([by[a][s] - by[b][s] for s in seeds])
  mean, half = interval(diffs)
  return {"seeds": seeds, "diffs": diffs.tolist(), "mean": mean, "ci95": half}


# The peers of budgeted RGFT (`rgft_jax.Budget` rules of the same name).
PEERS = ("dropbp", "greentrainer")
# `--methods peers` of either study: budgeted RGFT, its peers and the
# controls at each of these budgets, with the study's own baselines added.
PEER_BUDGETS = (0.4, 0.5, 0.7)
PEER_STUDY = (
  "rgft_budget",
  *PEERS,
  "shuffled_budget",
  "static_budget",
  "surgical_first",
  "surgical_last",
  "uniform_budget",
)


def peer_methods(extra: tuple[str, ...]) -> tuple[str, ...]:
  """Full fine-tuning, then at each of PEER_BUDGETS every method of
  PEER_STUDY and of `extra` (budgeted baselines such as "full")."""
  return ("full", *(f"{m}@{b:g}" for b in PEER_BUDGETS for m in (*PEER_STUDY, *extra)))


def tuned_as(name: str, budget: float) -> str:
  """The method whose learning-rate search `name` reuses when budgeted
  methods are tuned at `budget` only (0: each on its own): the same method
  at that budget, or `name` itself."""
  base, b = budget_of(name)
  if b is None or not budget or b == budget:
    return name
  return f"{base}@{budget:g}"


def budget_of(name: str) -> tuple[str, float | None]:
  """`"dropbp@0.5"` -> `("dropbp", 0.5)`; `"full"` -> `("full", None)` (the
  names were checked by the study's registry before they ran).

  >>> budget_of("dropbp@0.5"), budget_of("full")
  (('dropbp', 0.5), ('full', None))
  """
  base, at, budget = name.partition("@")
  return base, float(budget) if at else None


def versus_peers(
  runs: list[dict[str, Any]],
  summary: dict[str, dict[str, Any]],
  *,
  key: str,
  mean: str,
  higher_is_better: bool,
) -> None:
  """Adds to `summary[name]` of each budgeted method (`name@budget`) the
  paired difference in `key` to the best peer at its budget: `best_peer` (the
  peer whose `summary[...][mean]` is best; a peer is not compared with
  itself), `diff_vs_best_peer` and `diff_vs_best_peer_ci95`."""
  budgets = {n: budget_of(n) for n in summary}
  for name, s in summary.items():
    budget = budgets[name][1]
    if budget is None:
      continue
    peers = [
      n
      for n, (base, b) in budgets.items()
      if b == budget and base in PEERS and n != name
    ]
    if not peers:
      continue
    sign = 1.0 if higher_is_better else -1.0
    best = max(peers, key=lambda n: sign * summary[n][mean])
    p = paired(runs, name, best, key)
    if p is not None:
      s["best_peer"] = best
      s["diff_vs_best_peer"], s["diff_vs_best_peer_ci95"] = p["mean"], p["ci95"]


def head_to_head(
  runs: list[dict[str, Any]], names: list[str], method: str, key: str
) -> dict[str, dict[float, dict[str, Any]]]:
  """`method` (a base name such as "rgft_budget") against every other method
  at each budget it ran: `{other base: {budget: paired(method@b - other@b)}}`
  (full fine-tuning given the same FLOPs is the base "full")."""
  parsed = {n: budget_of(n) for n in names}
  mine = {b: n for n, (base, b) in parsed.items() if base == method and b is not None}
  out: dict[str, dict[float, dict[str, Any]]] = {}
  for budget, name in sorted(mine.items()):
    others = [n for n, (base, b) in parsed.items() if b == budget and base != method]
    for other in others:
      p = paired(runs, name, other, key)
      if p is not None:
        out.setdefault(parsed[other][0], {})[budget] = p
  return out


def _tasks(results: Any, path: str) -> dict[str, list[dict[str, Any]]]:
  """The runs of each task in the study results `results` (read from `path`)."""
  what = f"{path} is not a fine-tuning study's results.json"
  if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
    got = type(results).__name__
    if isinstance(results, dict):
      got = f"an object with keys {sorted(results)[:8]}"
    raise ValueError(f"{what}: expected an object with 'tasks', got {got}.")
  out = {}
  for task, info in results["tasks"].items():
    runs = info.get("runs") if isinstance(info, dict) else None
    if not isinstance(runs, list) or not all(
      isinstance(r, dict) and {"method", "seed", "test_accuracy"} <= r.keys()
      for r in runs
    ):
      raise ValueError(
        f"{what}: task {task!r} has no list of runs, each with method, seed "
        "and test_accuracy."
      )
    out[task] = runs
  return out


def main(argv: list[str] | None = None) -> None:
  """Prints every pair it can; exits non-zero naming each pair it could not."""
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) < 3 or len(argv) % 2 == 0:
    raise SystemExit(__doc__)
  try:
    tasks = _tasks(store.load_json(argv[0]), argv[0])
  except (OSError, ValueError) as e:
    raise SystemExit(f"compare: {e}") from None
  pairs = list(zip(argv[1::2], argv[2::2], strict=True))
  problems = []
  for task, runs in tasks.items():
    for a, b in pairs:
      try:
        p = paired(runs, a, b)
      except ValueError as e:
        problems.append(f"{task}: {e}")
        continue
      if p is None:
        problems.append(f"{task}: {a} - {b}: not both in the results")
        continue
      per_seed = ", ".join(f"{d * 100:+.1f}" for d in p["diffs"])
      half = "n/a (one seed)" if len(p["seeds"]) < 2 else f"{p['ci95'] * 100:.1f}"
      print(
        f"{task}: {a} - {b}: {p['mean'] * 100:+.1f} pt ± {half} "
        f"(95% CI, seeds {p['seeds']}; per seed {per_seed})"
      )
  if problems:
    raise SystemExit("compare: " + "; ".join(problems))


if __name__ == "__main__":
  main()
