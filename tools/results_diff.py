"""How a ViT study's results file differs from an earlier version of it.

  python -m tools.results_diff 15e7b5e experiments/results/results.json

compares `PATH` as committed at git revision `REV` with `PATH` as it is now:
per task, the source model's accuracy in each, how many runs (method, seed)
present in both have another test accuracy (and the largest change), and how
many methods present in both have another mean test accuracy. It prints a
table and exits 0; it judges nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from typing import Any


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
  """Per task of both results (`finetune.study`'s JSON), what moved."""
  out = []
  for task in old["tasks"]:
    if task not in new["tasks"]:
      continue
    a, b = old["tasks"][task], new["tasks"][task]
    runs = {(r["method"], r["seed"]): r["test_accuracy"] for r in b["runs"]}
    moved = [
      abs(runs[key] - r["test_accuracy"])
      for r in a["runs"]
      if (key := (r["method"], r["seed"])) in runs and runs[key] != r["test_accuracy"]
    ]
    shared = [
      (r["method"], r["seed"]) for r in a["runs"] if (r["method"], r["seed"]) in runs
    ]
    methods = [m for m in a["summary"] if m in b["summary"]]
    out.append(
      {
        "task": task,
        "source": (a["pretrain_accuracy"], b["pretrain_accuracy"]),
        "runs": len(shared),
        "runs_moved": len(moved),
        "largest": max(moved, default=0.0),
        "methods": len(methods),
        "methods_moved": sum(
          a["summary"][m]["accuracy_mean"] != b["summary"][m]["accuracy_mean"]
          for m in methods
        ),
      }
    )
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("rev", help="the git revision of the earlier version")
  parser.add_argument("path", help="the results file, relative to the repository")
  args = parser.parse_args(argv)
  old = json.loads(
    subprocess.run(
      ["git", "show", f"{args.rev}:{args.path}"],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
  )
  with open(args.path) as f:
    new = json.load(f)
  rows = differences(old, new)
  print(
    "| task | source acc (then / now) | runs moved | largest move | "
    "methods whose mean moved |"
  )
  print("|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['task']} | {r['source'][0]:.3f} / {r['source'][1]:.3f} | "
      f"{r['runs_moved']} of {r['runs']} | {100 * r['largest']:.1f} pt | "
      f"{r['methods_moved']} of {r['methods']} |"
    )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
