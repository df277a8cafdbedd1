"""The tracker on a Flax NNX decoder LLM from google-tunix: Llama 3.

A tiny random-init `tunix.models.llama3.model.Llama3` (grouped-query attention,
RMSNorm pre-norms, SwiGLU MLP, RoPE) with `select="branches"`: each decoder
layer's `attn` and `mlp`, found from the dataflow (tunix's `Attention` is not
flax's class). Also under tunix's own remat settings (`nnx.remat` around each
attention/MLP block, or around each decoder layer).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys

import flax
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
from _compat_reference import nnx_reference
from flax import nnx

import rgft_jax

if sys.version_info < (3, 11):  # google-tunix needs Python 3.11 (see pyproject).
  pytest.skip("google-tunix requires Python >= 3.11", allow_module_level=True)

# Importing tunix turns flax's `always_shard_variable` off for the whole process
# and gives the root logger a handler; keep both to the tests below.
_shard_flag = flax.config.flax_always_shard_variable
_root_handlers = logging.getLogger().handlers[:]
from tunix.models.llama3 import model as llama  # noqa: E402

flax.config.update("flax_always_shard_variable", _shard_flag)
logging.getLogger().handlers[:] = _root_handlers

pytestmark = [
  pytest.mark.slow,  # Third-party models.
  # tunix 0.1.7 against flax 0.12 / jax 0.10: `Einsum` reads `.value`, `shard`
  # reads `pxla.thread_resources` (attributed to tunix), and its `nnx.Param(...,
  # sharding=...)` is reported from flax's variablelib.
  pytest.mark.filterwarnings("ignore::DeprecationWarning:tunix.*"),
  pytest.mark.filterwarnings(
    "ignore:'sharding' is deprecated, use 'out_sharding' instead:DeprecationWarning"
  ),
]

BATCH = 4
SEQ = 8
VOCAB = 50
LAYERS = 2
CONFIG = llama.ModelConfig(
  num_layers=LAYERS,
  vocab_size=VOCAB,
  embed_dim=32,
  hidden_dim=64,
  num_heads=4,
  head_dim=8,
  num_kv_heads=2,
  rope_theta=10_000,
  norm_eps=1e-6,
)
NAMES = tuple(f"layers/{i}/{m}" for i in range(LAYERS) for m in ("attn", "mlp"))
RULES = (
  (r"layers/(\d+)/(attn|input_layernorm)/.*", r"layers/\1/attn"),
  (r"layers/(\d+)/(mlp|post_attention_layernorm)/.*", r"layers/\1/mlp"),
)
UNASSIGNED = ("embedder/", "final_norm/", "lm_head/")
select = "branches"


@pytest.fixture(autouse=True)
def _tunix_flags():
  """tunix's modules are built for `always_shard_variable` off (no mesh)."""
  with flax.config.temp_flip_flag("always_shard_variable", False):
    yield


@functools.cache
def _state() -> nnx.State:
  """The random-init model's state (built once, under jit: faster than eager)."""

  @jit
  def build():
    model = llama.Llama3(CONFIG, rngs=nnx.Rngs(0))
    # tunix initialises the MLP kernels to zero, which leaves the MLPs dead
    # (no output, no gradient) in a random-init model; give them random values.
    key = jax.random.key(1)
    for layer in model.layers:
      for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
        key, sub = jax.random.split(key)
        shape = proj.kernel.shape
        proj.kernel[...] = jax.random.normal(sub, shape) / np.sqrt(shape[0])
    return nnx.state(model)

  return build()


def _model(remat=llama.RematConfig.NONE) -> nnx.Module:
  """A fresh model with `_state()`'s values, under tunix's `remat` setting."""
  config = dataclasses.replace(CONFIG, remat_config=remat)
  graphdef, _ = nnx.split(
    nnx.eval_shape(lambda: llama.Llama3(config, rngs=nnx.Rngs(0)))
  )
  return nnx.merge(graphdef, _state(), copy=True)


@functools.cache
def _batch():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((SEQ, SEQ), bool)), (BATCH, SEQ, SEQ))
  return tokens, positions, causal


def _inputs():
  tokens, positions, causal = _batch()
  return tokens, positions, None, causal  # No KV cache.


def loss_fn(model, tokens, positions, causal):
  logits, _ = model(tokens, positions, None, causal)
  labels = tokens[:, 1:]
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels).mean()


@functools.cache
def _reference() -> Reference:
  return nnx_reference(loss_fn, _model(), _batch(), NAMES)


def test_components():
  model = _model()
  params = nnx.state(model, nnx.Param)
  comps = rgft_jax.ErrorTracker(model, select=select).components(params, *_inputs())
  assert_ownership(comps, params, NAMES, RULES, UNASSIGNED)


def test_rgft_steps_lower_the_loss():
  model = _model()
  tracker = rgft_jax.ErrorTracker(model, select=select)
  comps = tracker.components(nnx.state(model, nnx.Param), *_inputs())
  optimizer = nnx.Optimizer(
    model, rgft_jax.rgft(1e-2, comps, warmup_steps=5), wrt=nnx.Param
  )

  @nnx.jit
  def step(model, optimizer, batch):
    loss, grads, error_map = tracker.value_and_grad(loss_fn)(model, *batch)
    optimizer.update(model, grads, error_map=error_map)
    return loss, error_map

  losses = []
  for _ in range(6):  # The 6th call's loss is the loss after 5 updates.
    loss, error_map = step(model, optimizer, _batch())
    losses.append(float(loss))
    assert sorted(error_map) == sorted(NAMES)
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in error_map.values())
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize(
  "remat",
  [llama.RematConfig.NONE, llama.RematConfig.BLOCK, llama.RematConfig.DECODER],
  ids=lambda r: r.name.lower(),
)
def test_norm_product_matches_per_example_reference(remat):
  """With remat, the same parameters give what the plain model's reference does."""
  model = _model(remat)
  tracker = rgft_jax.ErrorTracker(model, select=select)
  assert tracker.components(nnx.state(model, nnx.Param), *_inputs()).names == NAMES

  graphdef, state = nnx.split(model)

  @jit  # Functional NNX under jax.jit (the training test uses nnx.jit).
  def measure(state, batch):
    return tracker.value_and_grad(loss_fn)(nnx.merge(graphdef, state), *batch)

  loss, grads, error_map = measure(state, _batch())
  assert_matches(loss, grads, error_map, _reference())
