"""A mixed grouping: every attention head its own component, other branches whole.

`ErrorTracker` taps either whole residual branches or attention heads. The mix
runs both: a branch that owns some head's parameters (an attention branch) is
replaced by its heads, every other branch (the MLPs) stays one component. Its
error map takes two measured passes (heads, then the other branches), so a
step costs more than soft RGFT's; the gradients are the branch pass's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import rgft_jax
from experiments.trees import flat
from experiments.trees import unflat


class MixedTracker:
  """Heads for attention, whole branches for the rest (`ErrorTracker`'s interface).

  Components are named as the trackers name them, in the branches' order,
  an attention branch's heads in its place. Parameters of an attention
  branch that no head owns (its pre-norm, the output bias) are in no
  component, as with `select="heads"`.
  """

  def __init__(self, model, method: str = "norm_product"):
    self.heads = rgft_jax.ErrorTracker(model, select="heads", method=method)
    self.branches = rgft_jax.ErrorTracker(model, select="branches", method=method)
    self.names: tuple[str, ...] | None = None
    self._whole: tuple[str, ...] = ()  # Branches kept whole.

  def components(self, params: Any, *inputs: Any) -> rgft_jax.Components:
    heads = self.heads.components(params, *inputs)
    branches = self.branches.components(params, *inputs)
    head_owns = heads.owned_paths()
    by_heads = {p for paths in head_owns.values() for p in paths}
    names, head_at, branch_at, whole = [], {}, {}, []
    for b, paths in branches.owned_paths().items():
      if by_heads & set(paths):  # An attention branch: its heads instead.
        for h in heads.names:
          if h not in head_at and set(head_owns[h]) <= set(paths):
            head_at[h] = len(names)
            names.append(h)
      else:
        branch_at[b] = len(names)
        names.append(b)
        whole.append(b)
    for h in heads.names:  # Heads outside every branch, if any.
      if h not in head_at:
        head_at[h] = len(names)
        names.append(h)
    to_head = np.array([head_at[h] for h in heads.names] + [-1], np.int32)
    to_branch = np.array([branch_at.get(b, -1) for b in branches.names] + [-1])
    h_index, b_index = flat(heads.index), flat(branches.index)
    index = {
      p: np.where(
        (h := to_head[np.asarray(h_index[p])]) >= 0,
        h,
        to_branch[np.asarray(b_index[p])].astype(np.int32),
      ).astype(np.int32)
      for p in flat(params)
    }
    self.names, self._whole = tuple(names), tuple(whole)
    return rgft_jax.Components(self.names, unflat(index))

  def value_and_grad(self, loss_fn, has_aux: bool = False):
    """`(out, grads, error_map)` of `loss_fn(params, *args)`, as `ErrorTracker`'s."""
    if self.names is None:
      raise ValueError("Call components(params, example) before value_and_grad.")

    def wrapped(params, *args):
      out, grads, whole = self.branches.value_and_grad(
        loss_fn, has_aux=has_aux, measure=self._whole
      )(params, *args)
      _, _, heads = self.heads.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)
      error_map = {n: heads[n] if n in heads else whole[n] for n in self.names}
      return out, grads, error_map

    return wrapped
