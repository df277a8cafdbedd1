"""DESIGN.md's RGFT formulas and Adam written out in NumPy, step by step."""

import numpy as np


class ReferenceRGFT:
  """Adam -> decoupled weight decay -> RGFT multipliers -> learning rate.

  `head_of[path]` gives, per parameter path, either a component number, -1, or
  `(axis, [component per slice])` for a head-sliced leaf.
  """

  def __init__(self, params, head_of, n, b1=0.9, b2=0.999, eps=1e-8):
    self.params = {k: np.array(v, np.float64) for k, v in params.items()}
    self.head_of, self.n = head_of, n
    self.b1, self.b2, self.eps = b1, b2, eps
    self.mu = {k: np.zeros_like(v) for k, v in self.params.items()}
    self.nu = {k: np.zeros_like(v) for k, v in self.params.items()}
    self.ema = np.zeros(n)
    self.seen = np.zeros(n, bool)
    self.t = 0  # Updates applied so far.

  def alpha_of_leaf(self, path, alpha):
    owner = self.head_of[path]
    shape = self.params[path].shape
    if isinstance(owner, tuple):
      axis, comps = owner
      out = np.ones(shape)
      for h, c in enumerate(comps):
        sl = [slice(None)] * len(shape)
        sl[axis] = h
        out[tuple(sl)] = alpha[c]
      return out
    return np.full(shape, 1.0 if owner == -1 else alpha[owner])

  def multipliers(self, thresh, min_scale):
    alpha = np.ones(self.n)
    if self.seen.any():
      top = max(self.ema[i] for i in range(self.n) if self.seen[i])
      if top > 0:
        for i in range(self.n):
          if self.seen[i]:
            alpha[i] = min(1.0, max(min_scale, self.ema[i] / (thresh * top)))
    return alpha

  def step(self, grads, error_map, lr, beta, thresh, min_scale, wd=0.0, lagged=False):
    before = self.multipliers(thresh, min_scale)  # From the maps of earlier steps.
    for i in range(self.n):
      m = error_map[i]
      if not np.isfinite(m):
        continue
      self.ema[i] = beta * self.ema[i] + (1 - beta) * m if self.seen[i] else m
      self.seen[i] = True
    alpha = before if lagged else self.multipliers(thresh, min_scale)
    self.t += 1
    for k, g in grads.items():
      g = np.asarray(g, np.float64)
      self.mu[k] = self.b1 * self.mu[k] + (1 - self.b1) * g
      self.nu[k] = self.b2 * self.nu[k] + (1 - self.b2) * g * g
      mhat = self.mu[k] / (1 - self.b1**self.t)
      nhat = self.nu[k] / (1 - self.b2**self.t)
      u = mhat / (np.sqrt(nhat) + self.eps) + wd * self.params[k]
      self.params[k] = self.params[k] - lr * self.alpha_of_leaf(k, alpha) * u
    return alpha
