"""tools.results_diff against counts made by hand."""

import pytest

from tools import results_diff


def _study(source, accuracies, means):
  runs = [
    {"method": m, "seed": s, "test_accuracy": acc} for (m, s), acc in accuracies.items()
  ]
  summary = {m: {"accuracy_mean": v} for m, v in means.items()}
  return {
    "tasks": {"t": {"pretrain_accuracy": source, "runs": runs, "summary": summary}}
  }


def test_counts_the_runs_and_methods_that_moved():
  old = _study(
    0.958,
    {("full", 0): 0.90, ("full", 1): 0.80, ("lisa", 0): 0.70, ("gone", 0): 0.5},
    {"full": 0.85, "lisa": 0.70, "gone": 0.5},
  )
  new = _study(
    0.940,
    {("full", 0): 0.90, ("full", 1): 0.83, ("lisa", 0): 0.64, ("added", 0): 0.1},
    {"full": 0.865, "lisa": 0.70, "added": 0.1},
  )
  (row,) = results_diff.differences(old, new)
  assert row["source"] == (0.958, 0.940)
  assert (row["runs"], row["runs_moved"]) == (3, 2)  # "gone" and "added" aside.
  assert row["largest"] == pytest.approx(0.06)
  assert (row["methods"], row["methods_moved"]) == (2, 1)
