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


def _start_time(pid: int) -> str | None:
  """When process `pid` started (clock ticks since boot, /proc), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # Field 22; the command name (field 2, in parentheses) may hold spaces.
  return stat.rpartition(")")[2].split()[19]


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def _holder() -> dict[str, Any]:
  """Who holds a lock: this process's pid, start time and the boot it runs in."""
  pid = os.getpid()
  return {"pid": pid, "start": _start_time(pid), "boot": _boot_id()}


def _holds(text: str) -> int | None:
  """The pid of the live process that wrote lock file `text`, or None if stale.

  A pid alone is not enough: after a crash or a reboot the pid may belong to
  another process. Where /proc tells, the process must also have started at
  the time the lock records, in the same boot.
  """
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    holder = None
  if not isinstance(holder, dict):  # An old lock: the pid alone.
    text = text.strip()
    return int(text) if text.isdigit() and _alive(int(text)) else None
  pid = holder.get("pid")
  if not isinstance(pid, int) or not _alive(pid):
    return None
  boot = _boot_id()
  if holder.get("boot") and boot and holder["boot"] != boot:
    return None  # Written before a reboot.
  start = _start_time(pid)
  if holder.get("start") and start and holder["start"] != start:
    return None  # The pid now belongs to another process.
  return pid


@contextlib.contextmanager
def lock(workdir: str):
  """Holds `workdir/.lock` while a study runs there; a second one is refused.

  The lock records the pid, start time and boot of its process, so a lock
  left by a process that is gone is taken over even when its pid has been
  reused. Raises ValueError when a live process holds it or the directory
  cannot be written.
  """
  path = os.path.join(workdir, ".lock")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"Cannot write to --workdir {workdir}: {e}.") from None
  for _ in range(2):  # Once more after removing a stale lock.
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      try:
        with open(path) as f:
          pid = _holds(f.read())
      except FileNotFoundError:  # Released meanwhile.
        continue
      if pid is not None:
        raise ValueError(
          f"Another study (pid {pid}) is running in {workdir}; wait for it or "
          "use another --workdir."
        ) from None
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # Left by a process that is gone.
    except OSError as e:
      raise ValueError(f"Cannot write to --workdir {workdir}: {e}.") from None
  else:
    raise ValueError(
      f"Another study took {path} just now; wait for it or use another --workdir."
    )
  try:
    os.write(fd, json.dumps(_holder()).encode())
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
