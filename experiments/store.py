"""Files of a study: JSON written atomically, read with a clear error, and a lock."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any


def save_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def load_json(path: str) -> Any:
  """The JSON in `path`; a malformed file is an error that names it."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}); it is left as it is. Remove it to redo "
      "what it recorded."
    ) from None


@contextlib.contextmanager
def lock(workdir: str):
  """Holds `workdir/.lock` while a study runs there; a second one is refused.

  Raises ValueError when another process holds it (its pid is in the file) or
  the directory cannot be written.
  """
  path = os.path.join(workdir, ".lock")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"Cannot write to --workdir {workdir}: {e}.") from None
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    with open(path) as f:
      pid = f.read().strip()
    alive = pid.isdigit() and _alive(int(pid))
    if alive:
      raise ValueError(
        f"Another study (pid {pid}) is running in {workdir}; wait for it or use "
        "another --workdir."
      ) from None
    os.remove(path)  # Left by a process that is gone.
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except OSError as e:
    raise ValueError(f"Cannot write to --workdir {workdir}: {e}.") from None
  try:
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    yield
  finally:
    os.remove(path)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
