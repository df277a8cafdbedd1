"""Pretraining to a plateau: the stopping rule, resume, the split, the shipped files."""

import dataclasses
import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from experiments import data as data_lib
from experiments import finetune
from experiments import vit_plateau


def _coded_task(n=60, classes=3, side=8):
  """Images whose every pixel is the example's index + 1 (0 is the shifts' fill)."""
  images = np.broadcast_to(
    np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, side, side, 1)
  ).copy()
  labels = np.arange(n) % classes
  return data_lib.Task("coded", classes, data_lib.ArraySource(images, labels), None)


def _noise_task(n=48, classes=3, side=8):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(n, side, side, 1), dtype=np.uint8)
  labels = rng.integers(0, classes, size=n)
  train = data_lib.ArraySource(images, labels)
  test = data_lib.ArraySource(images[:12], labels[:12])
  return data_lib.Task("noise", classes, train, test)


def _tiny(tmp_path, **changes):
  return dataclasses.replace(
    vit_plateau.get_config("quick"),
    workdir=str(tmp_path / "work"),
    out=str(tmp_path / "out"),
    **changes,
  )


def _quiet(_):
  pass


# The stopping rule --------------------------------------------------------


def _first_stop_by_hand(curve, window, delta):
  """Walks the curve keeping the best accuracy seen per step; the first step
  whose last `window` steps did not beat the best before them by > delta."""
  for i, (t, _) in enumerate(curve):
    best_before, best_recent = None, None
    for s, a in curve[: i + 1]:
      if t - s >= window:
        best_before = a if best_before is None else max(best_before, a)
      else:
        best_recent = a if best_recent is None else max(best_recent, a)
    if best_before is not None and not best_recent > best_before + delta:
      return t
  return None


def test_the_rule_on_a_curve_worked_by_hand():
  # Every 100 steps; window 300, delta 0.006.
  acc = [0.5, 0.8, 0.9, 0.93, 0.95, 0.951, 0.955, 0.953, 0.96, 0.95]
  curve = [[100 * (i + 1), a] for i, a in enumerate(acc)]
  stops = [vit_plateau.plateaued(curve[: i + 1], 300, 0.006) for i in range(10)]
  # At 700: best up to 400 is 0.93, best of 500-700 is 0.955 (+0.025): on.
  # At 800: best up to 500 is 0.95, best of 600-800 is 0.955 (+0.005): stop.
  # At 900: 0.96 in 700-900 beats 0.951 by 0.009: on again.
  assert stops == [False] * 7 + [True, False, True]
  assert _first_stop_by_hand(curve, 300, 0.006) == 800
  # Nothing before the window: never stops, however flat.
  assert not vit_plateau.plateaued([[100, 0.9], [200, 0.9]], 300, 0.0)


def test_the_rule_agrees_with_the_hand_written_one_on_random_curves():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n, every = rng.integers(1, 30), int(rng.integers(1, 4)) * 50
    acc = np.round(np.minimum(1, np.cumsum(rng.uniform(-0.02, 0.05, n)) + 0.5), 3)
    curve = [[every * (i + 1), float(a)] for i, a in enumerate(acc)]
    window, delta = int(rng.integers(1, 8)) * 50, float(rng.choice([0, 0.004, 0.01]))
    code = next(
      (
        t
        for i, (t, _) in enumerate(curve)
        if vit_plateau.plateaued(curve[: i + 1], window, delta)
      ),
      None,
    )
    assert code == _first_stop_by_hand(curve, window, delta)


@pytest.mark.slow
def test_training_stops_where_the_rule_says_and_keeps_the_best(tmp_path, monkeypatch):
  def fake(values):
    it = iter(values)
    monkeypatch.setattr(vit_plateau, "_evaluate", lambda *a: next(it))

  task = _noise_task()
  accs = [0.2, 0.5, 0.6, 0.58, 0.6, 0.59, 0.4, 0.9]
  fake(accs)
  cfg = _tiny(tmp_path / "a", max_steps=100, window=6, min_delta=0.01)
  best, log = vit_plateau.train(cfg, "noise", task, say=_quiet)
  # By hand: at step 10 the best of 6-10 (0.6) beats the best by 4 (0.5) by
  # more than 0.01; at 12 the best of 8-12 (0.6) does not beat 0.6 (by 6).
  curve = [[2 * (i + 1), a] for i, a in enumerate(accs[:6])]
  assert _first_stop_by_hand(curve, 6, 0.01) == 12
  assert (log["stopped"], log["step"]) == ("plateau", 12)
  assert log["curve"] == curve
  assert (log["best_step"], log["best_accuracy"]) == (6, 0.6)  # The first of ties.
  # The best parameters are those of step 6: a run stopped there ends on them.
  fake(accs)
  at6, log6 = vit_plateau.train(_tiny(tmp_path / "b", max_steps=6), "noise", task)
  assert (log6["stopped"], log6["best_step"]) == ("max_steps", 6)
  for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(at6), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Without a plateau, max_steps stops it (evaluated there, off the grid).
  fake([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
  _, log = vit_plateau.train(_tiny(tmp_path / "c", max_steps=9), "noise", task)
  assert (log["stopped"], log["step"]) == ("max_steps", 9)
  assert [s for s, _ in log["curve"]] == [2, 4, 6, 8, 9]


# Resume ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
  task = _noise_task()
  straight, log = vit_plateau.train(_tiny(tmp_path / "a"), "noise", task, say=_quiet)
  cfg = _tiny(tmp_path / "b")
  assert vit_plateau.train(cfg, "noise", task, halt_at=5, say=_quiet) is None
  said = []
  # Other settings are refused, naming them; nothing is trained.
  other = dataclasses.replace(cfg, learning_rate=3e-3)
  with pytest.raises(
    ValueError, match=r"different setup.*learning_rate 0.001 -> 0.003"
  ):
    vit_plateau.train(other, "noise", task, say=said.append)
  resumed, again = vit_plateau.train(cfg, "noise", task, say=said.append)
  assert said[0].startswith("noise: resumed at step 5")
  assert again["step"] == log["step"] == 10
  for key in ("curve", "best_step", "best_accuracy", "stopped"):
    assert again[key] == log[key], key
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# The split ------------------------------------------------------------------


def test_validation_examples_are_never_trained_on(tmp_path):
  task = _coded_task()
  cfg = _tiny(tmp_path, batch_size=9, shift=2)
  train, val = vit_plateau.splits(cfg, task)
  # Decode each example from its pixels, not from the split's indices.
  val_ids = {int(val[i]["image"][4, 4, 0]) - 1 for i in range(len(val))}
  ds = vit_plateau.batches(cfg, train)
  trained = set()
  for step in range(5 * len(train) // cfg.batch_size):  # About five epochs.
    images = ds[step]["image"]
    trained |= set(np.rint((images[:, 4, 4, 0] + 1) * 127.5).astype(int) - 1)
  assert len(val_ids) == 15  # A quarter of each class's 20.
  assert not trained & val_ids
  assert trained | val_ids == set(range(60))


def test_the_source_validation_split_comes_from_the_source_training_split():
  cfg = vit_plateau.PlateauConfig()
  for name, (source, _) in data_lib.embedded_tasks().items():
    train, val = vit_plateau.splits(cfg, source)

    def keys(split):
      return {
        split[i]["image"].tobytes() + bytes([split[i]["label"]])
        for i in range(len(split))
      }

    train_keys, val_keys = keys(train), keys(val)
    assert not train_keys & val_keys, name
    assert not val_keys & keys(source.test), name
    assert len(val) == pytest.approx(0.1 * len(source.train), abs=5), name


# The shipped files ----------------------------------------------------------


def _export(tmp_path):
  cfg, task = _tiny(tmp_path), _noise_task()
  params, log = vit_plateau.train(cfg, "noise", task, say=_quiet)
  record = vit_plateau.export(cfg, "noise", task, params, log, "the command")
  return cfg, task, params, log, record


def test_the_loader_checks_the_file_and_the_model(tmp_path):
  cfg, task, params, log, record = _export(tmp_path)
  npz, sidecar = vit_plateau.paths("noise", cfg.out)
  assert record["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
  model = {
    "size": "mu",
    "patch": 4,
    "image_size": 8,
    "channels": 1,
    "num_classes": 3,
    "layout": "looped",
  }
  loaded, _ = vit_plateau.load_shipped("noise", model, cfg.out)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # One byte flipped, in a copy: refused, naming the file and both hashes.
  copy = tmp_path / "copy"
  shutil.copytree(cfg.out, copy)
  raw = bytearray((copy / npz.name).read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  (copy / npz.name).write_bytes(bytes(raw))
  flipped = hashlib.sha256(bytes(raw)).hexdigest()
  with pytest.raises(ValueError) as e:
    vit_plateau.load_shipped("noise", model, copy)
  assert str(copy / npz.name) in str(e.value)
  assert flipped in str(e.value) and record["sha256"] in str(e.value)
  # A model other than the sidecar's is refused, naming what differs.
  with pytest.raises(ValueError, match=r"another model.*patch 4 \(requested 2\)"):
    vit_plateau.load_shipped("noise", {**model, "patch": 2}, cfg.out)
  # So is a sidecar written for another model next to these arrays.
  other = json.loads(sidecar.read_text())
  other["model"]["size"] = "xs"
  (copy / sidecar.name).write_text(json.dumps(other))
  with pytest.raises(ValueError, match=r"another model.*size 'xs' \(requested 'mu'\)"):
    vit_plateau.load_shipped("noise", model, copy)
  # Equal arrays give equal bytes (a rebuild on this machine is checkable).
  again = vit_plateau.export(cfg, "noise", task, params, log, "the command")
  assert again["sha256"] == record["sha256"]


def test_the_shipped_checkpoints_load_for_the_study():
  for task in ("label_shift", "input_shift"):
    npz, sidecar = vit_plateau.paths(task)
    record = json.loads(sidecar.read_text())
    assert record["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert npz.stat().st_size <= 25 * 2**20
    assert record["stopped"] in ("plateau", "max_steps")
    assert record["best_val_accuracy"] == max(a for _, a in record["val_curve"])


@pytest.mark.slow
def test_prepare_starts_from_the_shipped_checkpoint():
  cfg = finetune.Config(pretrained="shipped", scan=True, tasks="label_shift")
  cfg.validate()
  name, source, target = finetune.study_tasks(cfg)[0]
  task = finetune.prepare(cfg, name, source, target, costs=False)
  npz, sidecar = vit_plateau.paths(name)
  record = json.loads(sidecar.read_text())
  info = task.info["pretrained"]
  assert info["path"] == "checkpoints/vit_label_shift_plateau.npz"
  assert info["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
  assert task.info["pretrain_accuracy"] == record["source_test_accuracy"]
  assert cfg.run_settings()["pretrained"] == {"label_shift": record["sha256"]}
  # The body is the file's, stacked for the scan; the head is new (zeros).
  with np.load(npz) as f:
    for i in range(4):
      key = f"Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/kernel"
      np.testing.assert_array_equal(
        task.params["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"][
          i
        ],
        f[key],
      )
    np.testing.assert_array_equal(
      task.params["embedding"]["kernel"], f["embedding/kernel"]
    )
    np.testing.assert_array_equal(task.forget[1]["kernel"], f["head/kernel"])
  assert not np.any(task.params["head"]["kernel"])


def test_the_flag_is_checked(tmp_path):
  with pytest.raises(ValueError, match="--pretrained must be train or shipped"):
    finetune.Config(pretrained="plateau").validate()
  # A tfds dataset has no shipped source model: the flag means nothing there.
  cifar = finetune.Config(pretrained="shipped", dataset="cifar10")
  cifar.validate()
  assert cifar.run_settings()["pretrained"] == "shipped"  # As given.
  assert finetune.Config(pretrained="train").run_settings()["pretrained"] == "train"
  # The default loads the shipped models, named in each run by their hashes.
  root = pathlib.Path(__file__).resolve().parents[2] / "checkpoints"
  want = {
    t: json.loads((root / f"vit_{t}_plateau.json").read_text())["sha256"]
    for t in ("label_shift", "input_shift")
  }
  assert finetune.Config().run_settings()["pretrained"] == want
  with pytest.raises(ValueError, match=r"another ViT: --patch 4 \(it has 7\)"):
    finetune.Config(patch=4).validate()
