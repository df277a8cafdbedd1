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

from experiments import train as train_lib


def interval(diffs: np.ndarray) -> tuple[float, float]:
  """Mean and half-width of the 95% t-interval of paired differences."""
  if len(diffs) < 2:
    return float(diffs.mean()), float("nan")
  from scipy import stats

  half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
  return float(diffs.mean()), float(half)


def paired(runs: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
  """Test-accuracy differences `a - b` on the seeds both methods ran.

  None when `a` or `b` did not run; ValueError when they share no seed, or a
  seed of one method appears twice.
  """
  acc: dict[str, dict[int, float]] = {}
  for r in runs:
    seeds = acc.setdefault(r["method"], {})
    if r["seed"] in seeds:
      raise ValueError(f"{r['method']} has two runs of seed {r['seed']}.")
    seeds[r["seed"]] = r["test_accuracy"]
  if a not in acc or b not in acc:
    return None
  seeds = sorted(set(acc[a]) & set(acc[b]))
  if not seeds:
    raise ValueError(
      f"{a} and {b} share no seed ({a}: seeds {sorted(acc[a])}, {b}: seeds "
      f"{sorted(acc[b])}); a paired difference needs runs of the same seeds."
    )
  diffs = np.array([acc[a][s] - acc[b][s] for s in seeds])
  mean, half = interval(diffs)
  return {"seeds": seeds, "diffs": diffs.tolist(), "mean": mean, "ci95": half}


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
    tasks = _tasks(train_lib.load_json(argv[0]), argv[0])
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
