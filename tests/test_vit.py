import jax
import jax.numpy as jnp

import rgft_jax
from experiments.vit import SIZES
from experiments.vit import VisionTransformer


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
