"""Heads by dataflow (`select="heads"`) on hand-written attentions.

The owner of each entry is written out from the layout; a head-dim-major
merge (which cannot be cut into heads by a reshape) must not be taken for
heads. Third-party models are in tests/rgft_jax/compat/test_compat_heads.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgft_jax
from rgft_jax._components import leaves_by_path

D, H, DH, L = 12, 3, 4, 5


class Fused(nn.Module):
  """One q/k/v kernel (D, 3*H*DH), heads merged before the output Dense."""

  head_dim_major: bool = False

  @nn.compact
  def __call__(self, x):
    qkv = nn.Dense(3 * H * DH, name="qkv")(x)
    q, k, v = (t.reshape(*x.shape[:2], H, DH) for t in jnp.split(qkv, 3, axis=-1))
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DH), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    if self.head_dim_major:
      o = jnp.swapaxes(o, -1, -2)  # (B, L, DH, H): merged, a head is not a block.
    o = o.reshape(*x.shape[:2], H * DH)
    return nn.Dense(D, name="proj")(o)


class Model(nn.Module):
  head_dim_major: bool = False

  @nn.compact
  def __call__(self, x):
    x = x + Fused(self.head_dim_major, name="attn")(nn.LayerNorm(name="norm")(x))
    return nn.Dense(2, name="head")(x.mean(1))


def _setup(head_dim_major=False):
  model = Model(head_dim_major)
  x = jax.random.normal(jax.random.key(0), (2, L, D))
  return model, model.init(jax.random.key(1), x)["params"], x


@pytest.mark.slow
def test_fused_qkv_heads_own_their_columns_and_rows():
  model, params, x = _setup()
  comps = rgft_jax.ErrorTracker(model, select="heads").components(params, x)
  assert comps.names == tuple(f"attn/head{h}" for h in range(H))
  names = np.array([*comps.names, None], object)
  index = leaves_by_path(comps.index)
  feature_head = np.tile(np.repeat(np.arange(H), DH), 3)  # q, k, v blocks.
  want = {
    "attn/qkv/kernel": np.broadcast_to(feature_head, (D, 3 * H * DH)),
    "attn/qkv/bias": feature_head,
    "attn/proj/kernel": np.broadcast_to(
      np.repeat(np.arange(H), DH)[:, None], (H * DH, D)
    ),
  }
  for path, leaf in leaves_by_path(params).items():
    got = names[np.broadcast_to(np.asarray(index[path]), np.shape(leaf))]
    if path in want:
      expected = np.array([f"attn/head{h}" for h in range(H)], object)[want[path]]
    else:  # The pre-norm, the output bias and the classifier: no head.
      expected = np.full(np.shape(leaf), None, object)
    assert (got == expected).all(), path


def test_head_dim_major_merge_is_not_taken_for_heads():
  model, params, x = _setup(head_dim_major=True)
  with pytest.raises(ValueError, match="looks for attention output projections"):
    rgft_jax.ErrorTracker(model, select="heads").components(params, x)


@pytest.mark.slow
def test_heads_attribution_is_per_head_slice_of_projection_input():
  """norm_product of head h: the batch mean of ||dL/do_h|| ||o_h||, o the proj input."""
  model, params, x = _setup()
  y = jnp.array([0, 1])

  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

  tracker = rgft_jax.ErrorTracker(model, select="heads")
  tracker.components(params, x)
  _, _, error_map = jax.jit(tracker.value_and_grad(loss))(params, x, y)

  def one(delta, i):  # Example i's loss with `delta` added to proj's input.
    def add(next_fun, args, kwargs, context):
      if context.module.name == "proj" and context.method_name == "__call__":
        return next_fun(args[0] + delta, *args[1:], **kwargs)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(add):
      return loss(params, x[i : i + 1], y[i : i + 1])

  seen = []
  want = np.zeros(H)
  for i in range(2):

    def record(next_fun, args, kwargs, context):
      if context.module.name == "proj" and context.method_name == "__call__":
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply({"params": params}, x[i : i + 1])
    o = np.asarray(seen[-1]).reshape(L, H, DH)
    g = np.asarray(jax.grad(one)(jnp.zeros((1, L, H * DH)), i)).reshape(L, H, DH)
    want += np.linalg.norm(g, axis=(0, 2)) * np.linalg.norm(o, axis=(0, 2)) / 2
  got = np.array([float(error_map[f"attn/head{h}"]) for h in range(H)])
  np.testing.assert_allclose(got, want, rtol=1e-4)
