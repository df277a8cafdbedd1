import hashlib
import itertools
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
from pydoc_data import topics

import grain
import numpy as np
import pytest

from experiments.lm import data

SKIPPED = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3"}
SKIPPED |= {"site-packages", "dist-packages", "pydoc_data"}


def bucket(name: str) -> int:
  """The first 16 hex digits of SHA-256, as an integer, mod 100."""
  return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) % 100


def splits_by_hand(documents: dict[str, bytes]) -> dict[str, bytes]:
  out = {"train": b"", "validation": b"", "test": b""}
  for name in sorted(documents):
    b = bucket(name)
    split = "train" if b < 80 else ("validation" if b < 90 else "test")
    out[split] += b"\x00" + documents[name]
  return out


def stdlib_by_hand() -> dict[str, bytes]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  docs, total = {}, 0
  for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
    rel = path.relative_to(root)
    dirs = rel.parts[:-1]
    if SKIPPED & set(dirs) or (dirs and dirs[0].startswith("config-")):
      continue
    if rel.name.startswith("_sysconfigdata"):
      continue
    text = path.read_bytes()
    try:
      text.decode("utf-8")
    except UnicodeDecodeError:
      continue
    if b"\x00" in text:
      continue
    if total + len(text) > 8 * 2**20:
      break
    docs[rel.as_posix()] = text
    total += len(text)
  return docs


@pytest.mark.parametrize(
  "name, first_8_bytes, split",
  [
    # int("d9d7c69c64b6688c", 16) = 15697233401230026892, % 100 = 92.
    ("os.py", "d9d7c69c64b6688c", "test"),
    # int("25450689bdd44d01", 16) = 2685559941461462273, % 100 = 73.
    ("assert", "25450689bdd44d01", "train"),
    # int("1aefe47e20eb91fa", 16) = 1941021194789294586, % 100 = 86.
    ("await", "1aefe47e20eb91fa", "validation"),
    # int("e5fdd847484dc1cc", 16) = 16572640004460626380, % 100 = 80.
    ("asyncio/locks.py", "e5fdd847484dc1cc", "validation"),
  ],
)
def test_split_of_matches_hand_computed_buckets(name, first_8_bytes, split):
  assert hashlib.sha256(name.encode()).hexdigest()[:16] == first_8_bytes
  assert data.split_of(name) == split


def test_stdlib_corpus_matches_an_independent_build():
  corpus, docs = data.load("stdlib"), stdlib_by_hand()
  assert "os.py" in docs and "json/decoder.py" in docs
  assert not any(n.startswith(("test/", "idlelib/", "pydoc_data/")) for n in docs)
  assert sum(map(len, docs.values())) <= data.STDLIB_MAX_BYTES
  assert sum(map(len, docs.values())) > data.STDLIB_MAX_BYTES - 2**20
  want = splits_by_hand(docs)
  for split in data.SPLITS:
    assert corpus.splits[split].dtype == np.uint8
    assert corpus.splits[split].tobytes() == want[split]
    assert all(data.split_of(n) == split for n in corpus.documents[split])
  assert sorted(sum(corpus.documents.values(), ())) == sorted(docs)


def test_pydoc_corpus_matches_an_independent_build():
  corpus = data.load("pydoc")
  docs = {k: v.encode() for k, v in topics.topics.items()}
  want = splits_by_hand(docs)
  for split in data.SPLITS:
    assert corpus.splits[split].tobytes() == want[split]
  assert sum(len(corpus.splits[s]) for s in data.SPLITS) == sum(
    len(d) + 1 for d in docs.values()
  )


def test_cheaders_corpus_matches_an_independent_build(tmp_path):
  # The interpreter's headers, by a walk written here.
  root = pathlib.Path(sysconfig.get_paths()["include"])
  docs = {
    p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.h"))
  }
  assert "Python.h" in docs and len(docs) > 50
  corpus = data.load("cheaders")
  want = splits_by_hand(docs)
  for split in data.SPLITS:
    assert corpus.splits[split].tobytes() == want[split]
  # Only UTF-8 `.h` files without NUL, by relative path, nested ones included.
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.h").write_bytes(b"int a;")
  (tmp_path / "sub" / "b.h").write_bytes(b"int b;")
  (tmp_path / "c.c").write_bytes(b"int c;")
  (tmp_path / "d.h").write_bytes(b"\xff\xfe")
  (tmp_path / "e.h").write_bytes(b"x\x00y")
  assert data.cheaders_documents(str(tmp_path)) == {
    "a.h": b"int a;",
    "sub/b.h": b"int b;",
  }


@pytest.mark.parametrize("name", data.CORPORA)
def test_documents_never_straddle_splits(name):
  corpus = data.load(name)
  docs = data.stdlib_documents() if name == "stdlib" else data.pydoc_documents()
  seen = set()
  for split in data.SPLITS:
    names = corpus.documents[split]
    assert seen.isdisjoint(names)
    seen.update(names)
    assert names and list(names) == sorted(names)
    # Cut at the document marker, a split is exactly its own documents.
    chunks = corpus.splits[split].tobytes().split(data.DOC_START)
    assert chunks[0] == b""
    assert chunks[1:] == [docs[n] for n in names]
  assert seen == set(docs)


def test_splits_are_read_only():
  with pytest.raises(ValueError):
    data.load("pydoc").splits["train"][0] = 1


def test_build_refuses_documents_holding_the_separator():
  with pytest.raises(ValueError, match="separator"):
    data.build("toy", {"a": b"x\x00y"})


def test_fingerprint_checksums_the_splits_and_is_stable_across_processes():
  fp = data.fingerprint()
  for name in data.CORPORA:
    for split in data.SPLITS:
      array = data.load(name).splits[split]
      entry = fp[name][split]
      assert entry["sha256"] == hashlib.sha256(array.tobytes()).hexdigest()
      assert entry["bytes"] == len(array)
      assert entry["documents"] == len(data.load(name).documents[split])
  code = "import json; from experiments.lm import data; print(json.dumps(data.fingerprint()))"
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    env=env,
    cwd=pathlib.Path(__file__).parents[3],
  )
  assert json.loads(out.stdout) == json.loads(json.dumps(fp))


def test_unknown_corpus_raises():
  with pytest.raises(ValueError, match="Unknown corpus"):
    data.load("wikipedia")


@pytest.fixture(scope="module")
def random_bytes():
  return np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)


def test_batches_are_a_function_of_seed_and_step(random_bytes):
  def make(seed):
    return data.train_batches(random_bytes, context=9, batch_size=4, seed=seed)

  ds = make(3)
  assert isinstance(ds, grain.MapDataset)
  uninterrupted = [ds[i] for i in range(12)]
  assert all(b.shape == (4, 10) and b.dtype == np.int32 for b in uninterrupted)
  # A restart at step 7, in a fresh pipeline, by index and by iteration.
  resumed = make(3)
  for i in range(7, 12):
    np.testing.assert_array_equal(resumed[i], uninterrupted[i])
  iterated = itertools.islice(iter(make(3)[7:].to_iter_dataset()), 5)
  for got, want in zip(iterated, uninterrupted[7:], strict=True):
    np.testing.assert_array_equal(got, want)
  assert not np.array_equal(make(4)[0], uninterrupted[0])
  assert not np.array_equal(uninterrupted[0], uninterrupted[1])


def test_each_epoch_visits_every_window_once_with_a_shift(random_bytes):
  context, width = 9, 10
  count = len(random_bytes) // width - 1
  ds = data.train_batches(random_bytes, context=context, batch_size=4, seed=0)
  steps = -(-2 * count // 4)
  windows = np.concatenate([ds[i] for i in range(steps)])[: 2 * count]
  haystack = random_bytes.tobytes()
  starts = []
  for w in windows.astype(np.uint8):
    start = haystack.find(w.tobytes())
    assert start >= 0 and haystack.find(w.tobytes(), start + 1) < 0
    starts.append(start)
  starts = np.array(starts)
  assert starts.max() + width <= len(random_bytes)
  for epoch in (starts[:count], starts[count:]):
    assert sorted(epoch // width) == list(range(count))
  shifts = starts % width
  assert len(set(shifts)) == width  # Every shift 0..context occurs.
  assert not np.array_equal(starts[:count] // width, np.arange(count))  # Shuffled.
  order = starts // width
  assert not np.array_equal(order[:count], order[count:])  # Reshuffled.


def test_eval_windows_are_fixed_consecutive_windows(random_bytes):
  windows = data.eval_windows(random_bytes, context=9)
  assert windows.shape == (500, 10) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows.ravel(), random_bytes)
  some = data.eval_windows(random_bytes, context=9, max_windows=50)
  assert some.shape == (50, 10)
  np.testing.assert_array_equal(some[0], windows[0])
  np.testing.assert_array_equal(some[-1], windows[-1])
  rows = [int(np.flatnonzero((windows == w).all(1))[0]) for w in some]
  assert rows == sorted(set(rows))
  np.testing.assert_array_equal(
    data.eval_windows(random_bytes, context=9, max_windows=50), some
  )


def test_train_batches_refuse_too_little_data():
  with pytest.raises(ValueError, match="at least"):
    data.train_batches(np.zeros(15, np.uint8), context=9, batch_size=2, seed=0)
