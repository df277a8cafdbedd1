"""Command lines from config dataclasses: one flag per field, its comment as help."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import math
import os
import textwrap
import tokenize
from collections.abc import Callable
from typing import Any


def _comments(source: str) -> dict[int, str]:
  """Comment text by line number (1-based) in `source`."""
  tokens = tokenize.generate_tokens(io.StringIO(source).readline)
  return {
    t.start[0]: t.string.lstrip("#").strip()
    for t in tokens
    if t.type == tokenize.COMMENT
  }


def field_help(cls: type) -> dict[str, str]:
  """Each field's comment in `cls` and its dataclass bases, as its --help text.

  The comment lines right above a field and those on its declaration's own
  lines (read from the source, so a wrapped declaration keeps its comment).
  """
  helps: dict[str, str] = {}
  for klass in reversed(cls.__mro__):
    if not dataclasses.is_dataclass(klass):
      continue
    source = textwrap.dedent(inspect.getsource(klass))
    comments = _comments(source)
    text_lines = source.splitlines()
    for node in ast.parse(source).body[0].body:
      if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        first = node.lineno
        while first > 1 and text_lines[first - 2].lstrip().startswith("#"):
          first -= 1  # Comment lines right above the field.
        lines = range(first, node.end_lineno + 1)
        text = " ".join(comments[i] for i in lines if i in comments)
        if text:
          helps[node.target.id] = text
  return helps


def parser(
  cls: type, description: str, exclude=(), defaults: Any = None
) -> argparse.ArgumentParser:
  """`--<field>` for every field of `cls` but `exclude`, help from its comment,
  defaults from `defaults` (an instance of `cls`; the fields' own when None)."""
  out = argparse.ArgumentParser(description=description)
  helps = field_help(cls)
  for f in dataclasses.fields(cls):
    if f.name in exclude:
      continue
    default = f.default if defaults is None else getattr(defaults, f.name)
    if f.type == "bool":
      out.add_argument(
        f"--{f.name}",
        action=argparse.BooleanOptionalAction,
        default=default,
        help=helps.get(f.name),
      )
    else:
      kind = {"int": int, "float": float}.get(f.type, str)
      out.add_argument(
        f"--{f.name}", type=kind, default=default, help=helps.get(f.name)
      )
  return out


CONFIG_HELP = (
  "Named settings that give every other flag's default: '' (the study's own) "
  "or quick (tiny settings for a smoke run); flags given still win."
)


def parse(
  get_config: Callable[[str], Any],
  argv: list[str],
  description: str,
  exclude=(),
  prog: str | None = None,
) -> Any:
  """The config of the command line `argv`: `get_config(ARG)` of `--config
  ARG` (default ""), with the flags given in `argv` in place of its values.

  Every field but `exclude` is a flag (`parser`) whose default is the chosen
  config's value. An unknown ARG raises `get_config`'s ValueError, before any
  other flag is read.
  """
  first = argparse.ArgumentParser(add_help=False)
  first.add_argument("--config", default="")
  base = get_config(first.parse_known_args(argv)[0].config)
  out = parser(type(base), description, exclude, defaults=base)
  out.add_argument("--config", default="", help=CONFIG_HELP)
  if prog:
    out.prog = prog
  given = vars(out.parse_args(argv))
  del given["config"]
  return dataclasses.replace(base, **given)


def check_integers(cfg: Any, at_least: dict[str, int]) -> None:
  """Raises naming the flag unless each `cfg.<name>` is an int >= its bound."""
  for name, low in at_least.items():
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}.")


def check_rate(flag: str, value: Any) -> None:
  """Raises naming `--flag` unless `value` is a finite number > 0."""
  ok = isinstance(value, int | float) and not isinstance(value, bool)
  if not (ok and math.isfinite(value) and value > 0):
    raise ValueError(f"--{flag} must be finite and > 0, got {value}.")


def parse_budget(name: str, text: str) -> float:
  """The budget `text` of method `name@text`, a number in (0, 1]."""
  try:
    budget = float(text)
  except ValueError:
    raise ValueError(f"The budget of {name!r} is not a number.") from None
  if not 0.0 < budget <= 1.0:
    raise ValueError(f"The budget of {name!r} must be in (0, 1], got {budget}.")
  return budget


def check_batch(flag: str, batch: int, available: int, what: str) -> None:
  """Raises naming `--flag` when a batch of `batch` is more than the `available`
  examples of `what` (the training split it draws from)."""
  if batch > available:
    raise ValueError(
      f"--{flag} {batch} is larger than {what} ({available} examples); use at "
      f"most {available}."
    )


def activation_bytes(
  batch: int,
  tokens: int,
  width: int,
  hidden: int,
  layers: int,
  heads: int,
  outputs: int = 0,
  bytes_per: int = 4,
) -> int:
  """A low estimate of what a transformer's training step keeps for its backward.

  Per layer and token a pre-norm block keeps at least its input and normed
  input, q, k, v and the attention output (6 x `width`), the MLP's hidden
  activations before and after the nonlinearity (2 x `hidden`) and a row of
  attention weights per head (`heads` x `tokens`); the head keeps its
  `outputs` logits and their gradient. Real steps keep more (XLA's temporaries),
  so a step this estimate says does not fit surely does not.
  """
  per_token = layers * (6 * width + 2 * hidden + heads * tokens) + 2 * outputs
  return bytes_per * batch * tokens * per_token


def available_memory() -> tuple[int, str]:
  """Bytes the default JAX device can still hold, and what memory that is."""
  import jax

  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return int(free), f"{device.platform.upper()} memory"
  try:
    with open("/proc/meminfo") as f:
      info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024, "available host memory"
  except (OSError, KeyError, ValueError):
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages), "available host memory"


def check_memory(flag: str, value: int, need: int, what: str) -> None:
  """Raises naming `--flag` when `need` bytes (for `what`) exceed what the
  device can hold, before anything is allocated."""
  free, where = available_memory()
  if need > free:
    raise ValueError(
      f"--{flag} {value} needs at least {need / 2**30:.1f} GiB for {what}, more "
      f"than the {free / 2**30:.1f} GiB of {where}; lower --{flag} (or the "
      "model's size)."
    )
