"""The tracker on Flax NNX decoder LLMs from google-tunix: Llama 3, Gemma 2, Qwen 3.

Tiny random-init models with `select="branches"`: each decoder layer's two
residual branches, found from the dataflow (tunix's `Attention` is not
flax's class). Llama 3 and Qwen 3: grouped-query attention, RMSNorm
pre-norms, SwiGLU MLP, RoPE; Qwen 3 adds RMSNorms on the queries and keys
and ties its embeddings. Gemma 2: grouped-query attention with soft-capped
logits, a sliding window on layer 0, pre- and post-norms around both
branches, tied embeddings and soft-capped output logits. Llama 3 also
under tunix's own remat settings (`nnx.remat` around each attention/MLP
block, or around each decoder layer), which the other two apply the same
way. tunix 0.1.7's models loop over a list of layers: none of them stacks
its layers with `nnx.scan` (nor `jax.lax.scan`), so there is no scanned
layout to test here (tests/rgft_jax/test_lifted.py and the LM decoder in
tests/rgft_jax/compat/test_compat_heads.py cover scans).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

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
from _compat_reference import nnx_detached_grads
from _compat_reference import nnx_reference
from flax import nnx

import rgft_jax

if sys.version_info < (3, 11):  # google-tunix needs Python 3.11 (see pyproject).
  pytest.skip("google-tunix requires Python >= 3.11", allow_module_level=True)

# Importing tunix turns flax's `always_shard_variable` off for the whole process
# and gives the root logger a handler; keep both to the tests below.
_shard_flag = flax.config.flax_always_shard_variable
_root_handlers = logging.getLogger().handlers[:]
from tunix.models.gemma import model as gemma  # noqa: E402
from tunix.models.llama3 import model as llama  # noqa: E402

with warnings.catch_warnings():  # tunix's Qwen 3 imports the old shard_map.
  warnings.filterwarnings(
    "ignore", "jax.experimental.shard_map is deprecated", DeprecationWarning
  )
  from tunix.models.qwen3 import model as qwen3

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


@dataclasses.dataclass(frozen=True)
class Case:
  """A tunix model: how to build it and what its components must be.

  `build(config, rngs)` makes the model; `config` has a `remat_config` field
  taking a member of `remat` (the model module's `RematConfig`). `rules`
  give the owner of each parameter leaf (`(regex, component)`, the first
  match wins; no match: in no component).
  """

  build: Callable[..., nnx.Module]
  config: Any
  remat: Any
  names: tuple[str, ...]
  rules: tuple[tuple[str, str], ...]
  unassigned: tuple[str, ...]


def _pre_norm(attn: tuple[str, ...], mlp: tuple[str, ...]) -> dict[str, Any]:
  """Names and rules of pre-norm layers whose branches are measured at the
  first module of `attn` and `mlp`, each owning the modules listed."""
  return dict(
    names=tuple(f"layers/{i}/{m}" for i in range(LAYERS) for m in (attn[0], mlp[0])),
    rules=tuple(
      (rf"layers/(\d+)/({'|'.join(modules)})/.*", rf"layers/\1/{modules[0]}")
      for modules in (attn, mlp)
    ),
  )


# Every model: 2 layers of width 32, 4 query heads of 8 sharing 2 key/value heads.
_SIZES = dict(
  num_layers=LAYERS,
  embed_dim=32,
  hidden_dim=64,
  num_heads=4,
  head_dim=8,
  num_kv_heads=2,
)
CASES = {
  "llama3": Case(
    build=llama.Llama3,
    config=llama.ModelConfig(
      **_SIZES, vocab_size=VOCAB, rope_theta=10_000, norm_eps=1e-6
    ),
    remat=llama.RematConfig,
    **_pre_norm(("attn", "input_layernorm"), ("mlp", "post_attention_layernorm")),
    unassigned=("embedder/", "final_norm/", "lm_head/"),
  ),
  # Post-norms: the value added is `post_attn_norm`'s (`post_ffw_norm`'s), a
  # module with parameters, after which the branch is named; it owns the
  # pre-norm, the attention (MLP) and the post-norm.
  "gemma2": Case(
    build=gemma.Gemma,
    config=gemma.ModelConfig(
      **_SIZES,
      num_embed=VOCAB,
      final_logit_softcap=30.0,
      use_post_attn_norm=True,
      use_post_ffw_norm=True,
      attention_types=(gemma.AttentionType.LOCAL_SLIDING, gemma.AttentionType.GLOBAL),
      attn_logits_soft_cap=50.0,
      sliding_window_size=4,
    ),
    remat=gemma.RematConfig,
    **_pre_norm(
      ("post_attn_norm", "pre_attention_norm", "attn"),
      ("post_ffw_norm", "pre_ffw_norm", "mlp"),
    ),
    unassigned=("embedder/", "final_norm/"),
  ),
  "qwen3": Case(
    build=qwen3.Qwen3,
    config=qwen3.ModelConfig(
      **_SIZES,
      vocab_size=VOCAB,
      rope_theta=10_000,
      norm_eps=1e-6,
      use_tied_embedding=True,
    ),
    remat=qwen3.RematConfig,
    # The attention's query and key norms are its own.
    **_pre_norm(("attn", "input_layernorm"), ("mlp", "post_attention_layernorm")),
    unassigned=("embedder/", "final_norm/"),
  ),
}
MODELS = list(CASES)
# The tests/rgft_jax/compat/test_compat_heads.py names, for Llama 3.
CONFIG = CASES["llama3"].config
NAMES = CASES["llama3"].names
select = "branches"


@pytest.fixture(autouse=True)
def _tunix_flags():
  """tunix's modules are built for `always_shard_variable` off (no mesh)."""
  with flax.config.temp_flip_flag("always_shard_variable", False):
    yield


@functools.cache
def _state(name: str) -> nnx.State:
  """The random-init model's state (built once, under jit: faster than eager)."""
  case = CASES[name]

  @jit
  def build():
    model = case.build(case.config, rngs=nnx.Rngs(0))
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


def _model(name: str = "llama3", remat: str = "NONE") -> nnx.Module:
  """A fresh model with `_state(name)`'s values, under tunix's `remat` setting."""
  case = CASES[name]
  config = dataclasses.replace(case.config, remat_config=case.remat[remat])
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: case.build(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, _state(name), copy=True)


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
def _reference(name: str) -> Reference:
  return nnx_reference(loss_fn, _model(name), _batch(), CASES[name].names)


def _tracker(model) -> tuple[rgft_jax.ErrorTracker, rgft_jax.Components]:
  tracker = rgft_jax.ErrorTracker(model, select=select)
  return tracker, tracker.components(nnx.state(model, nnx.Param), *_inputs())


@pytest.mark.parametrize("name", MODELS)
def test_components(name):
  model = _model(name)
  _, comps = _tracker(model)
  case = CASES[name]
  params = nnx.state(model, nnx.Param)
  assert_ownership(comps, params, case.names, case.rules, case.unassigned)
  assert comps.shared == ()


@pytest.mark.parametrize("name", MODELS)
def test_rgft_steps_lower_the_loss(name):
  model = _model(name)
  tracker, comps = _tracker(model)
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
    assert sorted(error_map) == sorted(CASES[name].names)
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in error_map.values())
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize(
  ("name", "remat"),
  # Every model's remat wraps the same methods the same way: Llama 3 stands
  # for them (CI time).
  [("llama3", r) for r in ("NONE", "BLOCK", "DECODER")]
  + [(name, "NONE") for name in MODELS if name != "llama3"],
  ids=lambda v: v.lower(),
)
def test_norm_product_matches_per_example_reference(name, remat):
  """With remat, the same parameters give what the plain model's reference does."""
  model = _model(name, remat)
  tracker, comps = _tracker(model)
  assert comps.names == CASES[name].names

  graphdef, state = nnx.split(model)

  @jit  # Functional NNX under jax.jit (the training test uses nnx.jit).
  def measure(state, batch):
    return tracker.value_and_grad(loss_fn)(nnx.merge(graphdef, state), *batch)

  loss, grads, error_map = measure(state, _batch())
  assert_matches(loss, grads, error_map, _reference(name))


@pytest.mark.parametrize("name", MODELS)
def test_detaching_each_component_equals_stop_gradient(name):
  """Each component detached alone (a runtime set: one compiled program)
  against `jax.grad` of the loss with that submodule's output behind
  `stop_gradient`, by a wrapper of the test's own swapped in for it."""
  model = _model(name)
  tracker, comps = _tracker(model)
  names = CASES[name].names
  assert comps.names == names
  graphdef, state = nnx.split(model)

  @jit
  def step(state, flags, batch):
    live = nnx.merge(graphdef, state)
    return tracker.value_and_grad(loss_fn, detach=flags)(live, *batch)[1]

  reference = nnx_detached_grads(loss_fn, model, names)
  for i in range(len(names)):
    flags = jnp.zeros(len(names), bool).at[i].set(True)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      step(state, flags, _batch()),
      reference(nnx.state(model, nnx.Param), flags, *_batch()),
    )
