"""docs/theory.md's bounds, checked numerically on an L-smooth non-convex problem.

f(theta) = sum_i c_i log(1 + theta_i^2): f* = 0, and |f''| <= 2 c_i, so f is
L-smooth with L = 2 max c_i. Gradient descent runs through the real
`scale_by_residual_error` with error maps that have nothing to do with the
problem (the theorems hold for any multipliers in [min_scale, 1]).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rgft_jax

D, N_COMP, EPS = 12, 4, 0.1
C = jnp.linspace(0.5, 2.0, D)
L = 2 * float(C.max())


def f(theta):
  return jnp.sum(C * jnp.log1p(theta**2))


def _setup(lagged):
  params = {f"c{i}": jnp.zeros(D // N_COMP) for i in range(N_COMP)}
  comps = rgft_jax.Components.from_regex(params, [(r"(c\d)", r"\1")])
  tx = optax.chain(
    rgft_jax.scale_by_residual_error(comps, thresh=0.5, min_scale=EPS, lagged=lagged),
    optax.scale(-1.0 / L),
  )
  return comps, tx


def _split(theta):
  return {f"c{i}": theta[i * 3 : i * 3 + 3] for i in range(N_COMP)}


def _join(tree):
  return jnp.concatenate([tree[f"c{i}"] for i in range(N_COMP)])


def test_theorem_1_deterministic_descent_and_stationarity():
  comps, tx = _setup(lagged=False)
  rng = np.random.default_rng(0)
  theta = jnp.asarray(3.0 * rng.normal(size=D), jnp.float32)
  state = tx.init(_split(theta))
  eta, steps = 1.0 / L, 200
  f0 = float(f(theta))
  sq_norms = []
  for _ in range(steps):
    g = jax.grad(f)(theta)
    sq = float(g @ g)
    sq_norms.append(sq)
    error_map = {
      n: float(v)
      for n, v in zip(comps.names, rng.exponential(size=N_COMP), strict=True)
    }
    updates, state = tx.update(_split(g), state, error_map=error_map)
    new = theta + _join(updates)
    # The proof's per-step inequality, which any multipliers in [EPS, 1] obey.
    assert float(f(new)) <= float(f(theta)) - eta * EPS / 2 * sq + 1e-5
    assert float(optax.tree.get(state, "alpha").min()) >= np.float32(EPS)
    theta = new
  assert min(sq_norms) <= 2 * f0 / (eta * EPS * steps)


def test_theorem_2_stochastic_bound_with_lagged_multipliers():
  comps, tx = _setup(lagged=True)
  eta, steps, runs, sigma = 1.0 / L, 100, 64, 1.0
  theta0 = jnp.asarray(3.0 * np.random.default_rng(1).normal(size=D), jnp.float32)

  def run(key):
    def body(carry, k):
      theta, state = carry
      g_true = jax.grad(f)(theta)
      noise = sigma / np.sqrt(D) * jax.random.normal(k, (D,))
      g = g_true + noise
      # The error map may depend on this batch: with lagged=True the
      # multipliers used now come from earlier maps only.
      error_map = {
        n: jnp.linalg.norm(v)
        for n, v in zip(comps.names, _split(g).values(), strict=True)
      }
      updates, state = tx.update(_split(g), state, error_map=error_map)
      return (theta + _join(updates), state), g_true @ g_true

    _, sq = jax.lax.scan(
      body, (theta0, tx.init(_split(theta0))), jax.random.split(key, steps)
    )
    return jnp.mean(sq)

  mean_sq = float(
    jnp.mean(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), runs)))
  )
  bound = 2 * float(f(theta0)) / (eta * EPS * steps) + L * eta * sigma**2 / EPS
  assert mean_sq <= bound
