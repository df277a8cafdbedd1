import io
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgft_jax
from experiments.vit import SIZES
from experiments.vit import VisionTransformer
from experiments.vit import load_npz
from experiments.vit import scan_params
from experiments.vit import short_name


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


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_vit_is_the_looped_one_and_its_layers_are_components(remat):
  looped = VisionTransformer(num_classes=5, patch=4, size="mu")
  scanned = VisionTransformer(num_classes=5, patch=4, size="mu", scan=True, remat=remat)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  y = jnp.array([0, 3, 1])
  params = looped.init(jax.random.key(0), x)["params"]
  params["head"]["kernel"] = jax.random.normal(
    jax.random.key(2), (SIZES["mu"].width, 5)
  )
  stacked = scan_params(params)
  # The scanned model's own initialisation has the layout scan_params makes.
  init = jax.eval_shape(scanned.init, jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, stacked)
  jax.tree.map(np.testing.assert_array_equal, scan_params(stacked, scan=False), params)

  def loss_fn(model):
    def loss(p, x, y):
      logits = model.apply({"params": p}, x)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    return loss

  maps = []
  for model, p in ((looped, params), (scanned, stacked)):
    tracker = rgft_jax.ErrorTracker(model, select="heads")
    names = tracker.components(p, x).names
    loss, grads, error_map = jax.jit(tracker.value_and_grad(loss_fn(model)))(p, x, y)
    maps.append((names, loss, grads, error_map))
  (names_l, loss_l, grads_l, map_l), (names_s, loss_s, grads_s, map_s) = maps
  unroll = {n: re.sub(r"encoderblock/(\d+)/", r"encoderblock_\1/", n) for n in names_s}
  assert [unroll[n] for n in names_s] == list(names_l)
  assert len(names_s) == SIZES["mu"].depth * SIZES["mu"].heads
  for n in names_s:
    np.testing.assert_allclose(map_s[n], map_l[unroll[n]], rtol=1e-4, err_msg=n)
  np.testing.assert_allclose(loss_s, loss_l, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    scan_params(grads_s, scan=False),
    grads_l,
  )


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


def _mu_params():
  x = jnp.ones((1, 8, 8, 3))
  return VisionTransformer(num_classes=7, patch=4, size="mu").init(
    jax.random.key(1), x
  )["params"]


def _npy(array):
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def _write_zip(path, params, members):
  """`params` as a .npz, then `members` (name: bytes) written as they are."""
  flat = {
    "/".join(k.key for k in p) + ".npy": _npy(np.asarray(v))
    for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  flat.update(members)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    for name, data in flat.items():
      zf.writestr(name, data)


def test_load_npz_says_a_file_that_is_no_zip_is_not_an_npz(tmp_path):
  init = _mu_params()
  noise = tmp_path / "noise.npz"
  noise.write_bytes(np.random.default_rng(0).bytes(4096))
  npy = tmp_path / "array.npy"
  np.save(npy, np.ones(3))
  for path in (noise, npy):
    with pytest.raises(ValueError, match=r"is not a \.npz \(zip\) file"):
      load_npz(str(path), init)


def test_load_npz_refuses_pickled_and_non_numeric_members(tmp_path):
  params = _mu_params()
  path = tmp_path / "pickled.npz"
  _write_npz(path, params, {"cls": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(ValueError, match=r"cls\.npy is a pickled \(object\) array"):
    load_npz(str(path), params)
  path = tmp_path / "text.npz"
  _write_npz(path, params, {"cls": np.array(["a"])})
  with pytest.raises(ValueError, match=r"cls\.npy has dtype <U1, not a number"):
    load_npz(str(path), params)
  path = tmp_path / "raw.npz"
  _write_zip(path, params, {"notes.txt": b"hello"})
  with pytest.raises(ValueError, match=r"not \.npy arrays: \['notes\.txt'\]"):
    load_npz(str(path), params)


def test_load_npz_refuses_a_member_larger_than_its_header_says(tmp_path):
  params = _mu_params()
  cls = np.zeros((1, 1, SIZES["mu"].width), np.float32)
  path = tmp_path / "bomb.npz"
  # 128 bytes of data and a 128-byte header, then 1 MB that compresses to 1 kB.
  _write_zip(path, params, {"cls.npy": _npy(cls) + bytes(2**20)})
  with pytest.raises(ValueError, match=r"cls\.npy declares 1048832 bytes"):
    load_npz(str(path), params)


def test_load_npz_reads_only_the_members_it_takes(tmp_path, monkeypatch):
  params = _mu_params()
  path = tmp_path / "ViT-mu.npz"
  # Dropped anyway: 16 MB of zeros, not even a .npy.
  _write_zip(path, params, {"pre_logits/kernel.npy": bytes(2**24)})
  opened = []
  zip_open = zipfile.ZipFile.open

  def spy(self, name, *args, **kwargs):
    opened.append(getattr(name, "filename", name))
    return zip_open(self, name, *args, **kwargs)

  monkeypatch.setattr(zipfile.ZipFile, "open", spy)
  loaded = load_npz(str(path), params)
  assert "pre_logits/kernel.npy" not in opened
  assert "head/kernel.npy" not in opened
  np.testing.assert_array_equal(loaded["cls"], params["cls"])


def test_load_npz_bounds_the_position_embedding_it_resizes(tmp_path):
  params = _mu_params()
  width = SIZES["mu"].width
  pos = "Transformer/posembed_input/pos_embedding"
  # The model has 5 tokens; up to 1 + 128 * 128 are taken, 1 + 129 * 129 not.
  path = tmp_path / "big.npz"
  _write_zip(path, params, {pos + ".npy": _npy(np.zeros((1, 1 + 129**2, width)))})
  match = rf"pos_embedding: checkpoint \(1, 16642, {width}\), model \(1, 5, {width}\)"
  with pytest.raises(ValueError, match=match + r" \(at most 16385 tokens\)"):
    load_npz(str(path), params)


def test_short_name_renames_whole_segments_only():
  attn = "Transformer/encoderblock_11/MultiHeadDotProductAttention_1/head3"
  assert short_name(attn) == "block11/attn/head3"
  assert short_name("Transformer/encoderblock_0/MlpBlock_3") == "block0/mlp"
  other = "VisionTransformer/my_encoderblock_2/MlpBlock_30"
  assert short_name(other) == other
