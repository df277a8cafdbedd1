"""The fine-tuning study: smoke runs under mock data, accounting, resume."""

import asyncio
import dataclasses
import errno
import gc
import inspect
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import types
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import rgft_jax
from experiments import checkpoint
from experiments import cli
from experiments import compare
from experiments import data as data_lib
from experiments import finetune
from experiments import methods as methods_lib
from experiments import train as train_lib
from experiments.vit import SIZES
from experiments.vit import VisionTransformer
from rgft_jax._sparse import compiled_cost

CLASSES = 10  # CIFAR-10.
# Every base method, every budgeted kind, and a budget below the floor.
MOCK_METHODS = (
  *methods_lib.REGISTRY.names(),
  "rgft_budget@0.7",
  "rgft_budget_sample@0.5",
  "uniform_budget@0.5",
  "full@0.5",
  "lisa@0.5",
  "rgft_budget@0.3",
)


def _tiny(classes=CLASSES, image=32, patch=8):
  model = VisionTransformer(num_classes=classes, patch=patch, size="mu")
  x = jnp.zeros((2, image, image, 3))
  params = model.init(jax.random.key(0), x)["params"]
  params["head"]["kernel"] = 0.1 * jax.random.normal(
    jax.random.key(1), params["head"]["kernel"].shape
  )
  return model, params, x


@pytest.mark.slow
def test_every_method_runs_under_mock_cifar(tmp_path):
  flags = [
    "--dataset=cifar10",
    "--seeds=1",
    "--size=mu",
    "--patch=8",
    "--batch_size=4",
    "--steps=2",
    "--lisa_period=1",
    "--methods=" + ",".join(MOCK_METHODS),
    "--budget_every=1",
    "--eval_batch_size=5",
    f"--workdir={tmp_path}",
    "--log_every=1",
    "--ckpt_every=1",
    "--augment",
    "--no-progress",
    "--lr_grid=",  # No tuning here (see test_learning_rates_are_tuned...).
  ]
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    results = finetune.main(flags)
  info = results["tasks"]["cifar10"]
  runs = info["runs"]
  ran = [r["method"] for r in runs]
  assert sorted(ran + list(info["infeasible"])) == sorted(MOCK_METHODS)
  assert list(info["infeasible"]) == ["rgft_budget@0.3"]
  for r in runs:
    assert 0.0 <= r["test_accuracy"] <= 1.0
    assert r["train_flops"] > 0 and r["peak_bytes"] > 0
    assert sum(r["steps_per_variant"].values()) == r["steps"]
    run_dir = tmp_path / "runs" / "cifar10" / r["method"] / "lr0.001" / "seed0"
    assert (run_dir / "result.json").exists()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tb"))
  rgft = [r for r in runs if r["method"].startswith("rgft")]
  for r in rgft:
    assert len(r["history"]["alpha"]) == 2
    assert len(r["history"]["alpha"][0]) == len(r["components"])
  rows = 1 + len(runs) + len(info["infeasible"])
  assert (tmp_path / "results.md").read_text().count("\n| ") == rows
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["tasks"]["cifar10"]["summary"]["full"]["flops_vs_full"] == 1.0
  plots = os.listdir(tmp_path / "plots")
  assert "cifar10_accuracy_vs_flops.png" in plots
  assert "cifar10_rgft_heads_error_map.png" in plots
  # Rerunning into the same workdir with another setting is refused.
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match=r"other settings.*lora_rank"):
      finetune.main([*flags, "--lora_rank=2", "--methods=full"])


@pytest.mark.slow
def test_trainable_parameter_counts_by_hand():
  model, params, x = _tiny()
  s, c, r = SIZES["mu"], CLASSES, 4
  w, m, d = s.width, s.mlp_dim, s.depth
  hyper = methods_lib.Hyper(lora_rank=r)
  head = w * c + c
  per_block = 2 * 2 * w + 4 * (w * w + w) + w * m + m + m * w + w
  total = 8 * 8 * 3 * w + w + w + (1 + 16) * w + d * per_block + 2 * w + head
  counts = {}
  for name in methods_lib.REGISTRY.names():
    method = methods_lib.make(name, model, params, x, hyper)
    tree, state = method.init(1e-3, 0)
    counts[name] = methods_lib.trainable_count(method, tree, state)
    assert methods_lib.count(method.to_params(tree)) == total
  assert counts["full"] == counts["lisa"] == counts["rgft_blocks"] == total
  assert counts["head_only"] == head
  # Every bias: embedding, per block LN0, q/k/v/out, LN2, both Dense; final norm.
  assert counts["bitfit"] == w + d * (w + 4 * w + w + m + w) + w + head
  # Rank r factors: q, k, v are [w, w], out [w, w], Dense_0 [w, m], Dense_1 [m, w].
  assert counts["lora"] == d * r * (4 * 2 * w + 2 * (w + m)) + head
  assert counts["rgft_mix"] == counts["rgft_random"] == total
  # Adapters: per branch (2 per block) down [w, a] + bias a, up [a, w] + bias w.
  a = hyper.adapter_width
  assert counts["adapters"] == d * 2 * (2 * w * a + a + w) + head
  # Masks over the branches' entries (every block parameter), the rest trained.
  branches = d * per_block
  kept = round(hyper.sparse_fraction * branches) + total - branches
  assert counts["random_sparse"] == counts["magnitude_sparse"] == kept


def _matmul_flops(batch, image, patch):
  """Forward multiply-add FLOPs (2 per MAC) of the mu ViT's matmuls, by hand."""
  s = SIZES["mu"]
  w, m, h = s.width, s.mlp_dim, s.heads
  n = (image // patch) ** 2 + 1
  embed = 2 * (n - 1) * patch * patch * 3 * w
  qkvo = 4 * 2 * n * w * w
  scores_and_mix = 2 * 2 * h * n * n * (w // h)
  mlp = 2 * 2 * n * w * m
  head = 2 * w * CLASSES
  return batch * (embed + s.depth * (qkvo + scores_and_mix + mlp) + head)


@pytest.mark.slow
def test_flop_accounting_against_hand_counts():
  model, params, x = _tiny()
  batch = {"image": jnp.zeros((8, 32, 32, 3)), "label": jnp.zeros(8, jnp.int32)}
  forward, _ = compiled_cost(
    jax.jit(lambda p, b: model.apply({"params": p}, b))
    .lower(params, batch["image"])
    .compile()
  )
  by_hand = _matmul_flops(8, 32, 8)
  # XLA also counts the elementwise work (norms, softmax, GELU): a few percent.
  assert by_hand <= forward <= 1.15 * by_hand

  hyper = methods_lib.Hyper(lisa_layers=1, lisa_period=1)
  step = {}
  for name in ("full", "head_only", "lisa"):
    method = methods_lib.make(name, model, params, x, hyper)
    tree, opt_state = method.init(1e-3, 0)
    variant = method.policy(0).variant(0, opt_state)
    variants = train_lib.variants_of(method)
    step[name] = variants.cost(variant, tree, opt_state, batch)[0]
  # Backward: twice the forward matmuls, less the input gradient of the patch
  # embedding (nothing below it): full = 3 F - embed dX, up to elementwise work.
  embed = 8 * 2 * 16 * 8 * 8 * 3 * SIZES["mu"].width
  expected = 3 * by_hand - embed
  assert expected <= step["full"] <= 1.2 * expected
  # Head only: the forward pass and the head's gradient, no encoder backward.
  assert by_hand <= step["head_only"] <= 1.15 * by_hand + 3 * 2 * 8 * 32 * CLASSES
  # LISA with one of two blocks: the lower block's weight gradients go.
  assert step["head_only"] < step["lisa"] < step["full"]


def _small_data(steps=6):
  """`steps` random batches of four 16x16 images, 3 classes, and a test batch."""
  rng = np.random.default_rng(0)
  data = [
    {
      "image": jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
      "label": jnp.asarray(rng.integers(0, 3, size=4), jnp.int32),
    }
    for _ in range(steps)
  ]
  return data, [{**data[0], "mask": jnp.ones(4)}]


def _run(model, method, data, test, steps, where, seed=0, ckpt_every=2, **kwargs):
  return train_lib.run(
    model,
    method,
    data,
    lambda: test,
    steps=steps,
    learning_rate=1e-3,
    seed=seed,
    workdir=str(where),
    ckpt_every=ckpt_every,
    progress=False,
    **kwargs,
  )


@pytest.fixture(scope="module")
def tiny_costs():
  """`_tiny(3, 16, 4)` and its step costs on `_small_data`'s first batch
  (which every length of it shares), GreenTrainer's included."""
  model, params, x = _tiny(classes=3, image=16, patch=4)
  data, _ = _small_data()
  costs = train_lib.measure_costs(
    model, params, x, methods_lib.Hyper(), data[0], freeze=True
  )
  return model, params, x, costs


@pytest.mark.slow
def test_run_resumes_bit_identically(tmp_path, tiny_costs):
  model, params, x, costs = tiny_costs
  data, test = _small_data()
  hyper = methods_lib.Hyper(steps=6, lisa_period=2, budget_every=2)
  for name in ("rgft_heads", "lisa", "rgft_budget_sample@0.7"):
    method = methods_lib.make(name, model, params, x, hyper, costs=costs)

    def go(steps, where, method=method):
      return _run(model, method, data, test, steps, where, seed=1, log_every=1)

    straight, p_straight = go(6, tmp_path / name / "a")
    go(4, tmp_path / name / "b")  # "Killed" after step 4, checkpoint at 4.
    resumed, p_resumed = go(6, tmp_path / name / "b")
    for a, b in zip(
      jax.tree.leaves(p_straight), jax.tree.leaves(p_resumed), strict=True
    ):
      np.testing.assert_array_equal(a, b)
    assert resumed["history"]["loss"] == straight["history"]["loss"]
    assert resumed["steps_per_variant"] == straight["steps_per_variant"]
    assert resumed["train_flops"] == straight["train_flops"]
    assert resumed.get("budget") == straight.get("budget")
    if name != "rgft_heads":  # Something was frozen, and it resumed that way.
      assert len(straight["steps_per_variant"]) > 1


def test_bad_method_and_task_names_are_errors(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown method.*nope"):
    finetune.study(finetune.Config(methods="full,nope", workdir=str(tmp_path)))
  with pytest.raises(ValueError, match=r"Unknown embedded task.*nope"):
    finetune.study(finetune.Config(tasks="nope", workdir=str(tmp_path)))


def _listing(root):
  return sorted(
    (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
    for p in root.rglob("*")
    if p.is_file()
  )


@pytest.mark.slow
def test_a_different_setup_does_not_resume_or_overwrite(tmp_path):
  model, params, x = _tiny(classes=3, image=16, patch=4)
  batch = {"image": jnp.zeros((4, 16, 16, 3)), "label": jnp.zeros(4, jnp.int32)}
  test = [{**batch, "mask": jnp.ones(4)}]
  hyper = methods_lib.Hyper(steps=2)

  def go(name):
    method = methods_lib.make(name, model, params, x, hyper)
    return train_lib.run(
      model,
      method,
      [batch] * 2,
      lambda: test,
      steps=2,
      learning_rate=1e-3,
      seed=0,
      workdir=str(tmp_path),
      ckpt_every=1,
      progress=False,
    )

  go("rgft_blocks")
  before = _listing(tmp_path)
  with pytest.raises(ValueError, match=r"different setup.*components: checkpoint"):
    go("rgft_heads")
  assert _listing(tmp_path) == before


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--steps=0", "--steps must be an integer >= 1"),
    ("--pretrain_steps=0", "--pretrain_steps must be"),
    ("--log_every=0", "--log_every must be"),
    ("--ckpt_every=0", "--ckpt_every must be"),
    ("--lisa_period=0", "--lisa_period must be"),
    ("--lora_rank=0", "--lora_rank must be"),
    ("--seeds=0", "--seeds must be"),
    ("--size=foo", "--size must be one of"),
    ("--learning_rate=nan", "--learning_rate must be finite"),
    ("--learning_rate=-1", "--learning_rate must be finite and > 0"),
    ("--methods=", "--methods names no method"),
    ("--methods=full,full", "--methods repeats"),
    ("--methods=full,nope", "Unknown method"),
    ("--methods=rgft_budget@2", "must be in"),
    ("--workdir=", "--workdir must name a directory"),
    ("--val_fraction=1", "--val_fraction must be in"),
    ("--budget_ramp=500", "--budget_ramp must be in"),
    ("--beta=1.5", r"RGFT flags .*beta"),
    ("--min_scale=0", r"RGFT flags .*min_scale"),
    ("--thresh_init=0.5", r"RGFT flags .*thresh_init"),
    ("--lr_grid=abc", "--lr_grid must be comma-separated numbers"),
    ("--lr_grid=0,1e-3", "--lr_grid must hold finite rates > 0"),
    ("--lr_grid=1e-3,1e-3", "--lr_grid repeats"),
    ("--tune_seeds=0", "--tune_seeds must be"),
    ("--pretrain_learning_rate=0", "--pretrain_learning_rate must be"),
    ("--pretrain_batch_size=0", "--pretrain_batch_size must be"),
    ("--adapter_width=0", "--adapter_width must be"),
    ("--sparse_fraction=0", "--sparse_fraction must be in"),
    ("--sparse_fraction=1.5", "--sparse_fraction must be in"),
    ("--error_method=foo", "--error_method must be one of"),
    ("--error_method=random", "cannot drive budgeted RGFT"),
    ("--warmup_steps=-1", "--warmup_steps must be"),
    ("--warmup_steps=500", "--warmup_steps must be in"),
    ("--tune_budget=1.5", r"budget of '--tune_budget' must be in \(0, 1\]"),
    ("--pretrained=cached", "--pretrained must be train or shipped"),
    ("--patch=4", r"shipped label_shift checkpoint is for another ViT: --patch 4"),
  ],
)
def test_flags_are_checked_before_any_compute(tmp_path, flag, message):
  args = [f"--workdir={tmp_path / 'w'}", flag]
  with pytest.raises(ValueError, match=message):
    finetune.main(args)
  if "--workdir=" not in flag:
    assert not (tmp_path / "w").exists()  # Nothing was computed or written.


def test_a_second_study_in_one_workdir_is_refused(tmp_path):
  with train_lib.lock(str(tmp_path)):
    with pytest.raises(ValueError, match="Another study"):
      with train_lib.lock(str(tmp_path)):
        pass
  with train_lib.lock(str(tmp_path)):  # Released: free again.
    pass
  (tmp_path / ".lock").write_text("999999999")  # Left by a process that is gone.
  with train_lib.lock(str(tmp_path)):
    pass


def _flip(root):
  """Overwrites 64 bytes in the middle of the largest file under `root`."""
  path = max(
    (p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
  )
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  data[mid : mid + 64] = bytes(255 - b for b in data[mid : mid + 64])
  path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_checkpoint_is_never_trained_on(tmp_path, monkeypatch):
  # Slow log writes, as on a loaded machine: the checkpoint at step 2 must not
  # pick up the loss logged at step 4 while it waits to be written.
  _slow_json_writes(monkeypatch, 0.3)
  model, params, x = _tiny(classes=3, image=16, patch=4)
  data, test = _small_data()
  hyper = methods_lib.Hyper(steps=6)

  def go(steps, where):
    method = methods_lib.make("full", model, params, x, hyper)
    return _run(model, method, data, test, steps, where, seed=1)

  straight, p_straight = go(6, tmp_path / "a")
  go(4, tmp_path / "b")  # Checkpoints at steps 2 and 4.
  _flip(tmp_path / "b" / "ckpt" / "4" / "state")
  with pytest.warns(RuntimeWarning, match=r"step 4 .* damaged .* resuming from step 2"):
    resumed, p_resumed = go(6, tmp_path / "b")
  assert (tmp_path / "b" / "ckpt_corrupt" / "4").is_dir()  # Kept aside.
  for a, b in zip(jax.tree.leaves(p_straight), jax.tree.leaves(p_resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert resumed["history"]["loss"] == straight["history"]["loss"]
  # Every checkpoint damaged: stop, naming them, and touch nothing.
  go(4, tmp_path / "c")
  for step in ("2", "4"):
    _flip(tmp_path / "c" / "ckpt" / step / "state")
  before = _listing(tmp_path / "c")
  with pytest.raises(ValueError, match=r"No whole checkpoint.*step 4.*step 2"):
    go(6, tmp_path / "c")
  assert _listing(tmp_path / "c") == before


def test_a_malformed_result_file_is_named(tmp_path):
  bad = tmp_path / "result.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match=r"result.json is not valid JSON"):
    train_lib.load_json(str(bad))


def test_pretraining_cache_is_keyed_by_every_setting_that_changes_it():
  base = finetune.Config()
  where, _ = finetune.pretrain_dir(base, "label_shift")
  for change in (
    {"pretrain_learning_rate": 3e-3},
    {"pretrain_batch_size": 32},
    {"image_size": 56},
    {"pretrain_steps": 100},
    {"augment": True},
  ):
    other = dataclasses.replace(base, **change)
    assert finetune.pretrain_dir(other, "label_shift")[0] != where, change
  # Settings that only change the fine-tuning share it.
  for change in ({"steps": 50}, {"learning_rate": 3e-3}, {"batch_size": 32}):
    other = dataclasses.replace(base, **change)
    assert finetune.pretrain_dir(other, "label_shift")[0] == where, change


@pytest.mark.slow
def test_a_checkpoint_past_the_run_is_refused(tmp_path):
  model, params, x = _tiny(classes=3, image=16, patch=4)
  data, test = _small_data()
  method = methods_lib.make("full", model, params, x, methods_lib.Hyper(steps=6))

  def go(steps):
    return _run(model, method, data, test, steps, tmp_path)

  go(4)
  before = _listing(tmp_path)
  with pytest.raises(ValueError, match=r"at step 4, past this run's 2 steps"):
    go(2)
  assert _listing(tmp_path) == before


def test_accuracy_counts_only_real_examples():
  model, params, _ = _tiny(classes=3, image=16, patch=4)
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.normal(size=(6, 16, 16, 3)), jnp.float32)
  predicted = np.asarray(jnp.argmax(model.apply({"params": params}, images), -1))
  labels = predicted.copy()
  labels[:2] = (labels[:2] + 1) % 3  # Two wrong, four right.
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # The last is padding.
  batch = {"image": images, "label": jnp.asarray(labels, jnp.int32), "mask": mask}
  # Five real examples, of which three are right.
  assert train_lib.accuracy(model, params, [batch]) == pytest.approx(3 / 5)


def test_paired_differences_by_hand():
  runs = [
    {"method": "a", "seed": 0, "test_accuracy": 0.9},
    {"method": "a", "seed": 1, "test_accuracy": 0.8},
    {"method": "a", "seed": 2, "test_accuracy": 0.5},  # b has no seed 2.
    {"method": "b", "seed": 0, "test_accuracy": 0.8},
    {"method": "b", "seed": 1, "test_accuracy": 0.5},
  ]
  p = compare.paired(runs, "a", "b")
  assert p["seeds"] == [0, 1]
  np.testing.assert_allclose(p["diffs"], [0.1, 0.3])
  # Mean 0.2; sd 0.1414; t(0.975, 1 dof) = 12.7062: half-width 12.7062 * 0.1.
  np.testing.assert_allclose(p["mean"], 0.2)
  np.testing.assert_allclose(p["ci95"], 12.7062 * 0.1, rtol=1e-4)
  assert compare.paired(runs, "a", "c") is None


def test_a_workdir_that_cannot_be_made_is_refused_before_compute(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  for workdir in (blocker, blocker / "sub"):
    with pytest.raises(ValueError, match="Cannot write to --workdir"):
      finetune.main([f"--workdir={workdir}"])


def test_the_chosen_rate_is_the_best_mean_validation_accuracy():
  grid = [3e-4, 1e-3, 3e-3, 1e-2]
  scores = [[0.5, 0.7], [0.8, 0.7], [0.9, 0.8], [0.1, 0.2]]  # Means .6 .75 .85 .15.
  assert finetune.choose(grid, scores) == 3e-3
  assert finetune.choose(grid, [[0.5], [0.9], [0.9], [0.1]]) == 1e-3  # Tie: smaller.


@pytest.mark.slow
def test_learning_rates_are_tuned_on_validation_then_reported(tmp_path):
  flags = [
    "--dataset=cifar10",
    "--seeds=2",
    "--tune_seeds=1",
    "--lr_grid=1e-1,1e-3",
    "--size=mu",
    "--patch=8",
    "--batch_size=4",
    "--steps=2",
    "--methods=full,rgft_blocks",
    "--eval_batch_size=5",
    "--eval_every=1",
    f"--workdir={tmp_path}",
    "--no-progress",
  ]
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    results = finetune.main(flags)
  info = results["tasks"]["cifar10"]
  for name in ("full", "rgft_blocks"):
    t = info["tuning"][name]
    assert t["grid"] == [1e-3, 1e-1] and t["seeds"] == [finetune.TUNE_SEED]
    # Recorded scores are the tuning runs' own, on the validation split.
    for rate, scores in zip(t["grid"], t["val_accuracy"], strict=True):
      run = tmp_path / "runs" / "cifar10" / name / f"lr{rate:g}" / "tune1000"
      record = json.loads((run / "result.json").read_text())
      assert scores == [record["val_accuracy"]] and "test_accuracy" not in record
      assert record["settings"]["learning_rate"] == rate
    means = np.array(t["val_accuracy_mean"])
    best = [r for r, m in zip(t["grid"], means, strict=True) if m == means.max()]
    assert t["chosen"] == min(best)
    reported = [r for r in info["runs"] if r["method"] == name]
    assert [r["seed"] for r in reported] == [0, 1]
    assert {r["settings"]["learning_rate"] for r in reported} == {t["chosen"]}
    assert info["summary"][name]["learning_rate"] == t["chosen"]
  table = (tmp_path / "results.md").read_text()
  assert "| method | steps | LR |" in table and "learning-rate tuning" in table
  assert "cifar10_lr_tuning.png" in os.listdir(tmp_path / "plots")
  # A second call finds every run, tuning runs included, and redoes none.
  before = _listing(tmp_path / "runs")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    again = finetune.main(flags)
  assert _listing(tmp_path / "runs") == before
  assert again["tasks"]["cifar10"]["tuning"] == info["tuning"]


def test_every_flag_has_help():
  from experiments import ablate
  from experiments import cli

  for parser in (
    cli.parser(finetune.Config, ""),
    cli.parser(ablate.AblateConfig, "", exclude=ablate._NOT_HERE),
  ):
    flags = [a for a in parser._actions if a.dest != "help"]
    assert flags and all(a.help for a in flags), [a.dest for a in flags if not a.help]


# Nothing silent: what the harness saved is checked before it is used.


def _tiny_task(n=16, classes=3, side=16):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(n, side, side, 3), dtype=np.uint8)
  source = data_lib.ArraySource(images, rng.integers(0, classes, size=n))
  return data_lib.Task("tiny", classes, source, source)


def _tiny_config(tmp_path, **changes):
  return finetune.Config(
    size="mu",
    patch=4,
    pretrain_steps=2,
    pretrain_batch_size=4,
    batch_size=4,
    eval_batch_size=16,
    log_every=1,
    ckpt_every=2,
    workdir=str(tmp_path),
    progress=False,
    **changes,
  )


# The damaged arrays' failed background reads are expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_pretraining_cache_is_refused(tmp_path, monkeypatch):
  cfg, task = _tiny_config(tmp_path), _tiny_task()
  example = jnp.zeros((2, 16, 16, 3))
  params, _ = finetune.pretrain(cfg, "tiny", task, example)
  where, _ = finetune.pretrain_dir(cfg, "tiny")
  done_json = pathlib.Path(where, "done.json")
  done = json.loads(done_json.read_text())
  monkeypatch.setattr(train_lib, "run", lambda *a, **k: pytest.fail("trained"))
  again, _ = finetune.pretrain(cfg, "tiny", task, example)  # A whole cache is read.
  assert train_lib.checksum(again) == train_lib.checksum(params)
  # 16 bytes flipped in the largest array file: restored by orbax, refused here.
  files = [p for p in (tmp_path / "pretrained").rglob("params/**/*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  raw = bytearray(biggest.read_bytes())
  mid = len(raw) // 2
  raw[mid : mid + 16] = bytes(255 - b for b in raw[mid : mid + 16])
  biggest.write_bytes(bytes(raw))
  before = _listing(tmp_path)
  with pytest.raises(ValueError, match=r"cached pretraining in .* is damaged"):
    finetune.pretrain(cfg, "tiny", task, example)
  assert _listing(tmp_path) == before  # Left as it is.
  assert done["checksum"] == train_lib.checksum(params)
  # A cache written before checksums were kept cannot be checked: refused too.
  del done["checksum"]
  done_json.write_text(json.dumps(done))
  with pytest.raises(ValueError, match="has no checksum"):
    finetune.pretrain(cfg, "tiny", task, example)
  # Reads of the damaged arrays that failed in background threads are
  # collected here, in the test that made them, not in whichever test runs
  # next on this worker.
  gc.collect()


def _another(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, int | float):
    return value * 2 + 1
  return value + "_x"


def test_every_setting_but_the_listed_ones_is_in_a_run_s_signature():
  """Changing any field of the study's config changes a run's settings,
  except those that only choose, place or report runs."""
  cfg = finetune.Config(pretrained="train")
  free = set(finetune.NOT_IN_SIGNATURE)
  fields = [f.name for f in dataclasses.fields(finetune.Config)]
  assert free < set(fields)
  for name in fields:
    changed = dataclasses.replace(cfg, **{name: _another(getattr(cfg, name))})
    same = changed.run_settings() == cfg.run_settings()
    assert same == (name in free), name


def test_a_result_of_another_run_is_refused(tmp_path):
  cfg = _tiny_config(tmp_path)
  task = finetune.TaskSetup("label_shift", *[None] * 7)
  settings = cfg.run_settings()
  record = {"task": "label_shift", "method": "rgft_blocks", "seed": 0}
  record.update(test_accuracy=0.5, settings=settings)

  def place(name, seed, rec, tuning=False):
    where = finetune.run_dir(cfg, "label_shift", name, seed, tuning)
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, "result.json"), "w") as f:
      json.dump(rec, f)

  place("rgft_blocks", 0, record)
  assert finetune.one_run(cfg, task, "rgft_blocks", 0, {}) == record  # Its own.
  place("rgft_budget@0.7", 0, record)  # Copied into another method's directory.
  place("rgft_blocks", 1, record)  # ... another seed's.
  place("rgft_blocks", finetune.TUNE_SEED, record, tuning=True)  # A tuning run's.
  before = _listing(tmp_path)
  for name, seed, tuning, wrong in (
    (
      "rgft_budget@0.7",
      0,
      False,
      r"method 'rgft_blocks' \(this run: 'rgft_budget@0.7'\)",
    ),
    ("rgft_blocks", 1, False, r"seed 0 \(this run: 1\)"),
    ("rgft_blocks", finetune.TUNE_SEED, True, r"seed 0 \(this run: 1000\)"),
  ):
    with pytest.raises(ValueError, match=r"records another run: " + wrong):
      finetune.one_run(cfg, task, name, seed, {}, tuning=tuning)
  other = finetune.TaskSetup("input_shift", *[None] * 7)
  with pytest.raises(ValueError, match=r"task 'label_shift' \(this run: 'input_shift'"):
    where = finetune.run_dir(cfg, "label_shift", "rgft_blocks", 0, False)
    finetune.one_run(cfg, other, "rgft_blocks", 0, {}, where=where)
  assert _listing(tmp_path) == before  # Nothing moved, nothing mixed in.


def test_a_checkpoint_of_another_seed_or_task_is_not_resumed(tmp_path):
  model, params, x = _tiny(classes=3, image=16, patch=4)
  data, test = _small_data()
  method = methods_lib.make("full", model, params, x, methods_lib.Hyper(steps=6))
  _run(model, method, data, test, 2, tmp_path / "seed0", seed=0)
  # Seed 0's checkpoint in seed 1's directory (swapped by hand): refused.
  shutil.copytree(tmp_path / "seed0" / "ckpt", tmp_path / "seed1" / "ckpt")
  before = _listing(tmp_path)
  with pytest.raises(
    ValueError, match=r"different setup.*seed: checkpoint 0, this run 1"
  ):
    _run(model, method, data, test, 4, tmp_path / "seed1", seed=1)
  assert _listing(tmp_path) == before
  _run(model, method, data, test, 2, tmp_path / "a", seed=0, task="a")
  before = _listing(tmp_path)
  with pytest.raises(
    ValueError, match=r"different setup.*task: checkpoint a, this run b"
  ):
    _run(model, method, data, test, 4, tmp_path / "a", seed=0, task="b")
  assert _listing(tmp_path) == before


class _RGFTStateBeforeEma(NamedTuple):
  """RGFT's state as the release before the rename wrote it (`ema` was `error_map`)."""

  count: Any
  error_map: Any
  alpha: Any
  observed: Any
  nonfinite: Any
  negative: Any
  clipped: Any


def test_a_checkpoint_from_before_the_ema_rename_resumes(tmp_path):
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  comps = rgft_jax.Components.from_regex(params, [(r"(\w)", r"\1")])
  tx = rgft_jax.rgft(0.1, comps, warmup_steps=10)
  grads = {"a": jnp.ones(2), "b": jnp.ones(2)}
  _, state = tx.update(grads, tx.init(params), params, error_map={"a": 1.0, "b": 0.25})
  old = tuple(
    _RGFTStateBeforeEma(*s) if isinstance(s, rgft_jax.ScaleByResidualErrorState) else s
    for s in state
  )
  method = types.SimpleNamespace(name="rgft_blocks", components=comps)

  def sign(tree):
    return checkpoint.signature(method, tree, {"lr": 0.1}, seed=0, task="t")

  assert "[1][1].error_map: float32[2]" in sign((params, old))["state"]
  ckpts = checkpoint.Checkpoints(str(tmp_path), sign((params, old)), every=1)
  assert ckpts.resume((params, old)) is None
  ckpts.save(1, (params, old), {"step": 1})
  ckpts.close()
  fresh = (params, tx.init(params))
  ckpts = checkpoint.Checkpoints(str(tmp_path), sign(fresh), every=1)
  (_, restored), log = ckpts.resume(fresh)
  ckpts.close()
  assert log["step"] == 1
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  rgft = rgft_jax.residual_error_state(restored)
  np.testing.assert_array_equal(rgft.ema, np.float32([1.0, 0.25]))  # ema_1 = map.
  assert int(rgft.count) == 1
  # Adam's moments came back too: mu = (1 - b1) * grads.
  np.testing.assert_allclose(restored[0].mu["a"], [0.1, 0.1], rtol=1e-6)


def _slow_json_writes(monkeypatch, seconds=1.0, fail=None):
  """Orbax's JSON writer made slow (or failing with `fail` at step 4)."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

  write = handler.JsonCheckpointHandler._save_fn

  async def slow(self, item, directory):
    if fail is not None and "/4." in str(directory):
      raise fail
    await asyncio.sleep(seconds)
    await write(self, item, directory)

  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", slow)


def test_a_checkpoint_holds_the_log_of_its_own_step(tmp_path, monkeypatch):
  # The log is written in the background while the loop goes on appending to
  # it: a slow writer (a loaded machine) must still write step 2's log.
  _slow_json_writes(monkeypatch)
  model, params, x = _tiny(classes=3, image=16, patch=4)
  data, test = _small_data()
  method = methods_lib.make("full", model, params, x, methods_lib.Hyper(steps=6))
  _run(model, method, data, test, 4, tmp_path, log_every=1)
  for step in (2, 4):
    log = json.loads((tmp_path / "ckpt" / str(step) / "log" / "metadata").read_text())
    assert log["step"] == step
    assert log["history"]["step"] == list(range(1, step + 1))


def test_an_edited_checkpoint_log_is_damaged(tmp_path):
  model, params, x = _tiny(classes=3, image=16, patch=4)
  data, test = _small_data()
  hyper = methods_lib.Hyper(steps=6)

  def go(steps, where):
    method = methods_lib.make("full", model, params, x, hyper)
    return _run(model, method, data, test, steps, where, seed=1, log_every=1)

  straight, p_straight = go(6, tmp_path / "a")
  go(4, tmp_path / "b")
  path = tmp_path / "b" / "ckpt" / "4" / "log" / "metadata"
  log = json.loads(path.read_text())
  path.write_text(json.dumps({**log, "step": 5}))  # "Skip" a step by hand.
  with pytest.warns(RuntimeWarning, match=r"step 4 .* damaged .*resuming from step 2"):
    resumed, p_resumed = go(6, tmp_path / "b")
  assert (tmp_path / "b" / "ckpt_corrupt" / "4").is_dir()
  for a, b in zip(jax.tree.leaves(p_straight), jax.tree.leaves(p_resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert resumed["history"] == straight["history"]


def test_a_log_edited_anywhere_fails_its_checksum():
  log = {"step": 4, "history": {"loss": [1.0, 0.5]}, "policy": {"steps": 4}}
  log["log_checksum"] = checkpoint.log_checksum(log)
  assert checkpoint._log_problem(4, log) is None
  edited = {**log, "history": {"loss": [1.0, 0.4]}}
  assert "checksum" in checkpoint._log_problem(4, edited)
  assert "step 4" in checkpoint._log_problem(5, log)  # A renamed directory.
  old = {"step": 4, "policy": {"steps": 5}}  # Written before logs had checksums.
  assert "5 steps" in checkpoint._log_problem(4, old)


def test_a_full_disk_is_one_clear_error(tmp_path, monkeypatch, caplog):
  model, params, x = _tiny(classes=3, image=16, patch=4)
  data, test = _small_data()
  method = methods_lib.make("full", model, params, x, methods_lib.Hyper(steps=6))
  _slow_json_writes(monkeypatch, 0.0, OSError(errno.EFBIG, "File too large"))
  with pytest.raises(OSError, match="Cannot write the checkpoint of step 4") as e:
    _run(model, method, data, test, 6, tmp_path)
  assert e.value.errno == errno.EFBIG
  assert "File too large" in str(e.value) and "resumes from" in str(e.value)
  assert e.value.__suppress_context__  # One message, not a chain of tracebacks.
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
  assert (tmp_path / "ckpt" / "2").is_dir()  # What was whole is still there.


def test_no_whole_checkpoint_is_one_message(tmp_path, monkeypatch):
  model, params, x = _tiny(classes=3, image=16, patch=4)
  data, test = _small_data()
  method = methods_lib.make("full", model, params, x, methods_lib.Hyper(steps=6))
  _run(model, method, data, test, 4, tmp_path)
  for p in (tmp_path / "ckpt").rglob("*"):  # Every array file cut short.
    if p.is_file() and "state" in p.parts and p.parent.name == "d":
      p.write_bytes(p.read_bytes()[:10])
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  with pytest.raises(ValueError, match=r"No whole checkpoint.*do not restore"):
    _run(model, method, data, test, 6, tmp_path)
  time.sleep(0.5)  # Reads abandoned by the failed restore finish meanwhile,
  gc.collect()  # and the coroutines that they left are closed.
  assert not seen, [f"{u.exc_value!r} in {u.object!r}" for u in seen]


def test_compare_refuses_what_it_cannot_pair(tmp_path, capsys):
  listed = tmp_path / "list.json"
  listed.write_text("[1, 2]")
  with pytest.raises(SystemExit, match=r"not a fine-tuning study's results.*list"):
    compare.main([str(listed), "a", "b"])
  runs = [
    {"method": "a", "seed": 0, "test_accuracy": 0.9},
    {"method": "a", "seed": 1, "test_accuracy": 0.8},
    {"method": "b", "seed": 0, "test_accuracy": 0.7},
    {"method": "c", "seed": 2, "test_accuracy": 0.5},
  ]
  results = tmp_path / "results.json"
  results.write_text(json.dumps({"tasks": {"t": {"runs": runs}}}))
  with pytest.raises(SystemExit, match=r"a and c share no seed") as e:
    compare.main([str(results), "a", "b", "a", "c"])
  assert e.value.code != 0
  out = capsys.readouterr().out
  assert "t: a - b: +20.0 pt ± n/a (one seed)" in out and "nan" not in out


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  take = (
    f"import os, sys; sys.path.insert(0, {root!r}); from experiments import store; "
    f"held = store.lock({str(tmp_path)!r}); held.__enter__(); "
  )
  # A study that holds the lock is refused ...
  holder = subprocess.Popen(
    [sys.executable, "-c", take + "print('held', flush=True); sys.stdin.read()"],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  other = None
  try:
    assert holder.stdout.readline() == "held\n"
    # Started later than the holder (its start time differs), alive throughout.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(ValueError, match=f"Another study \\(pid {holder.pid}\\)"):
      with train_lib.lock(str(tmp_path)):
        pass
    # ... one that died without releasing it, its pid now another process's, is not.
    holder.kill()
    holder.wait()
    lock = tmp_path / ".lock"
    text = lock.read_text()
    if text.strip().isdigit():  # A lock holding the pid alone.
      lock.write_text(str(other.pid))
    else:
      lock.write_text(json.dumps({**json.loads(text), "pid": other.pid}))
    with train_lib.lock(str(tmp_path)):
      pass
  finally:
    for p in (holder, other):
      if p is not None:
        p.kill()
        p.wait()
    holder.stdin.close()
    holder.stdout.close()


def test_a_batch_larger_than_the_data_is_refused_before_compute(tmp_path, monkeypatch):
  monkeypatch.setattr(finetune, "pretrain", lambda *a: pytest.fail("computed"))
  with pytest.raises(
    ValueError,
    match=r"--batch_size 100000 is larger than the label_shift training "
    r"split \(\d+ examples\); use at most \d+",
  ):
    finetune.main([f"--workdir={tmp_path}", "--batch_size=100000"])
  train = [f"--workdir={tmp_path}", "--pretrained=train"]
  with pytest.raises(ValueError, match=r"--pretrain_batch_size 100000 is larger"):
    finetune.main([*train, "--pretrain_batch_size=100000"])
  # The shipped source models are not pretrained here: no pretraining batch.
  monkeypatch.setattr(finetune, "prepare", lambda *a, **k: pytest.fail("computed"))
  with pytest.raises(pytest.fail.Exception, match="computed"):
    finetune.main([f"--workdir={tmp_path}", "--pretrain_batch_size=100000"])
  # Memory: a batch whose activations cannot fit (here, in 64 MiB) is refused.
  monkeypatch.setattr(
    cli, "available_memory", lambda: (2**26, "test memory"), raising=False
  )
  with pytest.raises(ValueError, match=r"--batch_size 512 needs at least .* GiB"):
    finetune.main([*train, "--batch_size=512", "--size=S"])
  with pytest.raises(ValueError, match=r"checkpoint is for another ViT: --size 'S'"):
    finetune.main([f"--workdir={tmp_path}", "--size=S"])


@pytest.mark.slow
def test_a_scanned_vit_gates_at_run_time_and_equals_the_loop(tmp_path, tiny_costs):
  """Budgeted RGFT on the scanned ViT: one compiled step for every detached
  set, and the same training as the looped model's compiled variants."""
  from experiments.vit import scan_params

  looped, params, x, costs = tiny_costs
  scanned = VisionTransformer(num_classes=3, patch=4, size="mu", scan=True)
  data, test = _small_data(steps=8)
  hyper = methods_lib.Hyper(steps=8, budget_every=2)
  # The same costs under the scanned layout's names (layer l of the scan is
  # named `encoderblock/l/...`), so that both budgets decide alike.
  renamed = tuple(
    re.sub(r"encoderblock_(\d+)", r"encoderblock/\1", n) for n in costs.detach.names
  )
  scan_costs = dataclasses.replace(
    costs, detach=rgft_jax.DetachCosts(renamed, costs.detach.full, costs.detach.saving)
  )
  runs = {}
  for name, model, p, c in (
    ("loop", looped, params, costs),
    ("scan", scanned, scan_params(params), scan_costs),
  ):
    method = methods_lib.make("rgft_budget@0.7", model, p, x, hyper, costs=c)
    runs[name] = _run(
      model, method, data, test, 8, tmp_path / name, seed=1, log_every=1
    )
    runs[name] += (method,)
  (loop, p_loop, m_loop), (scan, p_scan, m_scan) = runs["loop"], runs["scan"]
  assert m_loop.runtime is None and m_scan.runtime is scan_costs.detach

  def scan_named(counts):
    return {
      re.sub(r"encoderblock_(\d+)", r"encoderblock/\1", k): v for k, v in counts.items()
    }

  assert scan["steps_per_variant"] == scan_named(loop["steps_per_variant"])
  assert len(loop["steps_per_variant"]) >= 2  # Several detached sets ran...
  assert scan["compilations"] == 1  # ...from one compiled scanned step.
  assert loop["compilations"] == len(loop["steps_per_variant"])
  np.testing.assert_allclose(
    scan["history"]["loss"], loop["history"]["loss"], rtol=1e-5
  )
  got = scan_params(p_scan, scan=False)
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(p_loop)[0], jax.tree.leaves(got), strict=True
  ):
    # The key bias cannot change the attention (softmax is shift-invariant):
    # its gradient is rounding noise, which Adam's normalisation amplifies.
    if not jax.tree_util.keystr(path).endswith("['key']['bias']"):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  # A runtime step is charged what its set leaves, from the same costs.
  assert scan["step_flops"] == pytest.approx(scan_named(loop["step_flops"]), rel=0.02)
  for v, f in scan["step_flops"].items():
    members = {c for c in renamed if c.replace("Transformer/", "") in v.split(",")}
    assert f == pytest.approx(scan_costs.detach.step(members))


@pytest.mark.slow
def test_controls_and_peers_run_within_their_budget(tmp_path, tiny_costs):
  model, params, x, costs = tiny_costs
  data, test = _small_data(steps=12)
  # One GreenTrainer selection: its probes cost as much as steps in so short a run.
  hyper = methods_lib.Hyper(steps=12, budget_every=3, greentrainer_period=1.0)
  # GreenTrainer's tensors, input first: the patch embedding leads, the head ends.
  assert costs.freeze.names[0].startswith("embedding/")
  assert costs.freeze.names[-1].startswith("head/")
  assert costs.freeze.additivity_error < 0.05
  # (The rules themselves are checked against hand traces in test_rules.py.)
  for name in (
    "static_budget@0.7",
    "surgical_last@0.7",
    "dropbp@0.8",
    "greentrainer@0.9",
  ):
    method = methods_lib.make(name, model, params, x, hyper, costs=costs)
    record, _ = _run(
      model, method, data, test, 12, tmp_path / name, seed=1, log_every=1
    )
    budget = record["budget"]
    steps = sum(
      record["step_flops"][v] * n for v, n in record["steps_per_variant"].items()
    )
    assert record["train_flops"] == pytest.approx(steps + record["probe_flops"])
    if name.startswith(("dropbp", "greentrainer")):
      assert record["probe_flops"] > 0  # Charged to the budget as well.
    else:
      assert record["probe_flops"] == 0
      assert budget["planned_fraction"] <= 0.7 + 1e-9
    if name.startswith("dropbp"):  # A draw every step, one compiled step.
      assert method.runtime is not None and record["compilations"] == 1
    if name.startswith("greentrainer"):  # Variants are frozen tensors.
      frozen = {p for v in record["steps_per_variant"] for p in v.split(",")}
      assert frozen - {"all"} <= {
        p.replace("Transformer/", "") for p in costs.freeze.names
      }


def test_reads_left_unfinished_by_a_failed_restore_are_dropped_later_too(monkeypatch):
  """orbax's read coroutines that a failed restore left unfinished report an
  error when the garbage collector closes them, maybe during another test.
  The hook drops exactly those (an orbax read, caused by GeneratorExit)."""
  from orbax.checkpoint._src.serialization import serialization

  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoint._quiet_abandoned_reads()

  async def elsewhere():
    return None

  def report(coro):
    try:
      try:
        raise GeneratorExit
      except GeneratorExit as exit_:
        raise Exception("Encountered error while reading array index") from exit_
    except Exception as e:
      sys.unraisablehook(
        types.SimpleNamespace(
          exc_type=Exception,
          exc_value=e,
          exc_traceback=e.__traceback__,
          err_msg=None,
          object=coro,
        )
      )
    coro.close()

  read = serialization._read_array_index_and_device_put
  report(read(**dict.fromkeys(inspect.signature(read).parameters)))  # Never run.
  assert not seen
  report(elsewhere())  # Anyone else's coroutine: passed on.
  assert len(seen) == 1
