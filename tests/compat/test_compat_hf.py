"""The tracker on Hugging Face Flax (Linen) models: ViT, BERT, GPT-2, ResNet,
OPT, BART, T5.

Tiny random-init configurations of `transformers` 4.x models (v5 dropped
Flax), with `select="branches"`: the residual branches found from each
model's dataflow, whatever its classes are called. The expected components
and owners below are written out by hand from the models' source. The
tracker gets the wrapper's `.module` and the loss applies it with
`{"params": params}`.
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
from transformers import BartConfig
from transformers import BertConfig
from transformers import FlaxBartForConditionalGeneration
from transformers import FlaxBertForSequenceClassification
from transformers import FlaxGPT2LMHeadModel
from transformers import FlaxOPTForCausalLM
from transformers import FlaxResNetForImageClassification
from transformers import FlaxT5ForConditionalGeneration
from transformers import FlaxViTForImageClassification
from transformers import GPT2Config
from transformers import OPTConfig
from transformers import ResNetConfig
from transformers import T5Config
from transformers import ViTConfig

import rgft_jax

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
  one (the same model without gradient checkpointing).
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


def _tracker(case: Case) -> rgft_jax.ErrorTracker:
  return rgft_jax.ErrorTracker(case.module, select="branches")


def test_components(case):
  comps = _tracker(case).components(case.params, *case.inputs)
  assert_ownership(comps, case.params, case.names, case.rules, case.unassigned)


def test_rgft_steps_lower_the_loss(case):
  tracker = _tracker(case)
  comps = tracker.components(case.params, *case.inputs)
  tx = rgft_jax.rgft(1e-2, comps, warmup_steps=5)

  @jit
  def step(params, opt_state, state):
    (loss, state), grads, error_map = tracker.value_and_grad(
      case.train_loss, has_aux=True
    )(params, state, *case.batch)
    updates, opt_state = tx.update(grads, opt_state, params, error_map=error_map)
    return optax.apply_updates(params, updates), opt_state, state, loss, error_map

  params, opt_state, state = case.params, tx.init(case.params), case.state
  losses = []
  for _ in range(6):  # The 6th call's loss is the loss after 5 updates.
    params, opt_state, state, loss, error_map = step(params, opt_state, state)
    losses.append(float(loss))
    assert sorted(error_map) == sorted(case.names)
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in error_map.values())
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.9 * losses[0], losses


def test_norm_product_matches_per_example_reference(case):
  """Loss, gradients and error map against the independent reference; with
  gradient checkpointing, against the plain model's (same parameters)."""
  tracker = _tracker(case)
  tracker.components(case.params, *case.inputs)
  loss, grads, error_map = jit(tracker.value_and_grad(case.loss))(
    case.params, *case.batch
  )
  assert_matches(loss, grads, error_map, _reference(case))


def test_detaching_each_component_equals_stop_gradient(case):
  """Each component detached alone (a runtime set: one compiled program)
  against `jax.grad` of the loss with that module's output (the added part
  of a tuple) behind `stop_gradient`, by an interceptor of the test's own."""
  tracker = _tracker(case)
  comps = tracker.components(case.params, *case.inputs)
  step = jit(
    lambda p, flags: tracker.value_and_grad(case.loss, detach=flags)(p, *case.batch)[1]
  )
  reference = linen_detached_grads(case.loss, comps.names, case.parts)
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
