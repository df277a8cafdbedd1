"""The peers study's comparisons (`experiments.compare`), checked by hand."""

import numpy as np
import pytest

from experiments import compare
from experiments import finetune
from experiments import methods as vit_methods
from experiments.lm import methods as lm_methods
from experiments.lm import study as lm_study

T_975_2DOF = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2), three seeds.


def _runs(table: dict[str, list[float]], key: str = "test_accuracy") -> list[dict]:
  return [
    {"method": m, "seed": s, key: v}
    for m, values in table.items()
    for s, v in enumerate(values)
  ]


TABLE = {
  "full": [0.90, 0.92, 0.91],
  "rgft_budget@0.5": [0.89, 0.93, 0.90],
  "dropbp@0.5": [0.88, 0.90, 0.89],  # Mean 0.89.
  "greentrainer@0.5": [0.87, 0.92, 0.91],  # Mean 0.90: the best peer at 0.5.
  "full@0.5": [0.85, 0.86, 0.88],
  "rgft_budget@0.7": [0.91, 0.92, 0.92],
  "dropbp@0.7": [0.90, 0.91, 0.93],  # The only peer at 0.7.
}


def _by_hand(a: list[float], b: list[float]) -> tuple[float, float]:
  d = np.array(a) - np.array(b)
  return d.mean(), T_975_2DOF * d.std(ddof=1) / np.sqrt(3)


def test_the_best_peer_is_the_best_mean_at_the_same_budget():
  runs = _runs(TABLE)
  summary = {m: {"accuracy_mean": float(np.mean(v))} for m, v in TABLE.items()}
  compare.versus_peers(
    runs,
    summary,
    key="test_accuracy",
    mean="accuracy_mean",
    higher_is_better=True,
  )
  s = summary["rgft_budget@0.5"]
  assert s["best_peer"] == "greentrainer@0.5"
  mean, half = _by_hand(TABLE["rgft_budget@0.5"], TABLE["greentrainer@0.5"])
  assert s["diff_vs_best_peer"] == pytest.approx(mean)
  assert s["diff_vs_best_peer_ci95"] == pytest.approx(half)
  # A peer is compared with the other peer, never with itself.
  assert summary["greentrainer@0.5"]["best_peer"] == "dropbp@0.5"
  assert summary["full@0.5"]["best_peer"] == "greentrainer@0.5"
  assert summary["rgft_budget@0.7"]["best_peer"] == "dropbp@0.7"
  assert "best_peer" not in summary["dropbp@0.7"]  # No other peer at 0.7.
  assert "best_peer" not in summary["full"]  # Not budgeted.


def test_for_bits_per_byte_the_best_peer_is_the_lowest():
  bpb = {
    "rgft_budget@0.5": [2.0, 2.1],
    "dropbp@0.5": [2.2, 2.3],
    "greentrainer@0.5": [2.4, 2.2],
  }
  runs = _runs(bpb, "test_bpb")
  summary = {m: {"test_bpb_mean": float(np.mean(v))} for m, v in bpb.items()}
  compare.versus_peers(
    runs,
    summary,
    key="test_bpb",
    mean="test_bpb_mean",
    higher_is_better=False,
  )
  s = summary["rgft_budget@0.5"]
  assert s["best_peer"] == "dropbp@0.5"  # 2.25 against 2.30.
  assert s["diff_vs_best_peer"] == pytest.approx(-0.2)


def test_head_to_head_pairs_each_method_at_each_budget():
  runs = _runs(TABLE)
  table = compare.head_to_head(runs, list(TABLE), "rgft_budget", "test_accuracy")
  assert set(table) == {"dropbp", "greentrainer", "full"}
  assert set(table["dropbp"]) == {0.5, 0.7} and set(table["greentrainer"]) == {0.5}
  for other, budget in (("dropbp", 0.7), ("full", 0.5)):
    mean, half = _by_hand(TABLE[f"rgft_budget@{budget}"], TABLE[f"{other}@{budget}"])
    assert table[other][budget]["mean"] == pytest.approx(mean)
    assert table[other][budget]["ci95"] == pytest.approx(half)


def test_the_peer_lists_hold_every_peer_and_control_at_every_budget():
  for names in (finetune.PEER_METHODS, lm_study.PEER_METHODS):
    assert names[0] == "full" and len(set(names)) == len(names)
    for budget in ("0.4", "0.5", "0.7"):
      for base in (
        "rgft_budget",
        "dropbp",
        "greentrainer",
        "shuffled_budget",
        "static_budget",
        "surgical_first",
        "surgical_last",
        "uniform_budget",
        "full",
      ):
        assert f"{base}@{budget}" in names
  assert "lisa@0.5" in finetune.PEER_METHODS
  # Every name parses in its own harness.
  for name in finetune.PEER_METHODS:
    vit_methods.parse_name(name)
  for name in lm_study.PEER_METHODS:
    lm_methods.parse(name)


def test_a_tuning_budget_reuses_the_same_methods_search():
  assert compare.tuned_as("dropbp@0.4", 0.5) == "dropbp@0.5"
  assert compare.tuned_as("dropbp@0.5", 0.5) == "dropbp@0.5"
  assert compare.tuned_as("full", 0.5) == "full"
  assert compare.tuned_as("dropbp@0.4", 0.0) == "dropbp@0.4"


def test_vit_study_tunes_each_budgeted_method_once(monkeypatch, tmp_path):
  """With --tune_budget 0.5, name@0.4 and name@0.7 take name@0.5's rate and
  run no tuning of their own; a method missing at 0.5 is tuned there all the
  same (its tuning runs only)."""
  calls = []

  def one_run(cfg, task, name, seed, variants, tuning=False, **kw):
    calls.append((name, cfg.learning_rate, seed, tuning))
    # Validation accuracy by hand: 1e-3 wins for dropbp, 1e-2 for the rest.
    best = 1e-3 if name.startswith("dropbp") else 1e-2
    return {"val_accuracy": 1.0 if cfg.learning_rate == best else 0.5}

  class Task:
    name, costs, info = "label_shift", None, {}

  monkeypatch.setattr(
    finetune, "study_tasks", lambda cfg: [("label_shift", None, None)]
  )
  monkeypatch.setattr(finetune, "check_sizes", lambda cfg, tasks: None)
  monkeypatch.setattr(finetune, "prepare", lambda *a, **k: Task())
  monkeypatch.setattr(finetune, "one_run", one_run)
  monkeypatch.setattr(finetune, "summarize", lambda runs: {})
  monkeypatch.setattr(vit_methods, "infeasible", lambda name, costs, cfg: None)
  cfg = finetune.Config(
    methods="full,dropbp@0.4,uniform_budget@0.4,uniform_budget@0.5",
    lr_grid="1e-3,1e-2",
    seeds=2,
    tune_budget=0.5,
    workdir=str(tmp_path),
  )
  tuning = finetune.study(cfg)["tasks"]["label_shift"]["tuning"]
  tuned = {n for n, _, _, t in calls if t}
  assert tuned == {"full", "dropbp@0.5", "uniform_budget@0.5"}
  assert tuning["dropbp@0.4"]["tuned_as"] == "dropbp@0.5"
  assert tuning["dropbp@0.4"]["chosen"] == 1e-3
  assert tuning["uniform_budget@0.4"]["chosen"] == 1e-2
  reported = {(n, lr) for n, lr, _, t in calls if not t}
  assert reported == {
    ("full", 1e-2),
    ("dropbp@0.4", 1e-3),
    ("uniform_budget@0.4", 1e-2),
    ("uniform_budget@0.5", 1e-2),
  }
  # Each method's tuning ran once, though uniform_budget@0.4 came first.
  assert len([c for c in calls if c[0] == "uniform_budget@0.5" and c[3]]) == 2
