"""The tracker on Hugging Face Flax (Linen) models: ViT, BERT, GPT-2, ResNet,
OPT, BART, T5, RoBERTa, ELECTRA, ALBERT, the CLIP vision and text towers,
GPT-Neo, Llama, Mistral, Gemma, GPT-J and Bloom.

Tiny random-init configurations of `transformers` 4.x models (v5 dropped
Flax), with `select="branches"`: the residual branches found from each
model's dataflow, whatever its classes are called. The expected components,
the owner of every parameter and the parameters listed as shared (several
branches compute with them) are written out by hand from the models'
source. The tracker gets the wrapper's `.module` and the loss applies it
with `{"params": params}`. Each model: its components and owners; RGFT steps
lower the loss (what no component owns takes Adam's update unscaled); loss,
gradients and error map against the independent per-example reference; each
component detached against `stop_gradient` put in by the test's own
interceptor.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _compat_reference import Reference
from _compat_reference import allow_rank_promotion  # noqa: F401 (autouse fixture)
from _compat_reference import assert_matches
from _compat_reference import assert_ownership
from _compat_reference import jit
from _compat_reference import linen_detached_grads
from _compat_reference import linen_reference
from transformers import AlbertConfig
from transformers import BartConfig
from transformers import BertConfig
from transformers import BloomConfig
from transformers import CLIPTextConfig
from transformers import CLIPVisionConfig
from transformers import ElectraConfig
from transformers import FlaxAlbertForSequenceClassification
from transformers import FlaxBartForConditionalGeneration
from transformers import FlaxBertForSequenceClassification
from transformers import FlaxBloomForCausalLM
from transformers import FlaxCLIPTextModel
from transformers import FlaxCLIPVisionModel
from transformers import FlaxElectraForSequenceClassification
from transformers import FlaxGemmaForCausalLM
from transformers import FlaxGPT2LMHeadModel
from transformers import FlaxGPTJForCausalLM
from transformers import FlaxGPTNeoForCausalLM
from transformers import FlaxLlamaForCausalLM
from transformers import FlaxMistralForCausalLM
from transformers import FlaxOPTForCausalLM
from transformers import FlaxResNetForImageClassification
from transformers import FlaxRobertaForSequenceClassification
from transformers import FlaxT5ForConditionalGeneration
from transformers import FlaxViTForImageClassification
from transformers import GemmaConfig
from transformers import GPT2Config
from transformers import GPTJConfig
from transformers import GPTNeoConfig
from transformers import LlamaConfig
from transformers import MistralConfig
from transformers import OPTConfig
from transformers import ResNetConfig
from transformers import RobertaConfig
from transformers import T5Config
from transformers import ViTConfig

import rgft_jax
from rgft_jax._components import leaves_by_path

pytestmark = pytest.mark.slow  # Third-party models.

BATCH = 4
CLASSES = 3
VOCAB = 50
SEQ = 8


@dataclasses.dataclass(frozen=True)
class Case:
  """A model, its parameters, a fixed batch and what the components must be.

  `loss(params, *batch)` is the eval-mode batch-mean loss; `train_loss(params,
  state, *batch)` returns `(loss, new_state)` (batch statistics for ResNet,
  `{}` otherwise). `inputs` are the model inputs `components()` is called on.
  `reference_of` is the model the per-example reference runs on, when not this
  one (the same model without gradient checkpointing). `rules` give the owner
  of each parameter leaf (`(regex, component)`, the first match wins; no
  match: in no component).
  """

  module: nn.Module
  params: Any
  state: Any
  inputs: tuple
  batch: tuple
  loss: Callable[..., jax.Array]
  train_loss: Callable[..., Any]
  names: tuple[str, ...]
  rules: tuple[tuple[str, str], ...]
  unassigned: tuple[str, ...]
  reference_of: Case | None = None  # Measure against this model's reference.
  # Components whose module returns a tuple: the entry added to the stream.
  parts: dict[str, int] = dataclasses.field(default_factory=dict)
  # Patterns of the leaves `Components.shared` lists (several branches
  # compute with them), and the warning `components()` gives, if any.
  shared: tuple[str, ...] = ()
  warns: str | None = None


def _by_path(pattern: str):
  """A predicate selecting the modules whose `/`-joined path matches `pattern`."""
  regex = re.compile(pattern)
  return lambda path, module: regex.fullmatch("/".join(path)) is not None


def _init(module, *inputs):
  # An RBG key: the threefry init of the conv kernels takes seconds to compile.
  key = jax.random.key(0, impl="rbg")
  return jit(lambda k: module.init(k, *inputs))(key)


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _stateless(loss):
  return lambda params, state, *batch: (loss(params, *batch), state)


def _vit() -> Case:
  config = ViTConfig(
    image_size=8,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    num_labels=CLASSES,
  )
  module = FlaxViTForImageClassification(config, _do_init=False).module
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, 8, 8, 3)), jnp.float32)
  y = jnp.arange(BATCH) % CLASSES
  params = _init(module, x)["params"]

  def loss(params, x, y):
    return _ce(module.apply({"params": params}, x, deterministic=True).logits, y)

  # Pre-norm attention: `attention` is added to what `layernorm_before` read.
  # HF splits the MLP into `intermediate` (dense + GELU) and `output` (dense,
  # dropout, + residual): the value added is `output/dense`'s, and that branch
  # owns everything from `layernorm_after` on.
  layer = r"vit/encoder/layer/(\d+)"
  return Case(
    module=module,
    params=params,
    state={},
    inputs=(x,),
    batch=(x, y),
    loss=loss,
    train_loss=_stateless(loss),
    names=tuple(
      f"vit/encoder/layer/{i}/{m}"
      for i in range(2)
      for m in ("attention", "output/dense")
    ),
    rules=(
      (layer + r"/(attention|layernorm_before)/.*", r"vit/encoder/layer/\1/attention"),
      (
        layer + r"/(intermediate|layernorm_after|output/dense)/.*",
        r"vit/encoder/layer/\1/output/dense",
      ),
    ),
    unassigned=("vit/embeddings/", "vit/layernorm/", "classifier/"),
  )


def _bert(gradient_checkpointing: bool = False) -> Case:
  """BERT; with `gradient_checkpointing` (nn.remat around each layer) it
  takes the plain model's parameters, whose tree it must share."""
  config = BertConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    num_labels=CLASSES,
  )
  model = FlaxBertForSequenceClassification(
    config, _do_init=False, gradient_checkpointing=gradient_checkpointing
  )
  module = model.module
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  mask = jnp.ones((BATCH, SEQ), jnp.int32).at[1, -3:].set(0)  # One padded example.
  y = jnp.arange(BATCH) % CLASSES
  types = jnp.zeros_like(ids)
  positions = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
  inputs = (ids, mask, types, positions, None)  # head_mask=None
  plain = _case("bert") if gradient_checkpointing else None
  if plain is None:
    params = _init(module, *inputs)["params"]
  else:
    params = plain.params
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    assert jax.tree.map(jnp.shape, shapes["params"]) == jax.tree.map(jnp.shape, params)

  def loss(params, ids, mask, y):
    out = module.apply(
      {"params": params}, ids, mask, jnp.zeros_like(ids), positions[: len(ids)], None
    )
    return _ce(out.logits, y)

  # Post-LN: `attention/output` and `output` add the residual inside, then
  # normalise. The values added are their `dense` outputs; the attention
  # branch owns `self` (q, k, v) and `attention/output/dense`, the MLP branch
  # `intermediate` and `output/dense`. The LayerNorms after the adds are on
  # the stream, in no branch.
  layer = r"bert/encoder/layer/(\d+)"
  return Case(
    module=module,
    params=params,
    state={},
    inputs=inputs,
    batch=(ids, mask, y),
    loss=loss,
    train_loss=_stateless(loss),
    names=tuple(
      f"bert/encoder/layer/{i}/{m}"
      for i in range(2)
      for m in ("attention/output/dense", "output/dense")
    ),
    rules=(
      (
        layer + r"/attention/(self|output/dense)/.*",
        r"bert/encoder/layer/\1/attention/output/dense",
      ),
      (
        layer + r"/(intermediate|output/dense)/.*",
        r"bert/encoder/layer/\1/output/dense",
      ),
    ),
    unassigned=("bert/embeddings/", "bert/pooler/", "classifier/"),
    reference_of=plain,
  )


def _gpt2() -> Case:
  config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4)
  module = FlaxGPT2LMHeadModel(config, _do_init=False).module
  rng = np.random.default_rng(2)
  ids = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
  inputs = (ids, jnp.ones_like(ids), positions)
  params = _init(module, *inputs)["params"]

  def loss(params, ids):
    logits = module.apply(
      {"params": params}, ids, jnp.ones_like(ids), positions[: len(ids)]
    ).logits
    return _ce(logits[:, :-1], ids[:, 1:])  # Next token, mean over tokens.

  block = r"transformer/h/(\d+)"
  return Case(
    module=module,
    params=params,
    state={},
    inputs=inputs,
    batch=(ids,),
    loss=loss,
    train_loss=_stateless(loss),
    names=tuple(f"transformer/h/{i}/{m}" for i in range(2) for m in ("attn", "mlp")),
    rules=(
      (block + r"/(attn|ln_1)/.*", r"transformer/h/\1/attn"),
      (block + r"/(mlp|ln_2)/.*", r"transformer/h/\1/mlp"),
    ),
    # Tied embeddings: the LM head has no parameters of its own.
    unassigned=("transformer/wte/", "transformer/wpe/", "transformer/ln_f/"),
  )


def _resnet() -> Case:
  config = ResNetConfig(
    num_channels=3,
    embedding_size=8,
    hidden_sizes=[8, 16],
    depths=[1, 1],
    layer_type="basic",
    num_labels=CLASSES,
  )
  module = FlaxResNetForImageClassification(config, _do_init=False).module
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(BATCH, 16, 16, 3)), jnp.float32)
  y = jnp.arange(BATCH) % CLASSES
  variables = _init(module, x)
  params, stats = variables["params"], variables["batch_stats"]

  def loss(params, x, y):  # Eval mode: running statistics, examples independent.
    out = module.apply({"params": params, "batch_stats": stats}, x, deterministic=True)
    return _ce(out.logits, y)

  def train_loss(params, stats, x, y):  # Batch statistics, updated.
    out, new = module.apply(
      {"params": params, "batch_stats": stats},
      x,
      deterministic=False,
      mutable=["batch_stats"],
    )
    return _ce(out.logits, y), new["batch_stats"]

  # Each residual layer's branch (`layer`: conv-BN-ReLU-conv-BN) and, where the
  # shape changes, its projection shortcut (conv-BN), which reads the same
  # input; the stem (conv-BN) is below every branch, in none.
  block = r"resnet/encoder/stages/(\d+)/layers/(\d+)"
  return Case(
    module=module,
    params=params,
    state=stats,
    inputs=(x,),
    batch=(x, y),
    loss=loss,
    train_loss=train_loss,
    names=(
      "resnet/encoder/stages/0/layers/0/layer",
      "resnet/encoder/stages/1/layers/0/layer",
      "resnet/encoder/stages/1/layers/0/shortcut",
    ),
    rules=(
      (block + r"/(layer|shortcut)/.*", r"resnet/encoder/stages/\1/layers/\2/\3"),
    ),
    unassigned=("resnet/embedder/", "classifier/"),
  )


def _t5_clip_patch():
  """transformers' Flax T5 calls `jnp.clip(x, a_max=...)`, which this jax
  removed: its module gets a `jnp` whose `clip` maps the old keywords. The
  patch touches the T5 module's namespace only, in this test process."""
  import transformers.models.t5.modeling_flax_t5 as t5

  class _Jnp:
    def __getattr__(self, name):
      return getattr(jnp, name)

    @staticmethod
    def clip(a, a_min=None, a_max=None, **kwargs):
      return jnp.clip(
        a,
        a_min if a_min is not None else kwargs.pop("min", None),
        a_max if a_max is not None else kwargs.pop("max", None),
      )

  try:
    jnp.clip(jnp.zeros(1), a_max=0)
  except TypeError:
    t5.jnp = _Jnp()


def _seq2seq_loss(module, n_inputs):
  def loss(params, *batch):
    out = module.apply({"params": params}, *batch[:n_inputs])
    dec = batch[2]
    return _ce(out.logits[:, :-1], dec[:, 1:])

  return loss


def _opt() -> Case:
  config = OPTConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=64,
    num_attention_heads=4,
    max_position_embeddings=16,
    word_embed_proj_dim=32,
  )
  module = FlaxOPTForCausalLM(config, _do_init=False).module
  rng = np.random.default_rng(4)
  ids = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
  inputs = (ids, jnp.ones_like(ids), positions)
  params = _init(module, *inputs)["params"]

  def loss(params, ids):
    logits = module.apply(
      {"params": params}, ids, jnp.ones_like(ids), positions[: len(ids)]
    ).logits
    return _ce(logits[:, :-1], ids[:, 1:])

  # Pre-norm. The MLP runs on batch x time flattened; one dropout instance
  # follows the attention and fc2: each call is a site, the MLP's is named
  # after fc2 (fc1 and fc2 are the layer's own modules).
  layer = r"model/decoder/layers/(\d+)"
  return Case(
    module=module,
    params=params,
    state={},
    inputs=inputs,
    batch=(ids,),
    loss=loss,
    train_loss=_stateless(loss),
    names=tuple(
      f"model/decoder/layers/{i}/{m}" for i in range(2) for m in ("self_attn", "fc2")
    ),
    rules=(
      (
        layer + r"/(self_attn|self_attn_layer_norm)/.*",
        r"model/decoder/layers/\1/self_attn",
      ),
      (layer + r"/(fc1|fc2|final_layer_norm)/.*", r"model/decoder/layers/\1/fc2"),
    ),
    unassigned=(
      "model/decoder/embed_tokens/",
      "model/decoder/embed_positions/",
      "model/decoder/final_layer_norm/",
    ),
    parts={f"model/decoder/layers/{i}/self_attn": 0 for i in range(2)},
  )


def _bart() -> Case:
  config = BartConfig(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=16,
  )
  module = FlaxBartForConditionalGeneration(config, _do_init=False).module
  rng = np.random.default_rng(5)
  ids = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  dec = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
  ones = jnp.ones_like(ids)
  inputs = (ids, ones, dec, ones, pos, pos)
  params = _init(module, *inputs)["params"]
  # Post-norm; one dropout instance follows the self-attention, the
  # cross-attention and fc2: each call is a site. The layer norms after the
  # adds are on the stream; the encoder's parameters reach every
  # cross-attention: in no decoder component.
  enc = r"model/encoder/layers/(\d+)"
  dec_l = r"model/decoder/layers/(\d+)"
  names = tuple(
    f"model/encoder/layers/{i}/{m}" for i in range(2) for m in ("self_attn", "fc2")
  ) + tuple(
    f"model/decoder/layers/{i}/{m}"
    for i in range(2)
    for m in ("self_attn", "encoder_attn", "fc2")
  )
  return Case(
    module=module,
    params=params,
    state={},
    inputs=inputs,
    batch=inputs,
    loss=_seq2seq_loss(module, 6),
    train_loss=_stateless(_seq2seq_loss(module, 6)),
    names=names,
    rules=(
      (enc + r"/self_attn/.*", r"model/encoder/layers/\1/self_attn"),
      (enc + r"/(fc1|fc2)/.*", r"model/encoder/layers/\1/fc2"),
      (dec_l + r"/(self_attn|encoder_attn)/.*", r"model/decoder/layers/\1/\2"),
      (dec_l + r"/(fc1|fc2)/.*", r"model/decoder/layers/\1/fc2"),
    ),
    unassigned=(
      "model/shared/",
      "model/encoder/embed_positions/",
      "model/encoder/layers/0/self_attn_layer_norm/",
      "model/decoder/layers/1/final_layer_norm/",
      "final_logits_bias",
    ),
    parts={n: 0 for n in names if n.endswith("attn")},
    # The encoder's stream below its branches (the post-norms included) is
    # what every cross-attention reads.
    shared=(
      r"model/encoder/(embed_positions|layernorm_embedding)/.*",
      r"model/encoder/layers/\d+/(self_attn_layer_norm|final_layer_norm)/.*",
    ),
  )


def _t5() -> Case:
  _t5_clip_patch()
  config = T5Config(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
  )
  module = FlaxT5ForConditionalGeneration(config, _do_init=False).module
  rng = np.random.default_rng(6)
  ids = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  dec = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  ones = jnp.ones_like(ids).at[1, -2:].set(0)  # One padded example.
  inputs = (ids, ones, dec, jnp.ones_like(dec))
  params = _init(module, *inputs)["params"]
  # Pre-norm. Each attention returns (output, position bias); the bias is
  # computed in the first layer of each stack (masked at float32's minimum)
  # and read by every later layer: its table is in no component, and only
  # the output is measured. The encoder's final norm is read by every
  # cross-attention: in none.
  s = r"(encoder|decoder)/block/(\d+)/layer"
  names = tuple(
    f"encoder/block/{i}/layer/{m}"
    for i in range(2)
    for m in ("0/SelfAttention", "1/DenseReluDense")
  ) + tuple(
    f"decoder/block/{i}/layer/{m}"
    for i in range(2)
    for m in ("0/SelfAttention", "1/EncDecAttention", "2/DenseReluDense")
  )
  return Case(
    module=module,
    params=params,
    state={},
    inputs=inputs,
    batch=inputs,
    loss=_seq2seq_loss(module, 4),
    train_loss=_stateless(_seq2seq_loss(module, 4)),
    names=names,
    rules=(
      (
        s + r"/0/(layer_norm|SelfAttention/(q|k|v|o))/.*",
        r"\1/block/\2/layer/0/SelfAttention",
      ),
      (r"decoder/block/(\d+)/layer/1/.*", r"decoder/block/\1/layer/1/EncDecAttention"),
      (r"encoder/block/(\d+)/layer/1/.*", r"encoder/block/\1/layer/1/DenseReluDense"),
      (r"decoder/block/(\d+)/layer/2/.*", r"decoder/block/\1/layer/2/DenseReluDense"),
    ),
    unassigned=(
      "shared/",
      "encoder/block/0/layer/0/SelfAttention/relative_attention_bias/",
      "decoder/block/0/layer/0/SelfAttention/relative_attention_bias/",
      "encoder/final_layer_norm/",
      "decoder/final_layer_norm/",
    ),
    parts={n: 0 for n in names if n.endswith("Attention")},
    shared=(
      r"(encoder|decoder)/block/0/layer/0/SelfAttention/relative_attention_bias/.*",
      r"encoder/final_layer_norm/.*",
    ),
  )


# The sizes of the encoders below (BERT's names): 2 layers of width 32, 4 heads.
_SIZES = dict(
  hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)


def _encoder(
  module, seed: int, head_mask: bool = True, first_position: int = 0, **case
) -> Case:
  """A BERT-like sequence classifier taking `(ids, mask, token types,
  positions[, head_mask])`, one example padded; `case`: the rest of the Case."""
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  mask = jnp.ones((BATCH, SEQ), jnp.int32).at[1, -3:].set(0)
  y = jnp.arange(BATCH) % CLASSES
  positions = first_position + jnp.broadcast_to(jnp.arange(SEQ), ids.shape)

  def inputs_of(ids, mask):
    extra = (None,) if head_mask else ()
    return (ids, mask, jnp.zeros_like(ids), positions[: len(ids)], *extra)

  inputs = inputs_of(ids, mask)
  params = _init(module, *inputs)["params"]

  def loss(params, ids, mask, y):
    return _ce(module.apply({"params": params}, *inputs_of(ids, mask)).logits, y)

  return Case(
    module=module,
    params=params,
    state={},
    inputs=inputs,
    batch=(ids, mask, y),
    loss=loss,
    train_loss=_stateless(loss),
    **case,
  )


def _layers(layer: str, branches: dict[str, str]) -> dict[str, Any]:
  """Names and rules of the 2 layers under `layer`: in each, component
  `name` (a module path in the layer) owns the modules that
  `branches[name]` (a regex over module paths in the layer) matches."""
  return dict(
    names=tuple(f"{layer}/{i}/{name}" for i in range(2) for name in branches),
    rules=tuple(
      (rf"{layer}/(\d+)/({owned})/.*", rf"{layer}/\1/{name}")
      for name, owned in branches.items()
    ),
  )


# BERT's post-LN layers: the attention branch owns `self` (q, k, v) and
# `attention/output/dense`, the MLP branch `intermediate` and `output/dense`;
# the LayerNorms after the adds are on the stream.
_BERT = {
  "attention/output/dense": "attention/(self|output/dense)",
  "output/dense": "intermediate|output/dense",
}


def _roberta() -> Case:
  config = RobertaConfig(
    **_SIZES,
    vocab_size=VOCAB,
    max_position_embeddings=SEQ + 2,
    num_labels=CLASSES,
  )
  module = FlaxRobertaForSequenceClassification(config, _do_init=False).module
  # Positions start after the padding index (1), as RoBERTa numbers them.
  return _encoder(
    module,
    7,
    first_position=2,
    **_layers("roberta/encoder/layer", _BERT),
    unassigned=("roberta/embeddings/", "classifier/dense/", "classifier/out_proj/"),
  )


def _electra() -> Case:
  config = ElectraConfig(
    **_SIZES,
    vocab_size=VOCAB,
    embedding_size=16,  # Projected to the width by `embeddings_project`.
    max_position_embeddings=16,
    num_labels=CLASSES,
  )
  module = FlaxElectraForSequenceClassification(config, _do_init=False).module
  return _encoder(
    module,
    8,
    **_layers("electra/encoder/layer", _BERT),
    unassigned=(
      "electra/embeddings/",
      "electra/embeddings_project/",
      "classifier/dense/",
      "classifier/out_proj/",
    ),
  )


def _albert(layers: int = 2, groups: int = 1) -> Case:
  """ALBERT: `layers` deep, its layers `groups` modules, group `g` applied at
  the depths `i` with `int(i / (layers / groups)) == g`. With one group (as
  ALBERT ships) one layer serves every depth: each branch computes only with
  parameters it shares with the other depth's, so the model has no component
  and `components()` says so. With 3 layers in 2 groups, group 0 serves
  depths 0 and 1 (shared) and group 1 depth 2 (two components)."""
  config = AlbertConfig(
    **dict(_SIZES, num_hidden_layers=layers),
    vocab_size=VOCAB,
    embedding_size=16,  # Projected by `embedding_hidden_mapping_in`.
    num_hidden_groups=groups,
    max_position_embeddings=16,
    num_labels=CLASSES,
  )
  module = FlaxAlbertForSequenceClassification(config, _do_init=False).module
  group = r"albert/encoder/albert_layer_groups/{}/albert_layers/0"
  # Post-LN as BERT: the attention branch (`attention/dense`, added inside
  # the attention module before its LayerNorm) owns q, k, v and `dense`; the
  # MLP branch (`ffn_output`) owns `ffn` and `ffn_output`.
  owned = (
    ("attention/(query|key|value|dense)", "attention/dense"),
    ("ffn(_output)?", "ffn_output"),
  )
  last = groups - 1 if groups > 1 else None  # The one group used once.
  names = () if last is None else tuple(f"{group.format(last)}/{n}" for _, n in owned)
  rules = (
    ()
    if last is None
    else tuple(
      (f"{group.format(last)}/{pattern}/.*", f"{group.format(last)}/{n}")
      for pattern, n in owned
    )
  )
  shared = tuple(f"{group.format(0)}/{pattern}/.*" for pattern, _ in owned)
  return _encoder(
    module,
    9,
    head_mask=False,
    names=names,
    rules=rules,
    unassigned=(
      "albert/embeddings/",
      "albert/encoder/embedding_hidden_mapping_in/",
      f"{group.format(0)}/",
      "albert/pooler/",
      "classifier/",
    ),
    shared=shared,
    warns=None if names else r"has no component.*albert_layers/0/ffn_output/kernel",
  )


def _pooled_regression(module, inputs, targets, batch, inputs_of) -> dict[str, Any]:
  """Parameters and losses of a tower regressed on its pooled output:
  `loss(params, *batch)`, the mean over examples of the squared distance
  from `pooler_output` to the example's target (the batch's last entry)."""
  params = _init(module, *inputs)["params"]

  def loss(params, *batch):
    *given, targets = batch
    pooled = module.apply({"params": params}, *inputs_of(*given)).pooler_output
    return jnp.mean(jnp.sum((pooled - targets) ** 2, -1))

  return dict(
    module=module,
    params=params,
    state={},
    inputs=inputs,
    batch=(*batch, targets),
    loss=loss,
    train_loss=_stateless(loss),
  )


# CLIP's pre-norm layers: each branch owns its module and its pre-norm.
_CLIP = {"self_attn": "self_attn|layer_norm1", "mlp": "mlp|layer_norm2"}


def _clip_vision() -> Case:
  config = CLIPVisionConfig(
    **_SIZES,
    image_size=8,
    patch_size=4,
  )
  module = FlaxCLIPVisionModel(config, _do_init=False).module
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(size=(BATCH, 8, 8, 3)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(BATCH, 32)), jnp.float32)
  # Pre-norm; the pooled output is the class token's, after `post_layernorm`.
  return Case(
    **_pooled_regression(module, (x,), targets, (x,), lambda x: (x,)),
    **_layers("vision_model/encoder/layers", _CLIP),
    unassigned=(
      "vision_model/embeddings/",
      "vision_model/pre_layrnorm/",
      "vision_model/post_layernorm/",
    ),
  )


def _clip_text() -> Case:
  eos = VOCAB - 1  # The pooled output is the first end-of-text token's.
  config = CLIPTextConfig(
    **_SIZES,
    vocab_size=VOCAB,
    max_position_embeddings=16,
    eos_token_id=eos,
  )
  module = FlaxCLIPTextModel(config, _do_init=False).module
  rng = np.random.default_rng(11)
  ids = np.asarray(rng.integers(0, eos, (BATCH, SEQ)), np.int32)
  ids[:, -1] = eos
  ids[1, -3], ids[1, -2:] = eos, 0  # One example padded after its end.
  ids = jnp.asarray(ids)
  mask = jnp.ones_like(ids).at[1, -2:].set(0)
  targets = jnp.asarray(rng.normal(size=(BATCH, 32)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)

  def inputs_of(ids, mask):
    return ids, mask, positions[: len(ids)]

  return Case(
    **_pooled_regression(module, inputs_of(ids, mask), targets, (ids, mask), inputs_of),
    **_layers("text_model/encoder/layers", _CLIP),
    unassigned=("text_model/embeddings/", "text_model/final_layer_norm/"),
  )


def _causal_lm(module, seed: int, positions: bool = True, **case) -> Case:
  """A causal LM taking `(ids, mask, positions)` (`(ids, mask)` without
  `positions`) with the next-token loss; `case`: the rest of the Case."""
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  where = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)

  def inputs_of(ids):
    return (ids, jnp.ones_like(ids), *((where[: len(ids)],) if positions else ()))

  inputs = inputs_of(ids)
  params = _init(module, *inputs)["params"]

  def loss(params, ids):
    logits = module.apply({"params": params}, *inputs_of(ids)).logits
    return _ce(logits[:, :-1], ids[:, 1:])

  return Case(
    module=module,
    params=params,
    state={},
    inputs=inputs,
    batch=(ids,),
    loss=loss,
    train_loss=_stateless(loss),
    **case,
  )


def _gpt_neo() -> Case:
  config = GPTNeoConfig(
    vocab_size=VOCAB,
    max_position_embeddings=16,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    attention_types=[[["global", "local"], 1]],  # Layer 1 attends locally.
    window_size=4,
  )
  module = FlaxGPTNeoForCausalLM(config, _do_init=False).module
  return _causal_lm(
    module,
    12,
    **_layers("transformer/h", {"attn": "attn|ln_1", "mlp": "mlp|ln_2"}),
    unassigned=("transformer/wte/", "transformer/wpe/", "transformer/ln_f/"),
  )


_LLAMA_SIZES = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,  # Grouped-query attention.
  max_position_embeddings=16,
)
# RMSNorm pre-norms, a gated MLP.
_LLAMA_RULES = _layers(
  "model/layers",
  {"self_attn": "self_attn|input_layernorm", "mlp": "mlp|post_attention_layernorm"},
)


def _llama() -> Case:
  module = FlaxLlamaForCausalLM(LlamaConfig(**_LLAMA_SIZES), _do_init=False).module
  return _causal_lm(
    module,
    13,
    **_LLAMA_RULES,
    unassigned=("model/embed_tokens/", "model/norm/", "lm_head/"),
  )


def _mistral() -> Case:
  config = MistralConfig(**_LLAMA_SIZES, sliding_window=4)  # Shorter than SEQ.
  module = FlaxMistralForCausalLM(config, _do_init=False).module
  return _causal_lm(
    module,
    14,
    **_LLAMA_RULES,
    unassigned=("model/embed_tokens/", "model/norm/", "lm_head/"),
  )


def _gemma() -> Case:
  config = GemmaConfig(
    **_LLAMA_SIZES, head_dim=8, hidden_activation="gelu_pytorch_tanh"
  )
  module = FlaxGemmaForCausalLM(config, _do_init=False).module
  # Tied embeddings: the LM head has no parameters of its own.
  return _causal_lm(
    module, 15, **_LLAMA_RULES, unassigned=("model/embed_tokens/", "model/norm/")
  )


def _gptj() -> Case:
  config = GPTJConfig(
    vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4, rotary_dim=4
  )
  module = FlaxGPTJForCausalLM(config, _do_init=False).module
  # Attention and MLP in parallel, both reading `ln_1`: `attn + mlp + x`.
  # Each owns its own module; `ln_1`, which both compute with, is shared.
  return _causal_lm(
    module,
    16,
    **_layers("transformer/h", {"attn": "attn", "mlp": "mlp"}),
    unassigned=(
      "transformer/wte/",
      "transformer/h/0/ln_1/",
      "transformer/ln_f/",
      "lm_head/",
    ),
    shared=(r"transformer/h/\d+/ln_1/.*",),
  )


def _bloom() -> Case:
  config = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
  module = FlaxBloomForCausalLM(config, _do_init=False).module
  # Pre-norm, ALiBi positions. The attention and the MLP add the residual
  # inside: the values added are `self_attention/dense`'s and
  # `mlp/dense_4h_to_h`'s; each branch owns its module and its pre-norm.
  # Tied embeddings: the LM head has no parameters of its own.
  return _causal_lm(
    module,
    17,
    positions=False,
    **_layers(
      "transformer/h",
      {
        "self_attention/dense": "input_layernorm|self_attention",
        "mlp/dense_4h_to_h": "post_attention_layernorm|mlp",
      },
    ),
    unassigned=(
      "transformer/word_embeddings/",
      "transformer/word_embeddings_layernorm/",
      "transformer/ln_f/",
    ),
  )


_BUILDERS = {
  "vit": _vit,
  "bert": _bert,
  "bert_gradient_checkpointing": functools.partial(_bert, gradient_checkpointing=True),
  "gpt2": _gpt2,
  "resnet": _resnet,
  "opt": _opt,
  "bart": _bart,
  "t5": _t5,
  "roberta": _roberta,
  "electra": _electra,
  "albert": _albert,
  "albert_groups": functools.partial(_albert, layers=3, groups=2),
  "clip_vision": _clip_vision,
  "clip_text": _clip_text,
  "gpt_neo": _gpt_neo,
  "llama": _llama,
  "mistral": _mistral,
  "gemma": _gemma,
  "gptj": _gptj,
  "bloom": _bloom,
}
MODELS = list(_BUILDERS)


@functools.cache
def _case(name: str) -> Case:
  return _BUILDERS[name]()


_REFERENCES: dict[int, Reference] = {}


def _reference(case: Case) -> Reference:
  """The per-example reference of `case` (of its `reference_of` when set)."""
  case = case.reference_of or case
  if id(case) not in _REFERENCES:
    _REFERENCES[id(case)] = linen_reference(
      case.loss, case.params, case.batch, case.names, parts=case.parts
    )
  return _REFERENCES[id(case)]


_SLOW = {"bart", "t5"}  # Encoder-decoders: two stacks to compile.


@pytest.fixture(
  scope="module",
  params=[pytest.param(m, marks=pytest.mark.slow) if m in _SLOW else m for m in MODELS],
)
def case(request) -> Case:
  # Module-scoped and parametrized: pytest runs each model's tests together.
  return _case(request.param)


def _tracker(case: Case) -> tuple[rgft_jax.ErrorTracker, rgft_jax.Components]:
  """A tracker of `case`'s module and its components (with the warning the
  case expects, if any)."""
  tracker = rgft_jax.ErrorTracker(case.module, select="branches")
  if case.warns is None:
    return tracker, tracker.components(case.params, *case.inputs)
  with pytest.warns(UserWarning, match=case.warns):
    return tracker, tracker.components(case.params, *case.inputs)


def test_components(case):
  _, comps = _tracker(case)
  assert_ownership(comps, case.params, case.names, case.rules, case.unassigned)
  shared = [
    p
    for p in leaves_by_path(case.params)
    if any(re.fullmatch(pattern, p) for pattern in case.shared)
  ]
  assert not case.shared or shared, case.shared
  assert sorted(comps.shared) == sorted(shared)


def test_rgft_steps_lower_the_loss(case):
  """Five RGFT steps lower the loss; on the first, what no component owns
  (shared parameters too) takes Adam's update unscaled."""
  tracker, comps = _tracker(case)
  tx = rgft_jax.rgft(1e-2, comps, warmup_steps=5)

  @jit
  def step(params, opt_state, state):
    (loss, state), grads, error_map = tracker.value_and_grad(
      case.train_loss, has_aux=True
    )(params, state, *case.batch)
    updates, opt_state = tx.update(grads, opt_state, params, error_map=error_map)
    new = optax.apply_updates(params, updates)
    return new, opt_state, state, loss, error_map, grads, updates

  params, opt_state, state = case.params, tx.init(case.params), case.state
  losses = []
  for i in range(6):  # The 6th call's loss is the loss after 5 updates.
    params, opt_state, state, loss, error_map, grads, updates = step(
      params, opt_state, state
    )
    if i == 0:  # Adam's first update, bias-corrected: -lr g / (|g| + eps).
      grads, updates = leaves_by_path(grads), leaves_by_path(updates)
      for path in comps.unassigned(case.params):
        g = np.asarray(grads[path], np.float64)
        adam = -1e-2 * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(updates[path], adam, rtol=1e-5, atol=1e-9)
    losses.append(float(loss))
    assert sorted(error_map) == sorted(case.names)
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in error_map.values())
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.9 * losses[0], losses


def test_norm_product_matches_per_example_reference(case):
  """Loss, gradients and error map against the independent reference; with
  gradient checkpointing, against the plain model's (same parameters)."""
  tracker, _ = _tracker(case)
  loss, grads, error_map = jit(tracker.value_and_grad(case.loss))(
    case.params, *case.batch
  )
  assert_matches(loss, grads, error_map, _reference(case))


def test_detaching_each_component_equals_stop_gradient(case):
  """Each component detached alone (a runtime set: one compiled program)
  against `jax.grad` of the loss with that module's output (the added part
  of a tuple) behind `stop_gradient`, by an interceptor of the test's own."""
  tracker, comps = _tracker(case)
  assert comps.names == case.names
  step = jit(
    lambda p, flags: tracker.value_and_grad(case.loss, detach=flags)(p, *case.batch)[1]
  )
  reference = linen_detached_grads(case.loss, case.names, case.parts)
  for i in range(len(comps)):
    flags = jnp.zeros(len(comps), bool).at[i].set(True)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      step(case.params, flags),
      reference(case.params, flags, *case.batch),
    )


def test_wrapper_is_refused_with_a_pointer_to_its_module():
  wrapper = FlaxGPT2LMHeadModel(
    GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=4),
    _do_init=False,
  )
  with pytest.raises(TypeError, match=r"\.module"):
    rgft_jax.ErrorTracker(wrapper, select="branches")
