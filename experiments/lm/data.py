"""Byte corpora and input pipelines for the language-model study.

Both corpora ship with every CPython, so nothing is downloaded:

* `"stdlib"` (source domain): the standard library's Python source, read
  through the interpreter's own `sysconfig.get_paths()["stdlib"]`. Files are
  taken in sorted order of their relative paths until the next one would pass
  `STDLIB_MAX_BYTES` (8 MiB; about 85% of the filtered 3.11 stdlib). Left out:
  any directory named in `EXCLUDED_DIRS` (tests, IDLE, tkinter, turtledemo,
  lib2to3, installed packages, and `pydoc_data`, which *is* the target corpus),
  the build's `config-*` directory and `_sysconfigdata*` (machine-specific,
  generated), and files that are not UTF-8 or contain a NUL byte.
* `"pydoc"` (target domain): the English help topics of
  `pydoc_data.topics.topics` (about 465 KB), in sorted topic order.
* `"cheaders"` (second target domain): the C headers (`.h`) under the
  interpreter's include directory (`sysconfig.get_paths()["include"]`; about
  890 KB in 3.11), by relative path.
* `"python_source"` (pretraining to a plateau, `experiments/lm/plateau.py`):
  every stdlib file as `"stdlib"` takes them (same exclusions, same names,
  no 8 MiB cap), then the `.py` files of this interpreter's site-packages
  (`sysconfig`'s purelib and platlib, one namespace as for `import`), named
  `site-packages/<path relative to it>`. Since `"site-packages"` is an
  excluded directory, no stdlib name can start with that prefix. Files over
  `FILE_MAX_BYTES` (512 KiB: generated MLIR and protobuf modules) and files
  whose bytes equal an earlier file's (vendored copies, empty `__init__.py`)
  are skipped. The site-packages files are taken in the order of a salted
  SHA-256 of their names (a uniform sample of every package, not the
  alphabetically first ones) while the whole corpus stays within
  `PYTHON_SOURCE_MAX_BYTES` (64 MiB; reading it takes seconds). Installed
  packages differ between machines, so this corpus above all is known by its
  `fingerprint(("python_source",))`; a file's split depends on its name only,
  so two machines never disagree on where a shared file belongs.

Each document goes wholly to one split by a hash of its name (relative path
or topic): bucket `int(sha256(name)[:8 bytes]) % 100`, `<80` train, `<90`
validation, else test; adding a document never moves another (though under
the stdlib cap a new file early in sorted order can push the last ones out).
A split is the uint8 concatenation, in name order, of `DOC_START + document`
for its documents. Both corpora change between Python versions, so a study
stores `fingerprint()` with its results instead of trusting fixed checksums.

`train_batches` is a `grain.MapDataset` indexed by step (`ds[step]` is the
batch for that step, so a resumed run continues exactly); `eval_windows` is a
fixed evaluation set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
import sysconfig
from collections.abc import Mapping

import grain
import numpy as np

SPLITS = ("train", "validation", "test")
CORPORA = ("stdlib", "pydoc")  # (Source, target) domain of the study.
TARGETS = ("pydoc", "cheaders")  # Target domains a study can fine-tune on.
PYTHON_SOURCE = "python_source"  # Pretraining to a plateau.
STDLIB_MAX_BYTES = 8 * 2**20
PYTHON_SOURCE_MAX_BYTES = 64 * 2**20
FILE_MAX_BYTES = 512 * 2**10  # Larger files are generated code.
SITE_PREFIX = "site-packages/"  # Names of site-packages files in "python_source".
EXCLUDED_DIRS = frozenset(
  {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "pydoc_data",
    "__pycache__",
  }
)
DOC_START = b"\x00"  # Starts every document in a split.
# Bumped whenever the bytes produced for the same files would change.
_FORMAT = 1


def split_of(name: str) -> str:
  """The split of the document called `name`, from its SHA-256 bucket.

  >>> split_of("assert"), split_of("os.py")
  ('train', 'test')
  """
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  bucket = int.from_bytes(digest[:8], "big") % 100
  return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def _excluded(relative_dir: str) -> bool:
  parts = relative_dir.split("/") if relative_dir else []
  return bool(
    EXCLUDED_DIRS.intersection(parts) or (parts and parts[0].startswith("config-"))
  )


def _python_files(root: str) -> list[str]:
  """The `.py` files under `root` outside excluded directories, as sorted
  relative paths (`/`-separated)."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    relative = os.path.relpath(dirpath, root).replace(os.sep, "/")
    relative = "" if relative == "." else relative
    dirnames[:] = [d for d in dirnames if not _excluded(f"{relative}/{d}".lstrip("/"))]
    paths += [
      f"{relative}/{f}".lstrip("/")
      for f in filenames
      if f.endswith(".py") and not f.startswith("_sysconfigdata")
    ]
  return sorted(paths)


def _text(path: str) -> bytes | None:
  """The bytes of file `path`, or None when they are not UTF-8 or hold a NUL."""
  with open(path, "rb") as f:
    text = f.read()
  try:
    text.decode("utf-8")
  except UnicodeDecodeError:
    return None
  return None if DOC_START in text else text


def stdlib_documents(
  root: str | None = None, max_bytes: int = STDLIB_MAX_BYTES
) -> dict[str, bytes]:
  """The standard library's `.py` files as `{relative path: bytes}`, sorted.

  Args:
    root: The stdlib directory; this interpreter's when None.
    max_bytes: Files are taken in sorted path order while their total stays
      within it.
  """
  root = root or sysconfig.get_paths()["stdlib"]
  documents, total = {}, 0
  for path in _python_files(root):
    text = _text(os.path.join(root, path))
    if text is None:
      continue
    if total + len(text) > max_bytes:
      break
    documents[path], total = text, total + len(text)
  return documents


def site_roots() -> list[str]:
  """This interpreter's site-packages directories (purelib, then platlib if
  it is another directory)."""
  paths = sysconfig.get_paths()
  roots = []
  for key in ("purelib", "platlib"):
    if os.path.isdir(paths[key]) and all(
      not os.path.samefile(paths[key], r) for r in roots
    ):
      roots.append(paths[key])
  return roots


def selection_key(name: str) -> bytes:
  """The order in which `python_documents` takes site-packages files: a
  SHA-256 of the name salted apart from `split_of`'s."""
  return hashlib.sha256(b"python_source order\x00" + name.encode("utf-8")).digest()


def python_documents(
  stdlib_root: str | None = None,
  site: list[str] | None = None,
  max_bytes: int = PYTHON_SOURCE_MAX_BYTES,
  file_max_bytes: int = FILE_MAX_BYTES,
) -> dict[str, bytes]:
  """The `"python_source"` corpus as `{name: bytes}` (see the module docstring).

  Args:
    stdlib_root: The stdlib directory; this interpreter's when None.
    site: The site-packages directories, as one namespace (a relative path
      found in several is read from the first); `site_roots()` when None.
    max_bytes: The most bytes of the whole corpus: the stdlib files in sorted
      order, then the site-packages files in `selection_key` order, until the
      next one would pass it.
    file_max_bytes: Files larger than this are skipped.
  """
  stdlib_root = stdlib_root or sysconfig.get_paths()["stdlib"]
  candidates = [(p, os.path.join(stdlib_root, p)) for p in _python_files(stdlib_root)]
  found: dict[str, str] = {}
  for root in site_roots() if site is None else site:
    for p in _python_files(root):
      found.setdefault(SITE_PREFIX + p, os.path.join(root, p))
  candidates += sorted(found.items(), key=lambda item: selection_key(item[0]))
  documents, seen, total = {}, set(), 0
  for name, path in candidates:
    if os.path.getsize(path) > file_max_bytes:
      continue
    text = _text(path)
    if text is None:
      continue
    digest = hashlib.sha256(text).digest()
    if digest in seen:
      continue
    if total + len(text) > max_bytes:
      break
    documents[name], total = text, total + len(text)
    seen.add(digest)
  return dict(sorted(documents.items()))


def installed_packages(site: list[str] | None = None) -> list[str]:
  """`name==version` of the distributions in the site-packages directories,
  sorted: what tells two machines' `"python_source"` corpora apart."""
  from importlib import metadata

  found = metadata.distributions(path=site_roots() if site is None else site)
  return sorted({f"{d.metadata['Name']}=={d.version}" for d in found})


def pydoc_documents() -> dict[str, bytes]:
  """`pydoc_data.topics.topics` as `{topic: UTF-8 bytes}`, sorted by topic."""
  from pydoc_data import topics

  return {k: topics.topics[k].encode("utf-8") for k in sorted(topics.topics)}


def _readonly(x: np.ndarray) -> np.ndarray:
  x.setflags(write=False)
  return x


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A corpus split by document into uint8 byte arrays."""

  name: str
  documents: dict[str, tuple[str, ...]]  # Split -> its document names, sorted.
  splits: dict[str, np.ndarray]  # Split -> uint8 [bytes], read-only.

  def summary(self) -> dict[str, dict[str, int | str]]:
    """Per split: `sha256` of its bytes, `bytes` and `documents` counts."""
    return {
      s: {
        "sha256": hashlib.sha256(self.splits[s].tobytes()).hexdigest(),
        "bytes": len(self.splits[s]),
        "documents": len(self.documents[s]),
      }
      for s in SPLITS
    }


def build(name: str, documents: Mapping[str, bytes]) -> Corpus:
  """Splits `documents` (`{name: bytes}`) by `split_of` into a `Corpus`.

  >>> c = build("toy", {"assert": b"ab", "os.py": b"c"})
  >>> c.splits["train"].tobytes(), c.splits["test"].tobytes()
  (b'\\x00ab', b'\\x00c')
  """
  names = {s: [] for s in SPLITS}
  for doc in sorted(documents):
    if DOC_START in documents[doc]:
      raise ValueError(f"Document {doc!r} contains the document separator.")
    names[split_of(doc)].append(doc)
  splits = {
    s: _readonly(
      np.frombuffer(b"".join(DOC_START + documents[d] for d in names[s]), np.uint8)
    )
    for s in SPLITS
  }
  return Corpus(name, {s: tuple(n) for s, n in names.items()}, splits)


def cheaders_documents(root: str | None = None) -> dict[str, bytes]:
  """The `.h` files under `root` (this interpreter's include directory when
  None) as `{relative path: bytes}`, sorted; files that are not UTF-8 or
  hold a NUL byte are left out."""
  root = root or sysconfig.get_paths()["include"]
  documents = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in sorted(filenames):
      if not f.endswith(".h"):
        continue
      path = os.path.join(dirpath, f)
      relative = os.path.relpath(path, root).replace(os.sep, "/")
      with open(path, "rb") as fh:
        text = fh.read()
      try:
        text.decode("utf-8")
      except UnicodeDecodeError:
        continue
      if DOC_START not in text:
        documents[relative] = text
  return dict(sorted(documents.items()))


@functools.cache
def load(name: str) -> Corpus:
  """The corpus `"stdlib"` (source domain), `"pydoc"` or `"cheaders"` (target
  domains), or `"python_source"` (pretraining to a plateau), read once per
  process."""
  if name == "stdlib":
    return build(name, stdlib_documents())
  if name == "pydoc":
    return build(name, pydoc_documents())
  if name == "cheaders":
    return build(name, cheaders_documents())
  if name == PYTHON_SOURCE:
    return build(name, python_documents())
  raise ValueError(
    f"Unknown corpus {name!r}; expected one of {(*CORPORA, 'cheaders', PYTHON_SOURCE)}."
  )


def fingerprint(corpora: tuple[str, ...] = CORPORA) -> dict:
  """What the corpora are on this interpreter, for a study's run signature.

  Two runs used the same data if and only if their fingerprints are equal
  (the Python version is informative; the checksums decide).

  Args:
    corpora: The corpora described; the study's two by default.

  Returns:
    `{"format": int, "python": str, "stdlib": Corpus.summary(), "pydoc": ...}`
    (one entry per corpus), JSON-serialisable.
  """
  return {
    "format": _FORMAT,
    "python": sys.version.split()[0],
    **{name: load(name).summary() for name in corpora},
  }


def fingerprint_differences(recorded: dict, local: dict) -> list[str]:
  """How fingerprint `local` differs from `recorded`, one line per split or
  field that differs (empty when they are equal)."""
  lines = []
  for key in sorted(recorded.keys() | local.keys()):
    was, now = recorded.get(key), local.get(key)
    if was == now:
      continue
    if isinstance(was, dict) and isinstance(now, dict) and set(was) <= set(SPLITS):
      for split in SPLITS:
        a, b = was.get(split) or {}, now.get(split) or {}
        if a != b:
          lines.append(
            f"{key}/{split}: recorded {a.get('bytes')} bytes in "
            f"{a.get('documents')} files (sha256 {str(a.get('sha256'))[:12]}), "
            f"here {b.get('bytes')} bytes in {b.get('documents')} files (sha256 "
            f"{str(b.get('sha256'))[:12]})"
          )
    else:
      lines.append(f"{key}: recorded {was!r}, here {now!r}")
  return lines


def train_batches(
  data: np.ndarray, *, context: int, batch_size: int, seed: int
) -> grain.MapDataset:
  """Infinite batches of random `context + 1`-byte windows, random access by step.

  `data` is cut into `n = len(data) // (context + 1) - 1` consecutive
  windows; each epoch visits all `n` in a shuffled order, and each visit
  shifts its window right by a random `0..context` bytes. Batch `step` depends
  only on `seed` and `step`, so `ds[step]` after a restart is the batch an
  uninterrupted run saw.

  Args:
    data: uint8 [N] bytes of one split.
    context: Bytes the model reads; windows hold one more (the last target).
    batch_size: Windows per batch.
    seed: Non-negative seed of the shuffle and the shifts.

  Returns:
    A `grain.MapDataset` whose element `step` is int32 [batch_size, context + 1].

  >>> ds = train_batches(np.arange(100, dtype=np.uint8), context=4, batch_size=2, seed=0)
  >>> ds[7].shape, ds[7].dtype
  ((2, 5), dtype('int32'))
  """
  width = context + 1
  count = len(data) // width - 1
  if context < 1 or count < 1:
    raise ValueError(
      f"Need context >= 1 and at least {2 * width} bytes for context {context}, "
      f"got {len(data)}."
    )

  def window(k: int, rng: np.random.Generator) -> np.ndarray:
    start = k * width + int(rng.integers(width))
    return data[start : start + width].astype(np.int32)

  ds = grain.MapDataset.range(count).seed(seed).shuffle().repeat()
  return ds.random_map(window).batch(batch_size, drop_remainder=True)


def eval_windows(
  data: np.ndarray, *, context: int, max_windows: int | None = None
) -> np.ndarray:
  """A fixed evaluation set: non-overlapping windows of `context + 1` bytes.

  Windows start at multiples of `context + 1`; with `max_windows`, that many
  evenly spaced ones are kept.

  Returns:
    int32 [windows, context + 1].

  >>> eval_windows(np.arange(10, dtype=np.uint8), context=2).tolist()
  [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
  """
  width = context + 1
  count = len(data) // width
  windows = data[: count * width].reshape(count, width).astype(np.int32)
  if max_windows is not None and count > max_windows:
    windows = windows[np.linspace(0, count - 1, max_windows).round().astype(int)]
  return windows
