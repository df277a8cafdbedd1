"""Attention heads found by dataflow in third-party models and our LM decoder.

`select="heads"` on Hugging Face's Flax ViT, BERT and GPT-2 (fused q/k/v
kernel), tunix's Llama 3 (grouped-query attention) and experiments.lm's
decoder (grouped-query, scanned and looped). The expected owner of every
parameter entry is written out below from each model's layout; the per-head
attributions are checked against the independent per-example reference,
which perturbs the output projection's input and splits it into heads by hand.
"""

from __future__ import annotations

import sys

import flax
import jax.numpy as jnp
import numpy as np
import pytest
from _compat_reference import HeadsAt
from _compat_reference import allow_rank_promotion  # noqa: F401  (a fixture)
from _compat_reference import assert_close_maps
from _compat_reference import jit
from _compat_reference import linen_reference
from _compat_reference import nnx_reference
from flax import nnx

import rgft_jax
from rgft_jax._components import leaves_by_path

pytestmark = pytest.mark.slow  # Third-party models.

HEADS, DIM, LAYERS = 4, 8, 2  # Every model below: 4 heads of 8, 2 layers.


def _owners(params, rules, attention_of, stacked=False) -> dict[str, np.ndarray]:
  """Per leaf, the expected component of each entry (None: no head).

  A rule `(suffix, axis)` says: a leaf ending in `suffix` owns entries by
  their index along `axis`: `HEADS * DIM` features (q, k, v, fused or not,
  or the projection's input features; heads major) or the `HEADS` axis
  itself. `attention_of(path)` names the leaf's attention; in a `stacked`
  leaf, layer `l` (axis 0) belongs to `layers/l/attn`. Every other leaf
  belongs to no head.
  """
  out = {}
  for path, leaf in leaves_by_path(params).items():
    shape = np.shape(leaf)
    out[path] = np.full(shape, None, object)
    for suffix, axis in rules:
      if not path.endswith(suffix):
        continue
      n = shape[axis]
      heads = np.arange(n) % (HEADS * DIM) // DIM if n > HEADS else np.arange(n)
      along = [1] * len(shape)
      along[axis] = n
      heads = np.broadcast_to(heads.reshape(along), shape)
      if stacked:
        layer = np.broadcast_to(
          np.arange(shape[0]).reshape([-1] + [1] * (len(shape) - 1)), shape
        )
        names = [
          f"layers/{i}/attn/head{h}"
          for i, h in zip(layer.flat, heads.flat, strict=False)
        ]
      else:
        names = [f"{attention_of(path)}/head{h}" for h in heads.flat]
      out[path] = np.array(names, object).reshape(shape)
      break
  return out


def _check_owners(comps, params, want) -> None:
  names = np.array([*comps.names, None], object)
  index = leaves_by_path(comps.index)
  for path, leaf in leaves_by_path(params).items():
    got = names[np.broadcast_to(np.asarray(index[path]), np.shape(leaf))]
    assert (got == want[path]).all(), (path, got, want[path])


# Hugging Face models (Linen).

hf = pytest.importorskip("test_compat_hf")

HF = {
  "vit": (
    "vit/encoder/layer/{}/attention",
    "vit/encoder/layer/{}/attention/output/dense",
    (
      ("attention/query/kernel", 1),
      ("attention/key/kernel", 1),
      ("attention/value/kernel", 1),
      ("attention/query/bias", 0),
      ("attention/key/bias", 0),
      ("attention/value/bias", 0),
      ("attention/output/dense/kernel", 0),
    ),
  ),
  "bert": (
    "bert/encoder/layer/{}/attention",
    "bert/encoder/layer/{}/attention/output/dense",
    (
      ("self/query/kernel", 1),
      ("self/key/kernel", 1),
      ("self/value/kernel", 1),
      ("self/query/bias", 0),
      ("self/key/bias", 0),
      ("self/value/bias", 0),
      ("attention/output/dense/kernel", 0),
    ),
  ),
  # GPT-2's Conv1D keeps its kernel as (features, inputs); c_attn's 96
  # features are q, k and v one after the other, each 4 heads of 8.
  "gpt2": (
    "transformer/h/{}/attn",
    "transformer/h/{}/attn/c_proj",
    (
      ("attn/c_attn/kernel", 0),
      ("attn/c_attn/bias", 0),
      ("attn/c_proj/kernel", 1),
    ),
  ),
}


def _attention_of(template: str):
  def of(path: str) -> str:
    layer = next(k for k in path.split("/") if k.isdigit())
    return template.format(layer)

  return of


@pytest.mark.parametrize("model", sorted(HF))
def test_hf_heads(model):
  case = hf._case(model)
  attention, projection, rules = HF[model]
  tracker = rgft_jax.ErrorTracker(case.module, select="heads")
  comps = tracker.components(case.params, *case.inputs)
  assert comps.names == tuple(
    f"{attention.format(i)}/head{h}" for i in range(LAYERS) for h in range(HEADS)
  )
  _check_owners(
    comps, case.params, _owners(case.params, rules, _attention_of(attention))
  )

  reference = linen_reference(
    case.loss,
    case.params,
    case.batch,
    [],
    heads={
      projection.format(i): HeadsAt(attention.format(i), HEADS, 1)
      for i in range(LAYERS)
    },
  )
  _, _, error_map = jit(tracker.value_and_grad(case.loss))(case.params, *case.batch)
  assert_close_maps(error_map, reference.norm_product)


# tunix's Llama 3 and our decoder (NNX, grouped-query attention: 4 query
# heads share 2 key/value heads, so k_proj and v_proj belong to no head).


def _check_nnx(model, windows, loss, rules, attention_of, stacked=False):
  """Owners by `rules`; returns the per-head error map of one jitted call."""
  params = nnx.state(model, nnx.Param)
  tracker = rgft_jax.ErrorTracker(model, select="heads")
  comps = tracker.components(params, *windows[0])
  assert comps.names == tuple(
    f"layers/{i}/attn/head{h}" for i in range(LAYERS) for h in range(HEADS)
  )
  _check_owners(comps, params, _owners(params, rules, attention_of, stacked))

  @nnx.jit
  def attribute(model, *batch):
    return tracker.value_and_grad(loss, has_aux=True)(model, *batch)[2]

  return attribute(model, *windows[1])


def _projections(path: str) -> dict[str, HeadsAt]:
  """Where the reference measures: the input of each layer's o_proj."""
  return {path.format(i): HeadsAt(f"layers/{i}/attn", HEADS, 2) for i in range(LAYERS)}


def _layer_attention(path: str) -> str:
  return "layers/" + path.split("/")[1] + "/attn"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="google-tunix needs 3.11")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:tunix.*")
@pytest.mark.filterwarnings(
  "ignore:'sharding' is deprecated, use 'out_sharding' instead:DeprecationWarning"
)
def test_tunix_llama_heads():  # The warnings: see test_compat_tunix.py.
  tunix = pytest.importorskip("test_compat_tunix")
  with flax.config.temp_flip_flag("always_shard_variable", False):
    model = tunix._model()
    error_map = _check_nnx(
      model,
      (tunix._inputs(), tunix._batch()),
      lambda model, *batch: (tunix.loss_fn(model, *batch), None),
      (("attn/q_proj/w", 1), ("attn/o_proj/w", 0)),  # (D, N, H), (N, H, D)
      _layer_attention,
    )
    reference = nnx_reference(
      tunix.loss_fn,
      model,
      tunix._batch(),
      [],
      heads=_projections("layers/{}/attn/o_proj"),
    )
  assert_close_maps(error_map, reference.norm_product)


@pytest.mark.parametrize("scan", [False, True])
def test_lm_decoder_heads(scan):
  from experiments.lm import model as lm

  cfg = lm.Config(
    n_layers=LAYERS,
    d_model=HEADS * DIM,
    n_heads=HEADS,
    n_kv_heads=2,
    d_ff=64,
    max_len=8,
    scan_layers=False,
  )
  looped = lm.Transformer(cfg, rngs=nnx.Rngs(0))
  windows = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 9)), jnp.int32)
  # q_proj (D, N, H) and o_proj (N, H, D); stacked, a layer axis comes first.
  rules = (("attn/q_proj/kernel", 1 + scan), ("attn/o_proj/kernel", 0 + scan))
  error_map = _check_nnx(
    lm.with_layout(looped, scan_layers=scan),
    ((windows[:, :-1],), (windows,)),
    lm.loss,
    rules,
    _layer_attention,
    stacked=scan,
  )
  # The reference runs on the looped model (same weights), one window at a time.
  reference = nnx_reference(
    lambda m, w: lm.loss(m, w)[0],
    looped,
    (windows,),
    [],
    heads=_projections("layers/{}/attn/o_proj"),
  )
  assert_close_maps(error_map, reference.norm_product)
