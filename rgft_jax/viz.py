"""Pictures of error maps and multipliers (matplotlib, imported on first use).

Each function draws on `ax` (a new figure's axes when omitted) and returns the
axes, the way matplotlib's own helpers do.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np


def _axes(ax):
  if ax is None:
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(7, 4))
  return ax


def error_map_heatmap(
  values: Any,
  steps: Sequence[int],
  names: Sequence[str],
  ax=None,
  normalize=True,
  label: Callable[[str], str] | None = None,
):
  """Components (rows) by logged steps (columns), colour = error map value.

  Args:
    values: float array [steps, components], e.g. the EMA error map each step.
    steps: the step of each row of `values`.
    names: component names, one per column of `values`.
    ax: matplotlib axes to draw on.
    normalize: divide each step by its largest entry (what the multiplier
      sees), so the colour scale is [0, 1] throughout.
    label: the row label of a component name (default: the name itself).
  """
  v = np.asarray(values, np.float64)
  if v.shape != (len(steps), len(names)):
    raise ValueError(
      f"error_map_heatmap needs values of shape [steps, components] = "
      f"({len(steps)}, {len(names)}) for {len(steps)} steps and {len(names)} "
      f"names, got {v.shape}."
    )
  ax = _axes(ax)
  if normalize:
    v = v / np.maximum(v.max(axis=1, keepdims=True), 1e-30)
  im = ax.imshow(v.T, aspect="auto", interpolation="nearest", cmap="viridis")
  ticks = np.linspace(0, len(steps) - 1, min(len(steps), 6)).astype(int)
  ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
  label = label or _as_given
  ax.set_yticks(range(len(names)), [label(n) for n in names], fontsize=6)
  ax.set_xlabel("step")
  ax.figure.colorbar(im, ax=ax, label="error / max" if normalize else "error")
  return ax


def alpha_distribution(alpha: Any, steps: Sequence[int], ax=None):
  """Quantiles of the multipliers across components, over steps."""
  a = np.asarray(alpha, np.float64)
  if a.ndim != 2 or a.shape[0] != len(steps):
    raise ValueError(
      f"alpha_distribution needs alpha of shape [steps, components] with "
      f"{len(steps)} steps, got {a.shape}."
    )
  ax = _axes(ax)
  q = np.quantile(a, [0.0, 0.25, 0.5, 0.75, 1.0], axis=1)
  ax.fill_between(steps, q[0], q[4], alpha=0.2, label="min-max")
  ax.fill_between(steps, q[1], q[3], alpha=0.4, label="25-75%")
  ax.plot(steps, q[2], label="median")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("alpha")
  ax.legend(loc="lower left", fontsize=8)
  return ax


def head_grid(
  values: Any,
  names: Sequence[str],
  ax=None,
  label: Callable[[str], str] | None = None,
):
  """Per-head values as a grid: one row per attention module, one column per head.

  Names must end in `.../head<k>`, the way `ErrorTracker(select="heads")`
  names them (`Transformer/encoderblock_3/MultiHeadDotProductAttention_1/head5`).
  The head is the number `k` of that last segment; the row is the rest of the
  name (the attention module), so no number elsewhere in the path is taken for
  a layer. Rows come in natural order (`block10` after `block9`) and are
  labelled with the module path as given, or with `label(module path)`.

  The grid has one row per distinct module, so at most `len(names)` rows, and
  `1 + max(k)` columns; `k` must be below 1024 (more heads than any attention
  layer has), which bounds the grid by `len(names) * 1024` cells.

  Args:
    values: one number per name.
    names: component names ending in `/head<k>`.
    ax: matplotlib axes to draw on.
    label: the row label of a module path (default: the path itself).

  Raises:
    ValueError: if a name does not end in `/head<k>` (or is not `head<k>`),
      `k` is 1024 or more, two names give the same cell, or `values` does not
      hold one number per name.

  Examples:
    >>> from matplotlib.figure import Figure
    >>> names = ["enc/block10/attn/head0", "enc/block9/attn/head1"]
    >>> ax = head_grid([1.0, 2.0], names, ax=Figure().subplots())
    >>> [t.get_text() for t in ax.get_yticklabels()]
    ['enc/block9/attn', 'enc/block10/attn']
    >>> print(ax.images[0].get_array().filled(-1))
    [[-1.  2.]
     [ 1. -1.]]
    >>> ax = head_grid([1.0, 2.0], names, Figure().subplots(), label=str.upper)
    >>> [t.get_text() for t in ax.get_yticklabels()]
    ['ENC/BLOCK9/ATTN', 'ENC/BLOCK10/ATTN']
  """
  v = np.asarray(values, np.float64)
  if v.shape != (len(names),):
    raise ValueError(
      f"head_grid needs one value per name: values has shape {v.shape}, "
      f"there are {len(names)} names."
    )
  if not names:
    raise ValueError("head_grid needs at least one component name.")
  cells = {}
  for name, x in zip(names, v, strict=True):
    module, _, last = name.rpartition("/")
    head = re.fullmatch(r"head(\d+)", last)
    if head is None:
      raise ValueError(
        f"Cannot read a head from component name {name!r}: it must end in "
        "'/head<k>' as ErrorTracker(select='heads') names heads."
      )
    digits = head.group(1).lstrip("0") or "0"
    if len(digits) > 4 or int(digits) >= _MAX_HEADS:
      raise ValueError(
        f"Component name {name!r} has head {head.group(1)}; head_grid draws "
        f"heads 0 to {_MAX_HEADS - 1} only."
      )
    key = (module, int(digits))
    if key in cells:
      raise ValueError(f"Two component names give the same cell: {name!r}.")
    cells[key] = x
  modules = sorted({m for m, _ in cells}, key=_natural_key)
  row = {m: i for i, m in enumerate(modules)}
  heads = 1 + max(h for _, h in cells)
  grid = np.full((len(modules), heads), np.nan)
  for (m, h), x in cells.items():
    grid[row[m], h] = x
  ax = _axes(ax)
  im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
  ax.set_xticks(range(heads))
  label = label or _as_given
  ax.set_yticks(range(len(modules)), [label(m) for m in modules])
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.figure.colorbar(im, ax=ax)
  return ax


# Heads per attention layer that head_grid draws; more is a misread name.
_MAX_HEADS = 1024


def _natural_key(name: str) -> tuple:
  """Sort key comparing digit runs as numbers (without int(), any length)."""
  parts = re.split(r"(\d+)", name)  # Text at even indices, digits at odd ones.
  return tuple(
    (len(p.lstrip("0")), p.lstrip("0")) if i % 2 else p for i, p in enumerate(parts)
  )


def _as_given(name: str) -> str:
  return name


def short_name(name: str) -> str:
  """Deprecated: `experiments.vit.short_name` (kept for one release).

  A ViT component name without the vision_transformer boilerplate; specific
  to the studies' ViT, so it left the library. Warns, then renames as before.

  Examples:
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...   warnings.simplefilter("ignore", DeprecationWarning)
    ...   short_name("Transformer/encoderblock_3/MultiHeadDotProductAttention_1/head0")
    'block3/attn/head0'
  """
  warnings.warn(
    "rgft_jax.viz.short_name is deprecated (it is specific to the studies' "
    "ViT): use experiments.vit.short_name, or pass your own label= to "
    "head_grid and error_map_heatmap.",
    DeprecationWarning,
    stacklevel=2,
  )
  renamed = {"MultiHeadDotProductAttention_1": "attn", "MlpBlock_3": "mlp"}
  out = []
  for segment in name.split("/"):
    if segment == "Transformer":
      continue
    block = re.fullmatch(r"encoderblock_(\d+)", segment)
    out.append(f"block{block.group(1)}" if block else renamed.get(segment, segment))
  return "/".join(out)
