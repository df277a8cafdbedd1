"""Pictures of error maps and multipliers (matplotlib, imported on first use).

Each function draws on `ax` (a new figure's axes when omitted) and returns the
axes, the way matplotlib's own helpers do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np


def _axes(ax):
  if ax is None:
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(7, 4))
  return ax


def error_map_heatmap(
  values: Any, steps: Sequence[int], names: Sequence[str], ax=None, normalize=True
):
  """Components (rows) by logged steps (columns), colour = error map value.

  Args:
    values: float array [steps, components], e.g. the EMA error map each step.
    steps: the step of each row of `values`.
    names: component names, one per column of `values`.
    ax: matplotlib axes to draw on.
    normalize: divide each step by its largest entry (what the multiplier
      sees), so the colour scale is [0, 1] throughout.
  """
  ax = _axes(ax)
  v = np.asarray(values, np.float64)
  if normalize:
    v = v / np.maximum(v.max(axis=1, keepdims=True), 1e-30)
  im = ax.imshow(v.T, aspect="auto", interpolation="nearest", cmap="viridis")
  ticks = np.linspace(0, len(steps) - 1, min(len(steps), 6)).astype(int)
  ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
  ax.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=6)
  ax.set_xlabel("step")
  ax.figure.colorbar(im, ax=ax, label="error / max" if normalize else "error")
  return ax


def alpha_distribution(alpha: Any, steps: Sequence[int], ax=None):
  """Quantiles of the multipliers across components, over steps."""
  ax = _axes(ax)
  a = np.asarray(alpha, np.float64)
  q = np.quantile(a, [0.0, 0.25, 0.5, 0.75, 1.0], axis=1)
  ax.fill_between(steps, q[0], q[4], alpha=0.2, label="min-max")
  ax.fill_between(steps, q[1], q[3], alpha=0.4, label="25-75%")
  ax.plot(steps, q[2], label="median")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("alpha")
  ax.legend(loc="lower left", fontsize=8)
  return ax


def head_grid(values: Any, names: Sequence[str], ax=None):
  """Per-head values as a layer-by-head grid.

  Names must end in `.../<block index>/.../head<h>` the way
  `ErrorTracker(select="heads")` names them (the first number in the path is
  the layer).
  """
  ax = _axes(ax)
  cells = {}
  for name, v in zip(names, np.asarray(values), strict=True):
    layer = re.search(r"(\d+)", name)
    head = re.search(r"head(\d+)$", name)
    if layer is None or head is None:
      raise ValueError(f"Cannot read a layer and head from component name {name!r}.")
    cells[int(layer.group(1)), int(head.group(1))] = v
  layers = 1 + max(k[0] for k in cells)
  heads = 1 + max(k[1] for k in cells)
  grid = np.full((layers, heads), np.nan)
  for (i, h), v in cells.items():
    grid[i, h] = v
  im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
  ax.set_xticks(range(heads))
  ax.set_yticks(range(layers))
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.figure.colorbar(im, ax=ax)
  return ax


def short_name(name: str) -> str:
  """A ViT component name without the vision_transformer boilerplate."""
  name = name.replace("Transformer/", "").replace("encoderblock_", "block")
  name = name.replace("MultiHeadDotProductAttention_1", "attn")
  return name.replace("MlpBlock_3", "mlp")
