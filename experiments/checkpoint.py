"""Checkpoints of a run: orbax, a signature of the setup, checksums of what is saved.

Also the arrays a study caches once (a pretraining): `save_cached`, `load_cached`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import rgft_jax
from experiments.store import load_json
from experiments.store import save_json

_ITEMS = ("state", "log")


def checksum(tree: Any) -> str:
  """SHA-256 of the arrays of `tree` (dtypes, shapes and bytes, in leaf order)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def log_checksum(log: dict[str, Any]) -> str:
  """SHA-256 of a checkpoint's log (canonical JSON), its own checksum left out."""
  rest = {k: v for k, v in log.items() if k != "log_checksum"}
  return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


# What names a run besides its settings; a checkpoint must match every one.
_IDENTITY = ("method", "task", "seed", "components")


def signature(
  method,
  state: Any,
  config: dict[str, Any] | None,
  *,
  seed: int | None = None,
  task: str | None = None,
) -> dict[str, Any]:
  """What a checkpoint must match to be resumed: the run (task, method, seed),
  its settings (`config`, the learning rate among them), the state layout."""
  return {
    "method": method.name,
    "task": task,
    "seed": seed,
    "config": config or {},
    "components": list(method.components.names) if method.components else [],
    "state": _layout(state),
  }


def _layout(state: Any) -> list[str]:
  """Path, dtype and shape of every array of `state` (arrays or abstract ones)."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return [
    f"{jax.tree_util.keystr(p)}: {np.dtype(v.dtype).name}{list(np.shape(v))}"
    for p, v in leaves
  ]


# RGFT's state as checkpoints written before its field `error_map` was renamed
# `ema` hold it (same fields, same order). Read for one release, like the alias.
_RGFT = rgft_jax.ScaleByResidualErrorState
_BeforeEma = collections.namedtuple(
  "_BeforeEma", ["error_map" if f == "ema" else f for f in _RGFT._fields]
)


def _before_ema(tree: Any) -> Any:
  """`tree` with every RGFT state in the layout it had before `ema`."""

  def is_rgft(x):
    return isinstance(x, _RGFT)

  return jax.tree.map(
    lambda x: _BeforeEma(*x) if is_rgft(x) else x, tree, is_leaf=is_rgft
  )


def _after_ema(tree: Any) -> Any:
  """Undoes `_before_ema`."""

  def is_old(x):
    return isinstance(x, _BeforeEma)

  return jax.tree.map(lambda x: _RGFT(*x) if is_old(x) else x, tree, is_leaf=is_old)


def _target(saved: Any, sig: dict[str, Any], abstract: Any):
  """`(sig, abstract)` to check and restore a checkpoint signed `saved` with:
  those given, or, for a checkpoint from before RGFT's `error_map` became
  `ema`, the old layout (restored in it, then renamed by `_after_ema`)."""
  old = _before_ema(abstract)
  layout = _layout(old)
  if isinstance(saved, dict) and saved.get("state") == layout != sig["state"]:
    return {**sig, "state": layout}, old
  return sig, abstract


def check_signature(saved: dict | None, current: dict, where) -> None:
  """Refuses to resume a checkpoint written by another method or optimizer."""
  if saved == current:
    return
  if saved is None:
    raise ValueError(f"The checkpoint in {where} has no signature; not resuming it.")
  problems = []
  for key in _IDENTITY:
    if saved.get(key) != current[key]:
      was = "not recorded" if key not in saved else saved[key]
      problems.append(f"{key}: checkpoint {was}, this run {current[key]}")
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


def _log_problem(step: int, log: Any) -> str | None:
  """Why the log of checkpoint `step` cannot be trusted, or None."""
  if not isinstance(log, dict):
    return "its log is not a JSON object"
  if "log_checksum" in log and log["log_checksum"] != log_checksum(log):
    return "its log differs from the checksum saved with it (edited or damaged)"
  if log.get("step") != step:
    return f"its log says step {log.get('step')!r}"
  policy = log.get("policy")
  if isinstance(policy, dict) and policy.get("steps", step) != step:
    return f"its policy has accounted for {policy.get('steps')!r} steps"
  return None


def _is_abandoned_read(unraisable) -> bool:
  """An asynchronous read finishing after a failed restore closed its event
  loop, or the read's coroutine closed unfinished when it is collected later
  (orbax then raises an Exception caused by the GeneratorExit)."""
  code = getattr(unraisable.object, "cr_code", None)
  if (
    code is not None
    and code.co_name == "_read_array_index_and_device_put"
    and "orbax" in code.co_filename
    and isinstance(getattr(unraisable.exc_value, "__cause__", None), GeneratorExit)
  ):
    return True
  if not isinstance(unraisable.exc_value, RuntimeError):
    return False
  if str(unraisable.exc_value) != "Event loop is closed":
    return False
  tb = unraisable.exc_traceback
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


def _quiet_abandoned_reads() -> None:
  """Drops the 'Event loop is closed' echoes of a restore that failed.

  When one array of a damaged checkpoint does not read, orbax closes its
  event loop while tensorstore's other reads are in flight; each one that
  finishes later reports `RuntimeError('Event loop is closed')` through
  `sys.unraisablehook`, and each read coroutine left unfinished reports an
  error when the garbage collector closes it, maybe much later and in other
  code (thousands of lines for a large model), burying the one message that
  says what is wrong. Only those are dropped; anything else reaches the hook
  that was there before.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_abandoned_reads", False):
    return

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook._drops_abandoned_reads = True
  sys.unraisablehook = hook


_quiet_abandoned_reads()  # Here too: the echoes may come after a restore returns.


def restore(ckpt_dir: str, abstract: Any, sig: dict[str, Any]):
  """`(state, log)` of the newest whole checkpoint in `ckpt_dir`, or None if none.

  A checkpoint is whole when its log and arrays restore, the log matches the
  SHA-256 saved in it and names its own step, and the arrays match the
  SHA-256 saved with them. Damaged checkpoints newer than the one used are
  moved to `ckpt_corrupt/<step>` beside `ckpt_dir` (never trained on, never
  overwritten), with a warning. When checkpoints exist but none is whole,
  ValueError names each one and what is wrong, and nothing is moved. A
  checkpoint written by another setup or run is refused (`check_signature`).
  One written before RGFT's state field `error_map` became `ema` is read
  (for one release).
  """
  if not os.path.isdir(ckpt_dir):
    return None
  _quiet_abandoned_reads()
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
      problem = _log_problem(step, log)
      if problem is not None:
        damaged.append((step, problem))
        continue
      expected, target = _target(log.get("signature"), sig, abstract)
      check_signature(log.get("signature"), expected, ckpt_dir)
      try:
        state = mngr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        ).state
      except Exception as e:
        damaged.append((step, f"its arrays do not restore ({type(e).__name__})"))
        continue
      if target is not abstract:
        state = _after_ema(state)
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
    if os.path.exists(aside):  # Never overwrite what an earlier run set aside.
      n = 1
      while os.path.exists(f"{aside}.{n}"):
        n += 1
      aside = f"{aside}.{n}"
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.replace(os.path.join(ckpt_dir, str(bad)), aside)
    warnings.warn(
      f"The checkpoint at step {bad} in {ckpt_dir} is damaged ({why}); moved to "
      f"{aside}, resuming from step {step}.",
      RuntimeWarning,
      stacklevel=4,
    )
  return state, log


# Errors of a full disk or a file-size limit, and how tensorstore words them.
_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NO_ROOM_TEXT = tuple(os.strerror(c) for c in _NO_ROOM)


def _no_room(e: BaseException) -> bool:
  """Whether `e` (or what caused it) says the disk or the file-size limit is full."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _NO_ROOM:
      return True
    if any(t in str(e) for t in _NO_ROOM_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


class _DropWriteFailures(logging.Filter):
  """Drops orbax's logged tracebacks of a write that found no room (the
  caller raises one message for it instead)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and _no_room(exc)) and not (
      any(t in record.getMessage() for t in _NO_ROOM_TEXT)
    )


_QUIET = _DropWriteFailures()


@contextlib.contextmanager
def writing(what: str, where: str, then: str = ""):
  """Turns a full disk while writing `what` to `where` into one clear OSError.

  Orbax writes from background threads, and each one logs its own traceback
  of the failure; while inside this block those are dropped, and after a
  failure for the rest of the process (the failed save's other writers go on
  failing as it ends). The error is raised once, naming the file system's
  complaint and what to do.
  """
  log = logging.getLogger("absl")
  held = _QUIET in log.filters
  log.addFilter(_QUIET)
  try:
    yield
  except Exception as e:
    if not _no_room(e):
      raise
    code = getattr(e, "errno", None)
    if code not in _NO_ROOM:
      code = next((c for c in _NO_ROOM if os.strerror(c) in str(e)), errno.ENOSPC)
    raise OSError(
      code,
      f"Cannot write {what} to {where}: {e}. Free disk space (or raise the "
      f"file-size limit) and run again{then}.",
    ) from None
  if not held:
    log.removeFilter(_QUIET)


def save_cached(where: str, tree: Any, record: dict[str, Any]) -> dict[str, Any]:
  """Saves `tree` to `where/params`, then `where/done.json`: `record` with the
  SHA-256 of the arrays (`checksum`), which `load_cached` checks."""
  path = os.path.abspath(os.path.join(where, "params"))
  with writing("the cached arrays", path), ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree, force=True)
  record = {**record, "checksum": checksum(tree)}
  done = os.path.join(where, "done.json")
  with writing("the cache's record", done):
    save_json(done, record)
  return record


def load_cached(where: str, abstract: Any, settings: dict[str, Any], what: str):
  """`(tree, record)` cached in `where` by `save_cached`, or None if none is.

  The cache is used only when its `done.json` names `settings` and the
  arrays restore and match the checksum saved with them. Otherwise
  ValueError says what is wrong, and the cache is left as it is (to be
  looked at, moved or removed); `what` names it in the message.
  """
  done = os.path.join(where, "done.json")
  if not os.path.exists(done):
    return None
  record = load_json(done)
  if not isinstance(record, dict) or record.get("settings") != settings:
    raise ValueError(
      f"{done} was written by another setup; it is left as it is. Use another "
      "--workdir or remove it."
    )
  fix = f"It is left as it is; move or remove {where} to redo {what}."
  if "checksum" not in record:
    raise ValueError(
      f"The cached {what} in {where} has no checksum (written before caches "
      f"were checked), so it cannot be trusted. {fix}"
    )
  _quiet_abandoned_reads()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(os.path.abspath(os.path.join(where, "params")), abstract)
  except Exception as e:  # Any failure to read it means a damaged cache.
    raise ValueError(
      f"The cached {what} in {where} is damaged: its arrays do not restore "
      f"({type(e).__name__}). {fix}"
    ) from None
  if checksum(tree) != record["checksum"]:
    raise ValueError(
      f"The cached {what} in {where} is damaged: its arrays differ from the "
      f"checksum saved with them. {fix}"
    )
  return tree, record


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
    self._saved = None  # The newest step written whole.
    self._pending = None  # The step being written in the background.

  def resume(self, state: Any):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    found = restore(self.dir, abstract, self.sig)
    self._saved = None if found is None else found[1]["step"]
    # Writes fail in the background; `_finish` raises the one message for it.
    logging.getLogger("absl").addFilter(_QUIET)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=2, save_interval_steps=self.every
    )
    self._mngr = ocp.CheckpointManager(self.dir, options=options, item_names=_ITEMS)
    return found

  def due(self, step: int, last: bool) -> bool:
    return step % self.every == 0 or last

  def _guard(self, step: int, fn):
    """`fn()`, a full disk turned into one clear OSError (`writing`); after a
    failure the manager is closed, so no writer is left running."""
    then = ""
    if self._saved is not None:
      then = f"; the run resumes from its checkpoint at step {self._saved}"
    with writing(f"the checkpoint of step {step}", self.dir, then):
      try:
        return fn()
      except BaseException:
        with contextlib.suppress(Exception):  # The first failure is raised.
          self._mngr.close()
        raise

  def _finish(self) -> None:
    """Waits for the checkpoint being written."""
    if self._pending is None:
      return
    self._guard(self._pending, self._mngr.wait_until_finished)
    self._saved, self._pending = self._pending, None

  def save(self, step: int, state: Any, log: dict[str, Any]) -> None:
    """Starts writing checkpoint `step` in the background (after the previous
    one is written). `log` is copied now: the caller goes on appending to its
    lists while the writer runs, and the checkpoint must hold this step's."""
    jax.block_until_ready(state)
    log = json.loads(json.dumps({**log, "signature": self.sig}))
    log["checksum"] = checksum(state)
    log["log_checksum"] = log_checksum(log)
    self._finish()
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), log=ocp.args.JsonSave(log)
    )
    if self._guard(step, lambda: self._mngr.save(step, args=args)):
      self._pending = step

  def close(self) -> None:
    self._finish()
    self._mngr.close()
    logging.getLogger("absl").removeFilter(_QUIET)
