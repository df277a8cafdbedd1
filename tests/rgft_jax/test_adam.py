"""`scale_by_adam_per_entry`: Adam whose held entries keep their own count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgft_jax

SHAPES = {"a": (4,), "b": (3, 2)}


def _params():
  return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}


def _grads(steps, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
    for _ in range(steps)
  ]


@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16])
def test_equals_optax_adam_when_every_entry_trains(mu_dtype):
  ours = rgft_jax.scale_by_adam_per_entry(b1=0.8, b2=0.99, eps=1e-6, mu_dtype=mu_dtype)
  adam = optax.scale_by_adam(b1=0.8, b2=0.99, eps=1e-6, mu_dtype=mu_dtype)
  s_ours, s_adam = ours.init(_params()), adam.init(_params())
  for g in _grads(6):
    u_ours, s_ours = ours.update(g, s_ours)
    u_adam, s_adam = adam.update(g, s_adam)
    for x, y in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_adam), strict=True):
      np.testing.assert_array_equal(x, y)
  assert all(
    (c == 6).all() and c.dtype == jnp.int32 for c in jax.tree.leaves(s_ours.count)
  )


def _reference(grads, trained):
  """Per entry of every leaf: `optax.scale_by_adam` run on that entry alone,
  over the steps where it trains; 0 where it is held."""
  out = []
  for k, shape in SHAPES.items():
    leaf = np.zeros((len(grads), *shape), np.float32)
    for idx in np.ndindex(*shape):
      adam = optax.scale_by_adam()
      state = adam.init(jnp.zeros(()))
      for t, g in enumerate(grads):
        if trained[t][k][idx]:
          u, state = adam.update(g[k][idx], state)
          leaf[(t, *idx)] = u
    out.append((k, leaf))
  return dict(out)


def _schedule(steps):
  """Which entries train at each step: `a` trains, pauses, trains again; row 0
  of `b` first trains late, its other rows train every other step."""
  trained = []
  for t in range(steps):
    b = np.zeros(SHAPES["b"], bool)
    b[0] = t >= 5
    b[1:] = t % 2 == 0
    trained.append({"a": np.full(SHAPES["a"], t < 3 or t >= 7), "b": b})
  return trained


def _masks(trained, how):
  """Held entries (`hold_masked`/`hold_skipped` masks): a whole leaf as one
  flag where it can be, else an array."""
  masks = {}
  for k, m in trained.items():
    held = ~m
    if how == "scalar" and (held == held.flat[0]).all():
      masks[k] = jnp.asarray(held.flat[0])  # A traced flag under jit.
    elif held.all() or not held.any():
      masks[k] = bool(held.all())
    else:
      masks[k] = jnp.asarray(held)
  return masks


@pytest.mark.parametrize("hold", ["masked", "skipped"])
def test_held_entries_resume_as_adam_over_their_own_steps(hold):
  steps = 10
  grads, trained = _grads(steps, seed=1), _schedule(steps)
  tx = rgft_jax.scale_by_adam_per_entry()
  params = _params()
  state = tx.init(params)

  def step(params, state, g, masks):
    if hold == "skipped":
      return rgft_jax.hold_skipped(tx, masks, g, state, params)
    updates, new = tx.update(g, state, params)
    updates, new = rgft_jax.hold_masked(tx, masks, updates, new, state)
    return optax.apply_updates(params, updates), new

  ref = _reference(grads, trained)
  for t, g in enumerate(grads):
    masks = _masks(trained[t], "scalar" if hold == "skipped" else "static")
    new, state = jax.jit(step)(params, state, g, masks)
    for k in SHAPES:
      np.testing.assert_allclose(new[k] - params[k], ref[k][t], rtol=2e-5, atol=1e-7)
    params = new
  np.testing.assert_array_equal(state.count["a"], np.full(SHAPES["a"], 6))
  np.testing.assert_array_equal(state.count["b"][0], [5, 5])


def test_optax_count_oversizes_a_late_starter_as_the_docstring_says():
  """A leaf held for `t` steps, then trained with a constant gradient: with
  the run's count its k-th update is the docstring's factor; with its own, 1."""
  held_steps, k, b1, b2 = 125, 10, 0.9, 0.999
  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.array([0.5, -2.0, 3.0])}
  got = {}
  for name, tx in (
    ("global", optax.scale_by_adam(b1=b1, b2=b2, eps=0.0)),
    ("per_entry", rgft_jax.scale_by_adam_per_entry(b1=b1, b2=b2, eps=0.0)),
  ):
    state = tx.init(params)
    for t in range(held_steps + k):
      updates, new = tx.update(g, state, params)
      masks = {"w": t < held_steps}
      updates, state = rgft_jax.hold_masked(tx, masks, updates, new, state)
    got[name] = np.asarray(updates["w"] / jnp.sign(g["w"]))
  n = held_steps + k
  factor = (1 - b1**k) / (1 - b1**n) / np.sqrt((1 - b2**k) / (1 - b2**n))
  np.testing.assert_allclose(got["global"], factor, rtol=1e-4)
  assert 2.2 < factor < 2.4  # The docstring's "about 2.3".
  np.testing.assert_allclose(got["per_entry"], 1.0, rtol=1e-5)


def test_rgft_takes_the_count_and_checks_it():
  params = _params()
  comps = rgft_jax.Components.from_regex(params, [(r"(\w)", r"\1")])
  error_map = {"a": 1.0, "b": 0.5}
  outs = []
  for count in ("global", "per_entry"):
    tx = rgft_jax.rgft(0.1, comps, warmup_steps=4, adam_count=count)
    state = tx.init(params)
    for g in _grads(4, seed=2):
      updates, state = tx.update(g, state, params, error_map=error_map)
    outs.append(updates)
  for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match=r'adam_count must be "global" or "per_entry"'):
    rgft_jax.rgft(0.1, comps, adam_count="leaf")
