"""The pretrained decoder shipped in the repository: one `.npz` and its sidecar JSON.

`write` stores parameters (float32, the scanned layout, one `.npy` member per
parameter path such as `layers/attn/q_proj/kernel`) in a zip whose bytes
depend on the arrays alone (fixed member dates and order), and beside it
`<name>.json`: the file's SHA-256, the command that rebuilds it, its model
config, the corpus fingerprint and the validation curve (`plateau.py` fills
it). `load_shipped` checks all of that before returning the parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import warnings
import zipfile
from typing import Any

import jax
import numpy as np

from experiments.lm import data
from experiments.lm import model as lm
from experiments.store import load_json
from experiments.store import save_json

DEFAULT_PATH = str(pathlib.Path(__file__).parents[2] / "checkpoints" / "lm_plateau.npz")
# Bumped whenever the file or its sidecar changes shape.
FORMAT = 1
_DATE = (1980, 1, 1, 0, 0, 0)  # The zip format's earliest date, for every member.


def sidecar_path(path: str) -> str:
  """The sidecar JSON of artifact `path`: the same name ending in `.json`."""
  return os.path.splitext(path)[0] + ".json"


def file_sha256(path: str) -> str:
  """SHA-256 of the bytes of file `path`."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(2**20), b""):
      digest.update(block)
  return digest.hexdigest()


def _by_path(tree: Any) -> dict[str, Any]:
  """`{"a/b/c": leaf}` of a nested dict."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def flatten(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """`{"a/b/c": array}` of a nested dict of arrays, float32 NumPy."""
  return {
    k: np.asarray(v, np.float32) for k, v in _by_path(jax.device_get(params)).items()
  }


def unflatten(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
  """The nested dict of `flatten`'s output."""
  out: dict[str, Any] = {}
  for key, value in arrays.items():
    *parents, last = key.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def write(path: str, params: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
  """Writes `params` to `path` and `record` with the file's SHA-256 to its sidecar.

  Returns:
    The sidecar's content: `record` plus `file`, `sha256`, `bytes`, `dtype`,
    `format` and `parameters` (their count).
  """
  arrays = flatten(params)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
    for key in sorted(arrays):
      with zf.open(zipfile.ZipInfo(key + ".npy", _DATE), "w", force_zip64=True) as f:
        np.lib.format.write_array(f, arrays[key], allow_pickle=False)
  os.replace(tmp, path)
  record = {
    **record,
    "file": os.path.basename(path),
    "sha256": file_sha256(path),
    "bytes": os.path.getsize(path),
    "dtype": "float32",
    "format": FORMAT,
    "parameters": int(sum(a.size for a in arrays.values())),
  }
  save_json(sidecar_path(path), record)
  return record


def _config_differences(saved: dict, expected: dict) -> str:
  keys = sorted(saved.keys() | expected.keys())
  return ", ".join(
    f"{k} {saved.get(k)!r} (file) vs {expected.get(k)!r} (expected)"
    for k in keys
    if saved.get(k) != expected.get(k)
  )


def load_shipped(
  path: str = DEFAULT_PATH,
  *,
  model: lm.Config | None = None,
  check_corpus: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The shipped parameters (scanned layout, float32) and their sidecar record.

  Args:
    path: The `.npz`; its sidecar is `sidecar_path(path)`.
    model: The decoder the caller expects; a file of another config is
      refused. None takes the sidecar's.
    check_corpus: Compare the sidecar's corpus fingerprint with this
      machine's corpus (builds it, seconds): a difference is a
      RuntimeWarning naming it, and the returned record holds
      `local_corpus` (this machine's fingerprint) and `corpus_matches`, for
      the caller's results.

  Raises:
    ValueError: when the sidecar is missing or of another format, the
      file's SHA-256 differs from the sidecar's (the message names the file
      and both hashes), the model config differs from `model`, or the arrays
      are not the parameters of the sidecar's model.
  """
  side = sidecar_path(path)
  if not os.path.exists(side):
    raise ValueError(f"{path} has no sidecar {side}; it cannot be checked.")
  record = load_json(side)
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise ValueError(
      f"{side} is not a sidecar of format {FORMAT} "
      f"(it says {record.get('format') if isinstance(record, dict) else record!r})."
    )
  actual = file_sha256(path)
  if actual != record.get("sha256"):
    raise ValueError(
      f"{path} is not the file its sidecar describes: its SHA-256 is {actual}, "
      f"{side} records {record.get('sha256')}. The file was changed or damaged; "
      f"rebuild it with: {record.get('command')}"
    )
  saved_model = record.get("model")
  if model is not None and saved_model != dataclasses.asdict(model):
    raise ValueError(
      f"{path} holds another decoder than the one expected: "
      f"{_config_differences(saved_model or {}, dataclasses.asdict(model))}."
    )
  try:
    cfg = lm.Config(**saved_model)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{side} names no valid model config ({e}).") from None
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  from experiments.lm.methods import Decoder  # Imports the RGFT stack.

  decoder = Decoder(cfg)
  abstract = _by_path(jax.eval_shape(lambda: decoder.init(0)))
  expected = {k: (tuple(v.shape), np.dtype(np.float32)) for k, v in abstract.items()}
  got = {k: (v.shape, v.dtype) for k, v in arrays.items()}
  if got != expected:
    wrong = sorted(
      k for k in got.keys() | expected.keys() if got.get(k) != expected.get(k)
    )
    raise ValueError(
      f"{path} does not hold the parameters of the model its sidecar names; "
      f"these differ: {wrong[:5]}."
    )
  if check_corpus:
    recorded = record.get("corpus") or {}
    names = tuple(k for k in recorded if k not in ("format", "python"))
    local = data.fingerprint(names or (data.PYTHON_SOURCE,))
    differences = data.fingerprint_differences(recorded, local)
    record = {**record, "local_corpus": local, "corpus_matches": not differences}
    if differences:
      warnings.warn(
        f"The corpus on this machine differs from the one {path} was trained "
        f"on: {'; '.join(differences)}. Splits are by file name, so no file "
        "here changes split, but bits/byte on this corpus are not those in the "
        "sidecar; record `local_corpus` with your results.",
        RuntimeWarning,
        stacklevel=2,
      )
  return unflatten(arrays), record
