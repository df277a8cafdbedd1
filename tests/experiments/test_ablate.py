"""The ablation command: its quick config writes every file; flags checked first."""

import json

import numpy as np
import pytest

from experiments import ablate


@pytest.mark.slow
def test_quick_config_writes_a_table_and_a_plot_per_ablation(tmp_path):
  results = ablate.main(["--config=quick", f"--workdir={tmp_path}"])
  where = tmp_path / "ablations"
  assert list(results) == list(ablate.ABLATIONS)
  for name in ablate.ABLATIONS:
    for ext in ("md", "json", "png"):
      assert (where / f"{name}.{ext}").stat().st_size > 0, (name, ext)
    saved = json.loads((where / f"{name}.json").read_text())
    cfg = ablate.parse(["--config=quick"])
    assert len(saved["rows"]) == len(ablate.rows(cfg, name))  # One task.
    table = (where / f"{name}.md").read_text()
    assert table.count("\n| label_shift |") == len(saved["rows"])
    for row in saved["rows"]:
      assert len(row["test_accuracy"]) == 1
      if row["label"] == row["reference"]:
        assert row["diff_vs_reference"] == 0.0 and "reference" in table
  # The default row is one run, shared by every ablation that has it.
  rows = {
    n: {r["label"]: r for r in json.loads((where / f"{n}.json").read_text())["rows"]}
    for n in ablate.ABLATIONS
  }
  default = rows["error_method"]["norm_product"]["test_accuracy"]
  assert rows["grouping"]["blocks"]["test_accuracy"] == default
  assert rows["threshold"]["0.1:0.3"]["test_accuracy"] == default
  assert rows["warmup"]["6"]["test_accuracy"] == default
  # The mix takes two measured passes; the random map none.
  mix = rows["grouping"]["mix"]["flops_vs_reference"]
  assert mix > 1.2 and rows["error_method"]["random"]["flops_vs_reference"] < 1.0
  assert np.isfinite(json.loads((where / "time.json").read_text())["seconds"])


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--ablations=nope", "--ablations must name some of"),
    ("--ablations=", "--ablations must name some of"),
    ("--thresholds=abc", "--thresholds must be comma-separated"),
    ("--thresholds=0.5:0.1", r"RGFT flags .*thresh"),
    ("--warmups=500", "--warmup_steps must be in"),
    ("--warmups=50,50", "--warmups repeats"),
    ("--error_methods=foo", "--error_method must be one of"),
    ("--batch_sizes=0", "--batch_size must be"),
    ("--lr_values=-1", "--learning_rate must be finite and > 0"),
    ("--groupings=nope", "--groupings must be some of"),
    ("--levers=default,nope", "--levers must be some of"),
    ("--lever_budget=1.5", r"--lever_budget must be in \(0, 1\]"),
    ("--levers=hard,hard", "--levers repeats"),
    ("--seeds=0", "--seeds must be"),
    ("--size=foo", "--size must be one of"),
  ],
)
def test_flags_are_checked_before_any_compute(tmp_path, flag, message):
  with pytest.raises(ValueError, match=message):
    ablate.main([f"--workdir={tmp_path / 'w'}", flag])
  assert not (tmp_path / "w").exists()


def test_the_study_s_own_flags_are_not_taken_here():
  for flag in ("--methods=full", "--lr_grid=1e-3", "--tune_seeds=2"):
    with pytest.raises(SystemExit):
      ablate.parse([flag])


@pytest.mark.slow
def test_two_tasks_share_no_compiled_step(tmp_path):
  """Compiled steps are cached per task: label_shift and input_shift have
  heads of different sizes, and the second task once got the first's step."""
  results = ablate.main(
    [
      "--config=quick",
      f"--workdir={tmp_path}",
      "--ablations=warmup",
      "--tasks=label_shift,input_shift",
    ]
  )
  tasks = [r["task"] for r in results["warmup"]["rows"]]
  assert tasks.count("label_shift") == tasks.count("input_shift") == 2


def test_quick_sets_defaults_and_given_flags_win():
  cfg = ablate.parse(["--config=quick", "--tasks=input_shift", "--seeds=3"])
  assert (cfg.tasks, cfg.seeds, cfg.steps) == ("input_shift", 3, 6)
  assert ablate.parse(["--seeds=3", "--config=quick"]).seeds == 3


def test_levers_change_one_thing_of_budgeted_rgft():
  cfg = ablate.parse(["--ablations=levers", "--lever_budget=0.4"])
  rows = {r.label: r for r in ablate.rows(cfg, "levers")}
  assert list(rows) == list(ablate.LEVERS)
  assert {r.reference for r in rows.values()} == {"default"}
  assert rows["default"].method == "rgft_budget@0.4" and rows["default"].overrides == {}
  assert rows["hard"].overrides == {"min_scale": 1.0}
  assert rows["sample"].method == "rgft_budget_sample@0.4"
  assert rows["per_entry"].overrides == {"adam_count": "per_entry"}
  assert rows["static"].method == "static_budget@0.4"
  # Full fine-tuning with every step, and with the budget's share of them.
  assert (rows["full"].method, rows["full@b"].method) == ("full", "full@0.4")
  for row in rows.values():  # Every row is a setting the study accepts.
    changed = {k: v for k, v in row.overrides.items() if getattr(cfg, k) != v}
    assert changed == row.overrides, row.label


def _record(seed, acc):
  return {
    "seed": seed,
    "method": "m",
    "test_accuracy": acc,
    "train_flops": 1.0,
    "update_ratio": 1.0,
    "wall_s": 1.0,
  }


def test_a_row_is_paired_with_its_reference_by_seed():
  # The reference's runs in another order: each difference is of the same seed.
  row = [_record(0, 0.5), _record(1, 0.9), _record(2, 0.7)]
  ref = [_record(2, 0.6), _record(0, 0.4), _record(1, 0.6)]
  want = np.array([0.5 - 0.4, 0.9 - 0.6, 0.7 - 0.6])
  stats = ablate._stats(row, ref)
  assert stats["diff_vs_reference"] == pytest.approx(want.mean())
  half = 4.302652729911275 * want.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 dof).
  assert stats["diff_ci95"] == pytest.approx(half)
  with pytest.raises(ValueError, match="have a reference run"):
    ablate._stats(row, ref[:2])
