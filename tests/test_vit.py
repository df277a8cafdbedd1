import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgft_jax
from experiments.vit import SIZES
from experiments.vit import VisionTransformer
from experiments.vit import load_npz


def test_parameter_layout_matches_vision_transformer_checkpoints():
  model = VisionTransformer(num_classes=5, patch=4, size="mu")
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))[
    "params"
  ]
  s = SIZES["mu"]
  shapes = {
    "/".join(k.key for k in path): tuple(v.shape)
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  blk = "Transformer/encoderblock_1"
  attn = f"{blk}/MultiHeadDotProductAttention_1"
  head_dim = s.width // s.heads
  expected = {
    "cls": (1, 1, s.width),
    "embedding/kernel": (4, 4, 3, s.width),
    "Transformer/posembed_input/pos_embedding": (1, 5, s.width),
    "Transformer/encoder_norm/scale": (s.width,),
    f"{blk}/LayerNorm_0/scale": (s.width,),
    f"{attn}/query/kernel": (s.width, s.heads, head_dim),
    f"{attn}/out/kernel": (s.heads, head_dim, s.width),
    f"{blk}/LayerNorm_2/bias": (s.width,),
    f"{blk}/MlpBlock_3/Dense_0/kernel": (s.width, s.mlp_dim),
    f"{blk}/MlpBlock_3/Dense_1/kernel": (s.mlp_dim, s.width),
    "head/kernel": (s.width, 5),
  }
  for path, shape in expected.items():
    assert shapes[path] == shape, path
  assert sum(k.startswith("Transformer/encoderblock_") for k in shapes) == s.depth * 16


def test_tracker_branches_on_vit_own_block_parameters():
  model = VisionTransformer(num_classes=5, patch=4, size="mu")
  x = jnp.ones((2, 8, 8, 3))
  params = model.init(jax.random.key(0), x)["params"]
  comps = rgft_jax.ErrorTracker(model).components(params, x)
  assert len(comps) == 2 * SIZES["mu"].depth
  sizes = dict(zip(comps.names, comps.sizes(params), strict=True))
  s = SIZES["mu"]
  attn = (
    4 * (s.width * s.width + s.width) + 2 * s.width
  )  # q, k, v, out and LayerNorm_0.
  mlp = (
    2 * s.width * s.mlp_dim + s.mlp_dim + s.width + 2 * s.width
  )  # Dense_0/1, LayerNorm_2.
  assert sizes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1"] == attn
  assert sizes["Transformer/encoderblock_1/MlpBlock_3"] == mlp


def _write_npz(path, params, extra=None):
  flat = {
    "/".join(k.key for k in p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  flat.update(extra or {})
  np.savez(path, **flat)
  return flat


def test_load_npz_replaces_everything_but_the_head(tmp_path):
  x = jnp.ones((1, 8, 8, 3))
  source = VisionTransformer(num_classes=7, patch=4, size="mu")
  params = source.init(jax.random.key(1), x)["params"]
  path = tmp_path / "ViT-mu.npz"
  width = SIZES["mu"].width
  flat = _write_npz(path, params, {"pre_logits/kernel": np.ones((width, width))})
  target = VisionTransformer(num_classes=3, patch=4, size="mu")
  init = target.init(jax.random.key(2), x)["params"]
  loaded = load_npz(str(path), init)
  for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]:
    key = "/".join(k.key for k in p)
    if key.startswith("head/"):
      np.testing.assert_array_equal(v, init["head"][p[-1].key])
    else:
      np.testing.assert_array_equal(v, flat[key], err_msg=key)
  assert loaded["head"]["kernel"].shape == (width, 3)


def test_load_npz_resizes_the_position_embedding(tmp_path):
  source = VisionTransformer(num_classes=7, patch=4, size="mu")
  params = source.init(jax.random.key(1), jnp.ones((1, 8, 8, 3)))["params"]
  width = SIZES["mu"].width
  # Class token 5, grid constant per channel: any bilinear resize keeps both.
  channel = np.arange(width, dtype=np.float32)
  pos = np.concatenate([np.full((1, 1, width), 5.0), np.tile(channel, (1, 4, 1))], 1)
  params["Transformer"]["posembed_input"]["pos_embedding"] = jnp.asarray(pos)
  path = tmp_path / "ViT-mu.npz"
  _write_npz(path, params)
  target = VisionTransformer(num_classes=3, patch=4, size="mu")
  init = target.init(jax.random.key(2), jnp.ones((1, 16, 16, 3)))["params"]
  loaded = load_npz(str(path), init)
  resized = np.asarray(loaded["Transformer"]["posembed_input"]["pos_embedding"])
  assert resized.shape == (1, 17, width)
  np.testing.assert_allclose(resized[0, 0], 5.0)
  np.testing.assert_allclose(resized[0, 1:], np.tile(channel, (16, 1)), rtol=1e-6)


def test_load_npz_names_what_does_not_fit(tmp_path):
  x = jnp.ones((1, 8, 8, 3))
  params = VisionTransformer(num_classes=7, patch=4, size="mu").init(
    jax.random.key(1), x
  )["params"]
  path = tmp_path / "bad.npz"
  _write_npz(path, params, {"Transformer/extra/kernel": np.ones(3)})
  other = VisionTransformer(num_classes=3, patch=2, size="mu")
  init = other.init(jax.random.key(2), jnp.ones((1, 4, 4, 3)))["params"]
  with pytest.raises(ValueError, match=r"extra/kernel.*embedding/kernel"):
    load_npz(str(path), init)
