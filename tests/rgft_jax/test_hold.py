"""`hold_skipped`: the optimizer's work for held leaves skipped at run time.

Checked against a hand-held reference: optax's own update of the whole tree,
then, by hand in NumPy, every held entry's parameter and optimizer state put
back to its old value. Leaves owned by one component (a traced scalar flag,
the `lax.cond` path), leaves split between components (a flag per entry, as for a leaf stacked
over a scan's layers; these are selected, not skipped),
leaves in no component, and an optimizer whose leaves read each other
(global-norm clipping) are all covered.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgft_jax
from rgft_jax._sparse import flag_masks
from rgft_jax._sparse import reads_other_leaves


def _tree():
  rng = np.random.default_rng(0)
  params = {
    "a": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
    "b": {"kernel": rng.normal(size=(4, 2))},
    "split": rng.normal(size=(2, 5)),  # Row 0 is component a's, row 1 b's.
    "stack": rng.normal(size=(3, 2, 2)),  # Layers a, b, a (as a scan stacks).
    "cols": rng.normal(size=(3, 2)),  # Column 0 is a's, column 1 b's.
    "head": rng.normal(size=(2,)),  # In no component.
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
  index = {
    "a": {"kernel": np.int32(0), "bias": np.int32(0)},
    "b": {"kernel": np.int32(1)},
    "split": np.array([[0], [1]], np.int32),
    "stack": np.array([[[0]], [[1]], [[0]]], np.int32),
    "cols": np.array([[0, 1]], np.int32),
    "head": np.int32(-1),
  }
  return params, grads, rgft_jax.Components(("a", "b"), index)


def _held_by_hand(params, old_state, new_params, new_state, held):
  """`new_*` with every entry of a held component put back to its old value."""
  rows = {
    "a/kernel": held[0],
    "a/bias": held[0],
    "b/kernel": held[1],
    "split": np.array([[held[0]], [held[1]]]),
    "stack": np.array([[[held[0]]], [[held[1]]], [[held[0]]]]),
    "cols": np.array([[held[0], held[1]]]),
    "head": False,
  }

  def put_back(path, new, old):
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    hit = [m for name, m in rows.items() if key.endswith(name) and np.ndim(old) > 0]
    if not hit:
      return np.asarray(new)
    return np.where(np.broadcast_to(hit[0], np.shape(old)), old, new)

  p = jax.tree_util.tree_map_with_path(put_back, new_params, params)
  s = jax.tree_util.tree_map_with_path(put_back, new_state, old_state)
  return p, s


TXS = {
  "adam": lambda comps: optax.adam(0.1),
  "rgft": lambda comps: rgft_jax.rgft(0.1, comps, warmup_steps=2),
  "clipped": lambda comps: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(0.1)),
}


@pytest.mark.parametrize("name", list(TXS))
def test_skipped_equals_the_full_update_with_held_entries_put_back(name):
  params, grads, comps = _tree()
  tx = optax.with_extra_args_support(TXS[name](comps))
  extra = {"error_map": {"a": 2.0, "b": 1.0}} if name == "rgft" else {}
  state = tx.init(params)
  _, state = tx.update(grads, state, params, **extra)  # Moments that are not 0.

  @jax.jit
  def skipped(flags, state):
    masks = flag_masks(comps, params, flags)
    return rgft_jax.hold_skipped(tx, masks, grads, state, params, **extra)

  for held in ([False, False], [True, False], [False, True], [True, True]):
    got_p, got_s = skipped(jnp.asarray(held), state)
    updates, new_state = tx.update(grads, state, params, **extra)
    want_p, want_s = _held_by_hand(
      params, state, optax.apply_updates(params, updates), new_state, held
    )
    for got, want in ((got_p, want_p), (got_s, want_s)):
      jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want
      )
  assert skipped._cache_size() == 1  # One program for every held set.


def test_a_leaf_owned_by_one_component_gets_a_scalar_flag():
  params, _, comps = _tree()
  masks = flag_masks(comps, params, jnp.array([True, False]))
  assert jnp.ndim(masks["a"]["kernel"]) == 0 and bool(masks["a"]["kernel"])
  assert jnp.ndim(masks["b"]["kernel"]) == 0 and not bool(masks["b"]["kernel"])
  np.testing.assert_array_equal(masks["split"], [[True], [False]])
  np.testing.assert_array_equal(masks["stack"], [[[True]], [[False]], [[True]]])
  np.testing.assert_array_equal(masks["cols"], [[True, False]])
  assert masks["head"] is False


def test_held_buffers_stay_in_place():
  """With donated parameters and state, no parameter-sized buffer is copied:
  a held leaf costs no work (the cond's other way round copied them all)."""
  params = {
    "a": {"kernel": jnp.ones((256, 256))},
    "b": {"kernel": jnp.ones((256, 256))},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  comps = rgft_jax.Components(("a", "b"), {"a": {"kernel": 0}, "b": {"kernel": 1}})
  tx = optax.adam(0.1)
  state = tx.init(params)

  def skipped(flags, params, state, grads):
    masks = flag_masks(comps, params, flags)
    return rgft_jax.hold_skipped(tx, masks, grads, state, params)

  text = (
    jax.jit(skipped, donate_argnums=(1, 2))
    .lower(jnp.ones(2, bool), params, state, grads)
    .compile()
    .as_text()
  )
  copies = [line for line in text.splitlines() if " copy(" in line and "256" in line]
  assert not copies, copies[:3]


def test_an_unknown_hold_mode_is_refused_naming_it():
  comps = _tree()[2]
  with pytest.raises(ValueError, match=r'hold must be "skip" or "mask", got .keep.'):
    rgft_jax.detachable_step(None, optax.adam(0.1), lambda p: 0.0, comps, hold="keep")


@pytest.mark.parametrize("name", list(TXS))
def test_leaves_that_read_each_other_are_held_by_select(name):
  """Global-norm clipping makes every update read every gradient: skipping
  would recompute the whole update in each leaf's cond (its compilation grows
  with the square of the leaves), so no cond is made; Adam and RGFT read
  their own leaf only (and the shared step count and error map)."""
  params, grads, comps = _tree()
  tx = optax.with_extra_args_support(TXS[name](comps))
  extra = {"error_map": {"a": 2.0, "b": 1.0}} if name == "rgft" else {}
  state = tx.init(params)
  index = jax.tree.unflatten(
    jax.tree.structure(params), list(range(len(jax.tree.leaves(params))))
  )
  owners = jax.tree.leaves(
    optax.tree_utils.tree_map_params(
      tx, lambda _, i: i, state, index, transform_non_params=lambda _: -1
    )
  )
  reads = reads_other_leaves(tx, owners, grads, state, params, **extra)
  assert reads == (name == "clipped")

  def skipped(flags):
    masks = flag_masks(comps, params, flags)
    return rgft_jax.hold_skipped(tx, masks, grads, state, params, **extra)

  text = jax.jit(skipped).lower(jnp.zeros(2, bool)).as_text()
  assert ("stablehlo.case" in text or "stablehlo.if" in text) == (name != "clipped")
