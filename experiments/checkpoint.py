"""Checkpoints of a run: orbax, a signature of the setup, a checksum of the arrays."""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_ITEMS = ("state", "log")


def checksum(tree: Any) -> str:
  """SHA-256 of the arrays of `tree` (dtypes, shapes and bytes, in leaf order)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def signature(method, state: Any, config: dict[str, Any] | None) -> dict[str, Any]:
  """What a checkpoint must match to be resumed: method, settings, state layout."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {
    "method": method.name,
    "config": config or {},
    "components": list(method.components.names) if method.components else [],
    "state": [
      f"{jax.tree_util.keystr(p)}: {np.dtype(v.dtype).name}{list(np.shape(v))}"
      for p, v in leaves
    ],
  }


def check_signature(saved: dict | None, current: dict, where) -> None:
  """Refuses to resume a checkpoint written by another method or optimizer."""
  if saved == current:
    return
  if saved is None:
    raise ValueError(f"The checkpoint in {where} has no signature; not resuming it.")
  problems = []
  for key in ("method", "components"):
    if saved.get(key) != current[key]:
      problems.append(f"{key}: checkpoint {saved.get(key)}, this run {current[key]}")
  if saved.get("config") != current["config"]:
    old, new = saved.get("config") or {}, current["config"]
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    problems.append(
      "settings: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
    )
  if saved["state"] != current["state"]:
    only_saved = [e for e in saved["state"] if e not in current["state"]][:5]
    only_now = [e for e in current["state"] if e not in saved["state"]][:5]
    problems.append(
      f"optimizer state layout: checkpoint only {only_saved}, this run only {only_now}"
    )
  raise ValueError(
    f"The checkpoint in {where} was written by a different setup; it is left as "
    "it is. Use another workdir or remove it. " + "; ".join(problems)
  )


def restore(ckpt_dir: str, abstract: Any, sig: dict[str, Any]):
  """`(state, log)` of the newest whole checkpoint in `ckpt_dir`, or None if none.

  A checkpoint is whole when its log and arrays restore and the arrays match
  the SHA-256 saved with them. Damaged checkpoints newer than the one used are
  moved to `ckpt_corrupt/<step>` beside `ckpt_dir` (never trained on, never
  overwritten), with a warning. When checkpoints exist but none is whole,
  ValueError names each one and what is wrong, and nothing is moved. A
  checkpoint written by another setup is refused (`check_signature`).
  """
  if not os.path.isdir(ckpt_dir):
    return None
  with ocp.CheckpointManager(ckpt_dir, item_names=_ITEMS) as mngr:
    damaged = []
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        log = mngr.restore(
          step, args=ocp.args.Composite(log=ocp.args.JsonRestore())
        ).log
      except Exception as e:  # Any failure means a damaged file.
        damaged.append((step, f"its log does not restore ({type(e).__name__})"))
        continue
      check_signature(log.get("signature"), sig, ckpt_dir)
      try:
        state = mngr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        ).state
      except Exception as e:
        damaged.append((step, f"its arrays do not restore ({type(e).__name__})"))
        continue
      if log.get("checksum") != checksum(state):
        damaged.append((step, "its arrays differ from the checksum saved with them"))
        continue
      break
    else:
      if damaged:
        raise ValueError(
          f"No whole checkpoint in {ckpt_dir}; left as it is: "
          + "; ".join(f"step {t}: {why}" for t, why in damaged)
        )
      return None
  for bad, why in damaged:
    aside = os.path.join(os.path.dirname(ckpt_dir), "ckpt_corrupt", str(bad))
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.replace(os.path.join(ckpt_dir, str(bad)), aside)
    warnings.warn(
      f"The checkpoint at step {bad} in {ckpt_dir} is damaged ({why}); moved to "
      f"{aside}, resuming from step {step}.",
      RuntimeWarning,
      stacklevel=4,
    )
  return state, log


class Checkpoints:
  """The checkpoints of one run in `workdir/ckpt` (two kept), signed by `sig`.

  `resume(state)` returns `(state, log)` of the newest whole checkpoint (or
  None) and opens the manager; `save(step, state, log)` writes one at the
  steps `due` names (every `every` steps and the last).
  """

  def __init__(self, workdir: str, sig: dict[str, Any], every: int):
    self.dir = os.path.abspath(os.path.join(workdir, "ckpt"))
    self.sig, self.every = sig, every
    self._mngr = None

  def resume(self, state: Any):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    found = restore(self.dir, abstract, self.sig)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=2, save_interval_steps=self.every
    )
    self._mngr = ocp.CheckpointManager(self.dir, options=options, item_names=_ITEMS)
    return found

  def due(self, step: int, last: bool) -> bool:
    return step % self.every == 0 or last

  def save(self, step: int, state: Any, log: dict[str, Any]) -> None:
    jax.block_until_ready(state)
    log = {**log, "signature": self.sig, "checksum": checksum(state)}
    self._mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), log=ocp.args.JsonSave(log)
      ),
    )

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
