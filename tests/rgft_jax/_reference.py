"""DESIGN.md's RGFT formulas and Adam written out in NumPy, step by step."""

import numpy as np

F32_TINY = float(np.finfo(np.float32).tiny)
F32_MAX = float(np.finfo(np.float32).max)


def admit(values, ema, seen, ratio):
  """The documented rule for the numbers entering the EMA, in float64.

  Returns (values to fold in, or None where ignored; nonfinite, negative,
  clipped flags; the bounds). Non-finite: ignored. Negative: 0. Larger than
  `ratio` times max(largest EMA seen, largest other entry of this map): that
  bound, unless the bound's base is below float32's smallest normal number.
  """
  m = np.asarray(values, np.float64)
  n = len(m)
  nonfinite = ~np.isfinite(m)
  negative = ~nonfinite & (m < 0)
  v = np.where(nonfinite, 0.0, np.clip(m, 0.0, F32_MAX))
  ema_top = max([ema[i] for i in range(n) if seen[i]], default=0.0)
  out, clipped, bounds = [], np.zeros(n, bool), np.full(n, np.inf)
  for i in range(n):
    base = max([ema_top] + [v[j] for j in range(n) if j != i])
    bounds[i] = ratio * base if base >= F32_TINY else np.inf
    clipped[i] = not nonfinite[i] and v[i] > bounds[i]
    out.append(None if nonfinite[i] else min(v[i], bounds[i]))
  return out, nonfinite, negative, clipped, bounds


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
    self.counts = {k: np.zeros(n, int) for k in ("nonfinite", "negative", "clipped")}
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

  def step(
    self,
    grads,
    error_map,
    lr,
    beta,
    thresh,
    min_scale,
    wd=0.0,
    lagged=False,
    outlier_ratio=10.0,
  ):
    before = self.multipliers(thresh, min_scale)  # From the maps of earlier steps.
    values, *flags, _ = admit(error_map, self.ema, self.seen, outlier_ratio)
    for key, flag in zip(("nonfinite", "negative", "clipped"), flags, strict=True):
      self.counts[key] += flag
    for i, m in enumerate(values):
      if m is None:
        continue
      ema = beta * self.ema[i] + (1 - beta) * m if self.seen[i] else m
      self.ema[i] = min(ema, F32_MAX)
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
