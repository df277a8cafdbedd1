"""The language-model study: a quick study end to end, its pretraining cache,
its metrics against independent computations, and its flags."""

import dataclasses
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
from _lm_reference import reference_logits

from experiments import cli
from experiments import train as vision_train
from experiments.lm import data
from experiments.lm import methods
from experiments.lm import model as lm
from experiments.lm import pretrain
from experiments.lm import shipped
from experiments.lm import study

# Every registered method, once. The peers measure the model besides their
# steps, which in a quick run of 12 steps needs a larger budget.
CONTROLS = (
  "shuffled_budget@0.5",
  "static_budget@0.5",
  "surgical_first@0.5",
  "surgical_last@0.5",
)
ALL = (
  *study.DEFAULT_METHODS,
  "rgft_budget_sample@0.5",
  "rgft_random",
  *CONTROLS,
  "dropbp@0.7",
  "greentrainer@0.9",
  "lisa@0.5",
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """The quick study over every method: (config, results, final parameters).

  It takes over a minute, so every test that uses it is marked slow.
  """
  cfg = dataclasses.replace(
    study.get_config("quick"),
    workdir=str(tmp_path_factory.mktemp("lm")),
    methods=",".join(ALL),
  )
  keep = {}
  results = study.run(cfg, keep=keep)
  return cfg, results, keep


def looped_config(cfg) -> lm.Config:
  return dataclasses.replace(pretrain.model_config(cfg), scan_layers=False)


def reference_bpb(cfg, params, split: np.ndarray) -> float:
  """Bits per byte of `params` on `split`'s evaluation windows, in float64 NumPy."""
  windows = data.eval_windows(split, context=cfg.context, max_windows=cfg.eval_windows)
  logits = reference_logits(looped_config(cfg), params, windows[:, :-1])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nats = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)
  return float(nats.mean() / math.log(2))


@pytest.mark.slow
def test_quick_study_writes_its_files(quick):
  cfg, results, _ = quick
  workdir = pathlib.Path(cfg.workdir)
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["summary"].keys() == results["summary"].keys()
  table = (workdir / "results.md").read_text()
  for name in ALL:
    assert f"| {name} |" in table
  assert "bits/byte" in table and "Learning-rate search" in table
  plots = sorted(p.name for p in (workdir / "plots").iterdir())
  assert "bpb_vs_flops.png" in plots and "error_map_rgft_blocks.png" in plots
  for name in plots:
    assert (workdir / "plots" / name).read_bytes()[:4] == b"\x89PNG"
  assert not (workdir / ".lock").exists()


@pytest.mark.slow
def test_every_method_is_registered_and_trains(quick):
  cfg, results, _ = quick
  assert {methods.parse(n)[0] for n in ALL} == set(methods.METHODS)
  before = results["pretrained_bpb"]["validation"]
  ran = set(results["summary"])
  assert not results["unavailable"]
  for name in ALL:
    assert name in ran
    for r in (r for r in results["runs"] if r["method"] == name):
      assert r["validation_bpb"] < before - 0.02, (name, r["seed"])
      assert r["history"]["loss"][-1] < r["history"]["loss"][0], (name, r["seed"])
  for name in ("rgft_budget@0.5", "uniform_budget@0.5", "rgft_budget_sample@0.5"):
    for r in (r for r in results["runs"] if r["method"] == name):
      assert r["budget"]["fraction"] <= 0.5 + 1e-9
      assert r["step_variants"] >= 2
    assert results["summary"][name]["flops_vs_full"] < 0.52
  for name in CONTROLS:
    for r in (r for r in results["runs"] if r["method"] == name):
      assert r["budget"]["fraction"] <= 0.5 + 1e-9
  for name in ("dropbp@0.7", "greentrainer@0.9"):
    for r in (r for r in results["runs"] if r["method"] == name):
      # Their own measurements are charged: the steps' FLOPs plus the probes'.
      assert r["probe_flops"] > 0
      steps = sum(r["step_flops"][v] * n for v, n in r["steps_per_variant"].items())
      assert r["train_flops"] == pytest.approx(steps + r["probe_flops"])
  # DropBP draws a set each step from one compiled (runtime) step.
  assert any(
    r["step_variants"] >= 3 for r in results["runs"] if r["method"] == "dropbp@0.7"
  )
  assert results["summary"]["full@0.5"]["steps"] == cfg.steps // 2
  # LISA at equal FLOPs: more (cheaper) steps, sized by its dearest step (the
  # lowest layer trained), within half a step of b of full's FLOPs or under.
  lisa = results["summary"]["lisa@0.5"]
  assert lisa["steps"] > cfg.steps // 2
  assert 0.3 < lisa["flops_vs_full"] <= 0.5 + 0.5 / cfg.steps


@pytest.mark.slow
def test_forgetting_equals_bits_per_byte_computed_by_hand(quick):
  cfg, results, keep = quick
  source = data.load("stdlib").splits["test"]
  scanned, _ = pretrain.pretrain(cfg, log=lambda *a: None)  # The cache.
  pretrained = lm.unstack_layers(scanned)
  want = reference_bpb(cfg, pretrained, source)
  assert results["pretrained_bpb"]["source_test"] == pytest.approx(want, rel=1e-5)
  checked = 0
  for r in results["runs"]:
    want = reference_bpb(cfg, keep[(r["method"], r["seed"])], source)
    assert r["source_bpb"] == pytest.approx(want, rel=1e-5), r["method"]
    checked += 1
  assert checked == len(results["runs"]) > 0


@pytest.mark.slow
def test_learning_rate_is_the_validation_argmin(quick):
  cfg, results, keep = quick
  validation = data.load("pydoc").splits["validation"]
  grid = [float(x) for x in cfg.learning_rates.split(",")]
  for name, search in results["lr_search"].items():
    assert search["learning_rates"] == grid
    scores = search["validation_bpb"]
    assert search["picked"] == grid[int(np.argmin(scores))]
    for r in (r for r in results["runs"] if r["method"] == name):
      assert r["learning_rate"] == search["picked"]
    # The picked run's score, computed by hand from its final parameters.
    want = reference_bpb(cfg, keep[(name, 0)], validation)
    assert min(scores) == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_paired_difference_and_interval_by_hand(quick):
  _, results, _ = quick
  by = {}
  for r in results["runs"]:
    by.setdefault(r["method"], {})[r["seed"]] = r["test_bpb"]
  d = np.array([by["lora"][s] - by["full"][s] for s in sorted(by["full"])])
  half = 12.706204736174707 * d.std(ddof=1) / np.sqrt(2)  # t(0.975, 1 dof).
  s = results["summary"]["lora"]
  assert s["diff_vs_full"] == pytest.approx(d.mean())
  assert s["diff_ci95"] == pytest.approx(half)


def _copied_cache(quick, tmp_path):
  """The quick study's config in `tmp_path`, with a copy of its pretraining cache."""
  cfg, _, _ = quick
  here = dataclasses.replace(cfg, workdir=str(tmp_path))
  shutil.copytree(
    os.path.join(cfg.workdir, "pretrained"), os.path.join(here.workdir, "pretrained")
  )
  return here, pretrain.directory(here)[0]


@pytest.mark.slow
def test_pretraining_cache_is_reused_only_with_equal_settings(
  quick, tmp_path, monkeypatch
):
  here, where = _copied_cache(quick, tmp_path)
  record = json.loads(pathlib.Path(where, "done.json").read_text())

  def no_training(*args):
    raise AssertionError("trained although the cache holds these settings")

  monkeypatch.setattr(pretrain, "_train", no_training)
  messages = []
  params, got = pretrain.pretrain(here, log=messages.append)
  assert "read from" in messages[0] and got == record
  assert vision_train.checksum(params) == record["checksum"]
  # Every setting that changes the weights names another directory ...
  changes = {
    "pretrain_steps": 31,
    "pretrain_batch_size": 4,
    "pretrain_learning_rate": 1e-3,
    "context": 8,
    "d_model": 16,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 4,
    "d_ff": 32,
  }
  for name, value in changes.items():
    other = dataclasses.replace(here, **{name: value})
    assert pretrain.directory(other)[0] != where, name
  # ... the corpora too; fine-tuning settings do not.
  same = dataclasses.replace(here, steps=3, seeds=1, learning_rates="1e-1", lora_rank=1)
  assert pretrain.directory(same)[0] == where
  real = data.fingerprint()
  monkeypatch.setattr(data, "fingerprint", lambda: {**real, "python": "0.0"})
  assert pretrain.directory(here)[0] != where
  monkeypatch.setattr(data, "fingerprint", lambda: real)
  # Other settings train afresh beside it (training faked here).
  trained = []

  def fake_train(cfg, decoder, log):
    trained.append(cfg.pretrain_steps)
    return decoder.init(1), {"bits_per_byte": [], "wall_s": 0.0}

  monkeypatch.setattr(pretrain, "_train", fake_train)
  pretrain.pretrain(dataclasses.replace(here, pretrain_steps=31), log=messages.append)
  assert trained == [31] and os.path.isdir(where)


@pytest.mark.slow
def test_pretraining_cache_from_another_setup_or_damaged_is_refused(
  quick, tmp_path, monkeypatch
):
  here, where = _copied_cache(quick, tmp_path)
  monkeypatch.setattr(pretrain, "_train", lambda *a: pytest.fail("trained"))
  done = pathlib.Path(where, "done.json")
  record = json.loads(done.read_text())
  done.write_text(json.dumps({**record, "settings": {**record["settings"], "seed": 1}}))
  with pytest.raises(ValueError, match="another setup"):
    pretrain.pretrain(here, log=lambda *a: None)
  done.write_text(json.dumps(record))
  # Damage the largest array file: restoring fails or the checksum differs.
  files = [p for p in pathlib.Path(where, "params").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  raw = bytearray(biggest.read_bytes())
  for i in range(len(raw) // 3, len(raw) // 3 + 64):
    raw[i] ^= 0xFF
  biggest.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="damaged"):
    pretrain.pretrain(here, log=lambda *a: None)
  assert biggest.read_bytes() == bytes(raw)  # Left as it is.
  # A checksum that does not match the arrays is refused the same way.
  shutil.rmtree(where)
  shutil.copytree(pretrain.directory(quick[0])[0], where)
  done.write_text(json.dumps({**record, "checksum": "0" * 64}))
  with pytest.raises(ValueError, match="damaged"):
    pretrain.pretrain(here, log=lambda *a: None)


@pytest.mark.parametrize(
  "flags, match",
  [
    (["--seeds", "0"], "--seeds"),
    (["--steps", "-1"], "--steps"),
    (["--learning_rates", "1e-3,x"], "--learning_rates"),
    (["--learning_rates", "0,1e-3"], "--learning_rates"),
    (["--learning_rates", "1e-3,1e-3"], "--learning_rates"),
    (["--methods", "adam"], "--methods"),
    (["--methods", "rgft_budget"], "--methods"),
    (["--methods", "lora@0.5"], "--methods"),
    (["--methods", "full@1.5"], "--methods"),
    (["--methods", "full,full"], "--methods"),
    (["--n_heads", "3"], "--n_heads"),
    (["--lisa_layers", "5"], "--lisa_layers"),
    (["--beta", "1.5"], "--beta"),
    (["--context", "100000"], "--context"),
    (["--pretrain_learning_rate", "nan"], "--pretrain_learning_rate"),
    (["--budget_hysteresis", "-1"], "--budget_hysteresis"),
    (["--eval_windows", "0"], "--eval_windows"),
    (["--eval_every", "-1"], "--eval_every"),
    (["--tune_seeds", "5"], "--tune_seeds"),
    (["--target", "wikipedia"], "--target"),
    (["--target_margin", "-0.1"], "--target_margin"),
    (["--greentrainer_period", "0"], "--greentrainer_period"),
    (["--workdir", " "], "--workdir"),
    (
      ["--batch_size", "100000"],
      r"--batch_size 100000 is larger than the pydoc train split's windows \(\d+ ",
    ),
    (
      ["--pretrained", "train", "--pretrain_batch_size", "10000000"],
      r"--pretrain_batch_size 10000000 is",
    ),
    (["--pretrained", "cached"], "--pretrained must be shipped or train"),
    (["--d_model", "64"], r"another model: --d_model 64 \(it has 192\)"),
    (["--tune_budget", "1.5"], "--tune_budget"),
  ],
)
def test_flags_are_checked_before_any_compute(flags, match, tmp_path, monkeypatch):
  monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("computed"))
  monkeypatch.setattr(shipped, "load_shipped", lambda *a, **k: pytest.fail("computed"))
  argv = ["--workdir", str(tmp_path / "work"), *flags]
  with pytest.raises(ValueError, match=match):
    study.main(argv)
  assert not (tmp_path / "work").exists()


def test_help_lists_every_flag_and_method(capsys):
  with pytest.raises(SystemExit) as done:
    study.main(["--help"])
  assert done.value.code == 0
  text = capsys.readouterr().out
  for f in dataclasses.fields(study.Config):
    assert f"--{f.name}" in text
  for name in methods.METHODS:
    assert name in text


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_compute(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("computed"))
  monkeypatch.setattr(
    cli, "available_memory", lambda: (2**30, "test memory"), raising=False
  )
  # 1000 windows of 256 bytes, 4 layers of width 128: about 10 GiB of activations.
  argv = ["--workdir", str(tmp_path / "work"), "--batch_size", "1000"]
  argv += ["--pretrained", "train"]
  with pytest.raises(ValueError, match=r"--batch_size 1000 needs at least \d+\.\d GiB"):
    study.main([*argv, "--context", "256"])
  assert not (tmp_path / "work").exists()
  # By hand: 4 bytes x batch x tokens x (layers x (6 width + 2 d_ff + heads x
  # tokens) + 2 x 256 logits).
  per_token = 4 * (6 * 128 + 2 * 384 + 4 * 256) + 2 * 256
  assert (
    cli.activation_bytes(1000, 256, 128, 384, 4, 4, 256) == 4 * 1000 * 256 * per_token
  )


def test_rate_is_picked_on_the_mean_of_the_tuning_seeds(monkeypatch, tmp_path):
  # Validation by hand per (rate, seed): rate 1e-3 wins on seed 0 alone, 1e-2
  # on the mean of seeds 0 and 1.
  score = {(1e-3, 0): 1.0, (1e-2, 0): 1.1, (1e-3, 1): 1.5, (1e-2, 1): 1.2}
  calls = []

  def fake_run(method, variants, batches, *, steps, learning_rate, seed, **kw):
    calls.append((learning_rate, seed))
    return {"seed": seed, "lr": learning_rate, "wall_s": 0.0}, (learning_rate, seed)

  class Method:
    name = "m"

    def to_params(self, tree):
      return tree

  def bpb(params, split):
    lr, seed = params
    return score.get((lr, seed), 2.0) if split == "validation" else 0.0

  monkeypatch.setattr(study.train_lib, "run", fake_run)
  cfg = dataclasses.replace(
    study.get_config("quick"),
    seeds=3,
    tune_seeds=2,
    learning_rates="1e-3,1e-2",
    workdir=str(tmp_path),
  )
  search, seeds = study._method_runs(cfg, Method(), None, bpb, lambda *a: None)
  assert search["validation_bpb"] == pytest.approx([1.25, 1.15])
  assert search["picked"] == 1e-2
  # The tuning runs at the picked rate are reused; seed 2 runs once more.
  assert calls == [(1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1), (1e-2, 2)]
  assert [r["seed"] for r, _ in seeds] == [0, 1, 2]
  assert all(r["lr"] == 1e-2 for r, _ in seeds)


def test_flops_to_target_by_hand():
  def run(method, seed, validation, flops, values):
    curve = {"step": list(range(len(flops))), "train_flops": flops, "value": values}
    return {
      "method": method,
      "seed": seed,
      "validation_bpb": validation,
      "curve": curve,
    }

  runs = [
    run("full", 0, 2.00, [10, 20, 30], [2.3, 2.005, 2.00]),
    run("full", 1, 2.10, [10, 20, 30], [2.2, 2.15, 2.10]),
    # Seed 0's target 2.01: reached at the second point (8); seed 1's 2.11:
    # never.
    run("x", 0, 2.02, [4, 8, 12], [2.5, 2.01, 2.02]),
    run("x", 1, 2.30, [4, 8, 12], [2.5, 2.4, 2.3]),
  ]
  got = study.flops_to_target(runs, "x", 0.01)
  assert got == {"seeds": [0, 1], "flops": [8, None]}
  assert study.flops_to_target(runs, "full", 0.01)["flops"] == [20, 30]
  for r in runs:
    r.update(test_bpb=0.0, source_bpb=0.0, steps=3, learning_rate=1.0, wall_s=1.0)
    r.update(peak_bytes=0, step_variants=1, compilations=0)
    r["train_flops"] = r["curve"]["train_flops"][-1]
  summary = study.summarize(runs, 0.01)
  assert summary["x"]["target_reached"] == "1/2"
  assert summary["x"]["flops_to_target"] == pytest.approx(8 / 30)
  assert summary["full"]["flops_to_target"] == pytest.approx(25 / 30)


def test_runs_are_saved_and_read_back_never_from_other_settings(tmp_path, monkeypatch):
  calls = []

  def fake_run(method, variants, batches, *, steps, learning_rate, seed, **kw):
    calls.append((learning_rate, seed, steps))
    record = {"method": method.name, "seed": seed, "learning_rate": learning_rate}
    return {**record, "wall_s": 0.0}, (learning_rate, seed)

  class Method:
    name = "m@0.5"

    def to_params(self, tree):
      return tree

  def bpb(params, split):  # By hand: the lower rate wins on validation.
    lr, seed = params
    return {"validation": lr, "test": 10 * lr + seed, "source_test": 1.0}[split]

  monkeypatch.setattr(study.train_lib, "run", fake_run)
  cfg = dataclasses.replace(
    study.get_config("quick"),
    seeds=3,
    tune_seeds=1,
    learning_rates="1e-3,1e-2",
    workdir=str(tmp_path),
  )
  first = study._method_runs(cfg, Method(), None, bpb, lambda *a: None)
  assert calls == [(1e-3, 0, 12), (1e-2, 0, 12), (1e-3, 1, 12), (1e-3, 2, 12)]
  saved = tmp_path / "runs" / study.signature(cfg)[:12] / "m@0.5" / "lr0.001"
  assert sorted(p.name for p in saved.iterdir()) == [
    "seed0.json",
    "seed1.json",
    "seed2.json",
  ]
  # Again: every run is read back, none trains; the records are the same.
  calls.clear()
  again = study._method_runs(cfg, Method(), None, bpb, lambda *a: None)
  assert calls == []
  assert again[0] == first[0]
  assert [r for r, _ in again[1]] == [r for r, _ in first[1]]
  assert [f for _, f in again[1]] == [None, None, None]
  assert [r["test_bpb"] for r, _ in again[1]] == pytest.approx([0.01, 1.01, 2.01])
  # Other settings: other runs, the saved ones untouched.
  other = dataclasses.replace(cfg, steps=13)
  study._method_runs(other, Method(), None, bpb, lambda *a: None)
  assert {s for _, _, s in calls} == {13} and len(calls) == 4
  # A record edited to another seed is refused, naming its file.
  path = saved / "seed2.json"
  record = json.loads(path.read_text())
  path.write_text(json.dumps({**record, "seed": 1}))
  with pytest.raises(ValueError, match=r"seed2\.json is not this run's record: seed 1"):
    study._method_runs(cfg, Method(), None, bpb, lambda *a: None)


@pytest.mark.slow
# Installed packages differ between machines, and with them the corpus: the
# loader warns, and the study records whether it matches (checked below).
@pytest.mark.filterwarnings("ignore:The corpus on this machine differs:RuntimeWarning")
def test_the_study_starts_from_the_shipped_decoder_by_default(tmp_path):
  """The default source model is checkpoints/lm_plateau.npz, read here with
  NumPy alone: its bits/byte on the test split of its own corpus
  (python_source), in float64, is the study's "source_test" before
  fine-tuning, and the study's model flags are the sidecar's."""
  side = json.loads(
    pathlib.Path(shipped.sidecar_path(shipped.DEFAULT_PATH)).read_text()
  )
  cfg = study.Config(
    methods="full",
    seeds=1,
    steps=2,
    learning_rates="1e-3",
    eval_windows=6,
    eval_every=0,
    workdir=str(tmp_path),
    progress=False,
  )
  results = study.run(cfg)
  used = study.Config(**results["config"])
  model = side["model"]
  assert (used.context, used.d_model, used.d_ff) == (
    model["max_len"],
    model["d_model"],
    model["d_ff"],
  )
  assert results["pretrain"]["sha256"] == side["sha256"]
  local = data.fingerprint((data.PYTHON_SOURCE,))
  same = local == side["corpus"]
  assert results["pretrain"]["corpus_matches"] is same
  assert side["settings"]["corpus"] == data.PYTHON_SOURCE
  with np.load(shipped.DEFAULT_PATH) as f:
    flat = {k.removesuffix(".npy"): f[k] for k in f.files}
  nested: dict = {}
  for key, value in flat.items():
    *parents, last = key.split("/")
    node = nested
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  params = lm.unstack_layers(nested)
  source = data.load(data.PYTHON_SOURCE).splits["test"]
  want = reference_bpb(used, params, source)
  assert results["pretrained_bpb"]["source_test"] == pytest.approx(want, rel=1e-4)


def test_a_run_signature_follows_the_data_and_the_settings(monkeypatch):
  cfg = study.get_config("quick")
  base = study.signature(cfg)
  assert study.signature(dataclasses.replace(cfg, seeds=9, workdir="x")) == base
  assert study.signature(dataclasses.replace(cfg, steps=13)) != base
  real = data.fingerprint
  monkeypatch.setattr(
    data, "fingerprint", lambda names: {**real(names), "python": "another"}
  )
  assert study.signature(cfg) != base  # Another interpreter's corpora.
