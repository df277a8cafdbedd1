"""Adam with a step count per parameter entry, for parameters that are held."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rgft_jax import _validation


class ScaleByAdamPerEntryState(NamedTuple):
  count: Any  # int32 tree like the params: updates each entry has taken.
  mu: Any
  nu: Any


def scale_by_adam_per_entry(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  mu_dtype: Any | None = None,
) -> optax.GradientTransformation:
  """`optax.scale_by_adam` whose bias correction counts each entry's own steps.

  `optax.scale_by_adam` keeps one step count for the whole tree. Where a
  parameter is held for a while (`detachable_step`, `hold_masked`: its value
  and its moments kept), that count runs on without it, so when it trains
  again its moments are divided by a bias correction for steps it never
  took. A parameter held for its first `t` steps, then trained with a
  steady gradient, gets in its `k`-th trained step an update of
  `(1 - b1**k) / (1 - b1**n) / sqrt((1 - b2**k) / (1 - b2**n))` times Adam's
  own, `n = t + k` (about 2.3 for t = 125, k = 10 and the default decays),
  instead of 1.

  Here the count is a tree like the parameters (int32, one entry per
  parameter entry), so holding an entry's optimizer state holds its count
  too: a held parameter resumes Adam where it left off, and one first trained
  late starts it as Adam starts. Where every entry trains at every step it
  equals `optax.scale_by_adam`. It costs one int32 per parameter entry.

  Args:
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to the root of the second moment, finite and >= 0.
    mu_dtype: dtype of the first moment (default: that of the parameters).

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import rgft_jax
    >>> tx = rgft_jax.scale_by_adam_per_entry()
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> updates, new = tx.update({"w": jnp.array([0.5, -2.0])}, state)
    >>> held = {"w": jnp.array([False, True])}  # Hold the second entry.
    >>> updates, state = rgft_jax.hold_masked(tx, held, updates, new, state)
    >>> print(updates["w"].round(3), state.count["w"])
    [1. 0.] [1 0]
  """
  _validation.in_range("b1", b1, 0.0, 1.0, high_open=True)
  _validation.in_range("b2", b2, 0.0, 1.0, high_open=True)
  _validation.in_range("eps", eps, 0.0, None, finite=True)

  def init_fn(params):
    return ScaleByAdamPerEntryState(
      count=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.int32), params),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = jax.tree.map(optax.safe_increment, state.count)

    def step(m, v, k):
      # As `optax.tree.bias_correction`, with this entry's count.
      m_hat = m / (1 - b1**k).astype(m.dtype)
      v_hat = v / (1 - b2**k).astype(v.dtype)
      return m_hat / (jnp.sqrt(v_hat) + eps)

    out = jax.tree.map(step, mu, nu, count)
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    return out, ScaleByAdamPerEntryState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
