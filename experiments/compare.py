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
  """Test-accuracy differences `a - b` on the seeds both methods ran."""
  acc: dict[str, dict[int, float]] = {}
  for r in runs:
    acc.setdefault(r["method"], {})[r["seed"]] = r["test_accuracy"]
  if a not in acc or b not in acc:
    return None
  seeds = sorted(set(acc[a]) & set(acc[b]))
  diffs = np.array([acc[a][s] - acc[b][s] for s in seeds])
  mean, half = interval(diffs)
  return {"seeds": seeds, "diffs": diffs.tolist(), "mean": mean, "ci95": half}


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) < 3 or len(argv) % 2 == 0:
    raise SystemExit(__doc__)
  results = train_lib.load_json(argv[0])
  pairs = list(zip(argv[1::2], argv[2::2], strict=True))
  for task, info in results["tasks"].items():
    for a, b in pairs:
      p = paired(info["runs"], a, b)
      if p is None:
        print(f"{task}: {a} - {b}: not both in the results")
        continue
      per_seed = ", ".join(f"{d * 100:+.1f}" for d in p["diffs"])
      print(
        f"{task}: {a} - {b}: {p['mean'] * 100:+.1f} pt ± {p['ci95'] * 100:.1f} "
        f"(95% CI, seeds {p['seeds']}; per seed {per_seed})"
      )


if __name__ == "__main__":
  main()
