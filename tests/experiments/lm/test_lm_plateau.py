"""Pretraining to a plateau: the "python_source" corpus, the stopping rule,
resuming, and the shipped artifact, each against an independent computation."""

import dataclasses
import hashlib
import json
import math
import pathlib
import shutil
import sysconfig
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.lm import data
from experiments.lm import model as lm
from experiments.lm import plateau
from experiments.lm import shipped
from experiments.lm.methods import Decoder


def bucket(name: str) -> int:
  return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) % 100


def write(root: pathlib.Path, files: dict[str, bytes]) -> str:
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
  return str(root)


STDLIB = {
  "os.py": b"import sys\n",
  "json/__init__.py": b"",
  "json/decoder.py": b"class JSONDecoder:\n  pass\n",
  "test/test_os.py": b"assert True\n",  # Excluded directory.
  "site-packages/evil.py": b"x = 1\n",  # Excluded: the prefix is not reachable.
  "idlelib/run.py": b"y = 2\n",  # Excluded directory.
  "latin1.py": b"s = '\xe9'\n",  # Not UTF-8.
  "README.txt": b"not python\n",
}
SITE_A = {
  "os.py": b"# a package's os.py\n",  # Same relative path as a stdlib file.
  "pkg/__init__.py": b"",  # Same bytes as json/__init__.py: skipped.
  "pkg/mod.py": b"def f():\n  return 1\n",
  "pkg/copy.py": b"class JSONDecoder:\n  pass\n",  # A copy of json/decoder.py.
  "pkg/tests/test_mod.py": b"assert f() == 1\n",  # Excluded directory.
  "pkg/big.py": b"#" * 200 + b"\n",  # Over the file limit below.
  "shared.py": b"first = True\n",
}
SITE_B = {
  "shared.py": b"first = False\n",  # Also in SITE_A, which comes first.
  "other/x.py": b"z = 3\n",
}


@pytest.fixture
def trees(tmp_path):
  return (
    write(tmp_path / "stdlib", STDLIB),
    [write(tmp_path / "a", SITE_A), write(tmp_path / "b", SITE_B)],
  )


def test_python_documents_match_a_hand_written_selection(trees):
  stdlib, site = trees
  docs = data.python_documents(stdlib, site, max_bytes=10**6, file_max_bytes=100)
  want = {
    "json/__init__.py": b"",
    "json/decoder.py": STDLIB["json/decoder.py"],
    "os.py": STDLIB["os.py"],
    "site-packages/os.py": SITE_A["os.py"],
    "site-packages/pkg/mod.py": SITE_A["pkg/mod.py"],
    "site-packages/shared.py": SITE_A["shared.py"],
    "site-packages/other/x.py": SITE_B["other/x.py"],
  }
  assert docs == want
  assert list(docs) == sorted(want)


def test_the_byte_cap_takes_site_files_in_salted_hash_order(trees):
  stdlib, site = trees
  everything = data.python_documents(stdlib, site, file_max_bytes=100)
  stdlib_bytes = sum(len(v) for k, v in everything.items() if "site-packages" not in k)
  site_names = [k for k in everything if k.startswith("site-packages/")]
  order = sorted(
    site_names,
    key=lambda n: hashlib.sha256(b"python_source order\x00" + n.encode()).digest(),
  )
  for keep in range(len(order) + 1):
    cap = stdlib_bytes + sum(len(everything[n]) for n in order[:keep])
    docs = data.python_documents(stdlib, site, max_bytes=cap, file_max_bytes=100)
    assert sorted(k for k in docs if k.startswith("site-packages/")) == sorted(
      order[:keep]
    )
    assert sum(map(len, docs.values())) <= cap


def test_site_names_cannot_collide_with_stdlib_names(trees):
  stdlib, site = trees
  docs = data.python_documents(stdlib, site, file_max_bytes=100)
  assert docs["os.py"] != docs["site-packages/os.py"]  # Both kept, apart.
  assert "site-packages/evil.py" not in docs  # The stdlib's own is excluded.
  # On this interpreter: no stdlib file's name starts with the prefix.
  real = data._python_files(sysconfig.get_paths()["stdlib"])
  assert real and not any(n.startswith("site-packages/") for n in real)
  assert not any("/site-packages/" in f"/{n}" for n in real)


@pytest.mark.parametrize(
  "name, first_8_bytes, split",
  [
    # int("ad7f727ad65401fd", 16) = 12501836962511192573, % 100 = 73.
    ("site-packages/os.py", "ad7f727ad65401fd", "train"),
    # int("1c6efa86f617e5a1", 16) = 2048850338061477281, % 100 = 81.
    ("site-packages/jax/_src/lax/lax.py", "1c6efa86f617e5a1", "validation"),
    # int("d9d7c69c64b6688c", 16) = 15697233401230026892, % 100 = 92.
    ("os.py", "d9d7c69c64b6688c", "test"),
  ],
)
def test_split_is_by_a_hash_of_the_name(name, first_8_bytes, split):
  assert hashlib.sha256(name.encode()).hexdigest()[:16] == first_8_bytes
  assert bucket(name) == int(first_8_bytes, 16) % 100
  assert data.split_of(name) == split


def test_splits_are_by_name_and_stable_when_files_come_and_go(trees, tmp_path):
  stdlib, site = trees
  docs = data.python_documents(stdlib, site, file_max_bytes=100)
  corpus = data.build("python_source", docs)
  for split in data.SPLITS:
    for name in corpus.documents[split]:
      b = bucket(name)
      assert split == ("train" if b < 80 else "validation" if b < 90 else "test")
  # Another machine: one package more, one file fewer.
  write(pathlib.Path(site[1]), {"extra/new.py": b"new = 1\n"})
  pathlib.Path(site[0], "pkg/mod.py").unlink()
  other = data.build(
    "python_source", data.python_documents(stdlib, site, file_max_bytes=100)
  )
  for split in data.SPLITS:
    kept = set(corpus.documents[split]) - {"site-packages/pkg/mod.py"}
    assert kept <= set(other.documents[split])


def test_fingerprint_differences_name_the_split():
  fp = data.fingerprint(("pydoc",))
  assert data.fingerprint_differences(fp, json.loads(json.dumps(fp))) == []
  changed = json.loads(json.dumps(fp))
  changed["pydoc"]["test"]["bytes"] += 1
  changed["python"] = "0.0"
  lines = data.fingerprint_differences(fp, changed)
  assert len(lines) == 2
  assert lines[0].startswith("pydoc/test: recorded") and "python" in lines[1]


# The training loop.


def curve_from(values: dict[int, float]):
  """`evaluate` giving `values[step]`; records the parameters it was shown."""
  seen = {}

  def evaluate(params, step):
    seen[step] = params
    return values[step]

  return evaluate, seen


def expected_run(cfg, values: dict[int, float]) -> tuple[int, str, int, list[int]]:
  """By hand: (cooldown start, what started it, last step, evaluation steps)."""
  start, by, curve, steps = None, None, [], []
  t = 0
  while True:
    t += 1
    end = None if start is None else start + max(1, round(cfg.cooldown * start))
    if t % cfg.eval_every == 0 or t == end:
      steps.append(t)
      curve.append(values[t])
      if (
        start is None
        and t >= cfg.warmup_steps
        and len(curve) > cfg.window
        and min(curve[: -cfg.window]) - min(curve[-cfg.window :]) < cfg.threshold
      ):
        start, by = t, "plateau"
    if start is None and t >= int(cfg.max_steps / (1 + cfg.cooldown)):
      start, by = t, "max_steps"
    if end is not None and t >= end:
      return start, by, t, steps


@pytest.mark.slow
def test_the_run_stops_where_the_rule_says(tmp_path):
  cfg = dataclasses.replace(
    plateau.get_config("quick"), workdir=str(tmp_path), max_steps=400
  )
  # Falls fast, then by less than the threshold (0.05) over two evaluations
  # (first at step 35: 3.30 - min(3.28, 3.26) = 0.04), then rises again.
  values = {5: 6.0, 10: 5.0, 15: 4.2, 20: 3.8, 25: 3.30, 30: 3.28, 35: 3.26}
  values |= {t: 3.25 - 0.001 * t for t in range(36, 41)}
  values |= {t: 3.5 for t in range(41, 400)}
  start, by, last, steps = expected_run(cfg, values)
  assert (start, by, last) == (35, "plateau", 42)
  evaluate, seen = curve_from(values)
  best, progress = plateau.train(cfg, evaluate=evaluate)
  assert progress["cooldown_start"] == start and progress["stopped"] == by
  assert progress["step"] == last
  assert (
    [s for s, _ in progress["curve"]] == steps == [5, 10, 15, 20, 25, 30, 35, 40, 42]
  )
  # The best evaluation (step 40, 3.21) is the one kept, not the last.
  assert progress["best_step"] == 40
  assert jax.tree.all(jax.tree.map(np.array_equal, best, seen[40]))
  assert not jax.tree.all(jax.tree.map(np.array_equal, best, seen[42]))


@pytest.mark.slow
def test_without_a_plateau_the_cooldown_starts_in_time_for_max_steps(tmp_path):
  cfg = dataclasses.replace(
    plateau.get_config("quick"), workdir=str(tmp_path), max_steps=30
  )
  values = {t: 10.0 - 0.2 * t for t in range(1, 60)}  # Never flat.
  start, by, last, _ = expected_run(cfg, values)
  assert (start, by, last) == (25, "max_steps", 30)  # int(30 / 1.2) = 25, + 5.
  _, progress = plateau.train(cfg, evaluate=curve_from(values)[0])
  assert (progress["cooldown_start"], progress["stopped"], progress["step"]) == (
    start,
    by,
    last,
  )


@pytest.mark.slow
def test_updates_equal_an_optax_adamw_loop(tmp_path):
  cfg = dataclasses.replace(
    plateau.get_config("quick"), workdir=str(tmp_path), max_steps=1000, eval_every=10
  )
  falling = {t: 10.0 - 0.01 * t for t in range(1, 100)}
  evaluate, seen = curve_from(falling)
  plateau.train(cfg, evaluate=evaluate, should_stop=lambda t: t == 10)
  # By hand: warmup over 4 steps, then constant (no plateau yet).
  decoder = Decoder(plateau.model_config(cfg))
  params = decoder.init(cfg.seed)
  mask = jax.tree_util.tree_map_with_path(
    lambda p, _: p[-1].key not in ("scale", "bias"), params
  )
  tx = optax.chain(
    optax.clip_by_global_norm(cfg.clip),
    optax.adamw(
      lambda t: cfg.learning_rate * jnp.minimum(1.0, (t + 1) / cfg.warmup_steps),
      b1=0.9,
      b2=cfg.b2,
      eps=1e-8,
      weight_decay=cfg.weight_decay,
      mask=mask,
    ),
  )
  state = tx.init(params)
  batches = data.train_batches(
    data.load("pydoc").splits["train"], context=16, batch_size=4, seed=cfg.seed
  )

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(lambda p: lm.loss(decoder(p), batch)[0])(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(10):
    params, state = step(params, state, batches[t])
  for got, want in zip(jax.tree.leaves(seen[10]), jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
  cfg = dataclasses.replace(
    plateau.get_config("quick"), workdir=str(tmp_path / "whole")
  )
  whole, whole_progress = plateau.train(cfg)
  assert whole_progress["stopped"] in ("plateau", "max_steps")
  parts = dataclasses.replace(cfg, workdir=str(tmp_path / "parts"))
  _, first = plateau.train(parts, should_stop=lambda t: t == 13)
  assert first["stopped"] == "interrupted" and first["step"] == 13
  messages = []
  resumed, progress = plateau.train(parts, log=messages.append)
  assert messages[0].startswith("resumed at step 13")
  for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
    np.testing.assert_array_equal(got, want)
  for key in ("curve", "losses", "best_step", "cooldown_start", "stopped", "step"):
    assert progress[key] == whole_progress[key], key
  assert progress["invocations"] == 2
  # A finished run trains no further.
  again, done = plateau.train(parts, should_stop=lambda t: pytest.fail("trained"))
  assert done["step"] == progress["step"]
  assert jax.tree.all(jax.tree.map(np.array_equal, again, whole))


@pytest.mark.slow
def test_a_checkpoint_of_other_settings_is_refused(tmp_path, monkeypatch):
  cfg = dataclasses.replace(plateau.get_config("quick"), workdir=str(tmp_path))
  plateau.train(cfg, should_stop=lambda t: t == 3)
  other = dataclasses.replace(cfg, learning_rate=3e-2)
  with pytest.raises(ValueError, match=r"different setup.*learning_rate 0\.01"):
    plateau.train(other)
  real = data.fingerprint
  monkeypatch.setattr(
    data, "fingerprint", lambda names: {**real(names), "python": "0.0"}
  )
  with pytest.raises(ValueError, match=r"different setup.*data"):
    plateau.train(cfg)
  monkeypatch.setattr(data, "fingerprint", real)
  _, progress = plateau.train(cfg, should_stop=lambda t: t == 4)  # Still resumes.
  assert progress["step"] == 4


# The shipped artifact.


@pytest.fixture
def artifact(tmp_path):
  cfg = lm.Config(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_len=16)
  params = Decoder(cfg).init(3)
  record = {
    "model": dataclasses.asdict(cfg),
    "corpus": data.fingerprint(("pydoc",)),
    "command": "python -m experiments.lm.plateau --corpus pydoc",
  }
  path = str(tmp_path / "ship" / "model.npz")
  shipped.write(path, params, record)
  return cfg, params, path


def test_the_artifact_round_trips_with_its_hash(artifact):
  cfg, params, path = artifact
  raw = pathlib.Path(path).read_bytes()
  side = json.loads(pathlib.Path(path).with_suffix(".json").read_text())
  assert side["sha256"] == hashlib.sha256(raw).hexdigest()
  assert side["bytes"] == len(raw) and side["dtype"] == "float32"
  assert side["parameters"] == sum(x.size for x in jax.tree.leaves(params))
  with np.load(path) as f:  # Plain NumPy reads it, one array per path.
    np.testing.assert_array_equal(
      f["layers/attn/q_proj/kernel"], params["layers"]["attn"]["q_proj"]["kernel"]
    )
  with zipfile.ZipFile(path) as zf:  # Bytes that depend on the arrays alone.
    assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
  loaded, record = shipped.load_shipped(path, model=cfg)
  assert record["corpus_matches"] and record["local_corpus"] == side["corpus"]
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(got, want)
  copy = path.replace("model.npz", "again.npz")
  shipped.write(copy, loaded, {k: side[k] for k in ("model", "corpus", "command")})
  assert pathlib.Path(copy).read_bytes() == raw


def test_a_changed_byte_is_refused_naming_both_hashes(artifact, tmp_path):
  _, _, path = artifact
  copy = tmp_path / "flipped.npz"
  shutil.copy(path, copy)
  shutil.copy(pathlib.Path(path).with_suffix(".json"), copy.with_suffix(".json"))
  raw = bytearray(copy.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  copy.write_bytes(bytes(raw))
  recorded = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
  actual = hashlib.sha256(bytes(raw)).hexdigest()
  with pytest.raises(ValueError) as e:
    shipped.load_shipped(str(copy))
  for text in (str(copy), recorded, actual):
    assert text in str(e.value)


def test_a_sidecar_of_other_settings_is_refused(artifact):
  cfg, _, path = artifact
  with pytest.raises(ValueError, match=r"another decoder.*d_model 16 \(file\) vs 32"):
    shipped.load_shipped(path, model=dataclasses.replace(cfg, d_model=32))
  side = pathlib.Path(path).with_suffix(".json")
  record = json.loads(side.read_text())
  side.write_text(json.dumps({**record, "model": {**record["model"], "d_ff": 64}}))
  with pytest.raises(ValueError, match="does not hold the parameters"):
    shipped.load_shipped(path)
  side.write_text(json.dumps({**record, "format": 0}))
  with pytest.raises(ValueError, match="not a sidecar of format"):
    shipped.load_shipped(path)
  side.unlink()
  with pytest.raises(ValueError, match="no sidecar"):
    shipped.load_shipped(path)


def test_another_corpus_is_a_warning_and_recorded(artifact):
  _, _, path = artifact
  side = pathlib.Path(path).with_suffix(".json")
  record = json.loads(side.read_text())
  record["corpus"]["pydoc"]["train"]["sha256"] = "0" * 64
  side.write_text(json.dumps(record))
  with pytest.warns(RuntimeWarning, match="pydoc/train: recorded"):
    _, got = shipped.load_shipped(path)
  assert got["corpus_matches"] is False
  assert got["local_corpus"] == json.loads(json.dumps(data.fingerprint(("pydoc",))))


def test_command_spells_out_every_setting():
  cfg = plateau.Config(d_model=192, threshold=0.01)
  text = plateau.command(cfg)
  parsed = plateau.parse(text.split()[3:])
  assert dataclasses.replace(parsed, export=cfg.export) == cfg
  assert math.isclose(parsed.threshold, 0.01)
