"""Command lines from config dataclasses: one flag per field, its comment as help."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import math
import textwrap
import tokenize
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


def parser(cls: type, description: str, exclude=()) -> argparse.ArgumentParser:
  """`--<field>` for every field of `cls` but `exclude`, defaults and help from it."""
  out = argparse.ArgumentParser(description=description)
  helps = field_help(cls)
  for f in dataclasses.fields(cls):
    if f.name in exclude:
      continue
    if f.type == "bool":
      out.add_argument(
        f"--{f.name}",
        action=argparse.BooleanOptionalAction,
        default=f.default,
        help=helps.get(f.name),
      )
    else:
      kind = {"int": int, "float": float}.get(f.type, str)
      out.add_argument(
        f"--{f.name}", type=kind, default=f.default, help=helps.get(f.name)
      )
  return out


def parse(cls: type, argv: list[str], description: str, exclude=()) -> Any:
  """An instance of `cls` from the command line `argv`."""
  return cls(**vars(parser(cls, description, exclude).parse_args(argv)))


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
