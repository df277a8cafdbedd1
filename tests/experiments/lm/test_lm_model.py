import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _lm_reference import reference_logits
from flax import nnx

from experiments.lm import model as lm

TINY = lm.Config(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=16)


def perturbed(cfg: lm.Config, seed: int = 0) -> lm.Transformer:
  """A model of `cfg` whose every parameter (norm scales, biases too) is random.

  Built abstractly and filled from NumPy: no initialiser runs, so it is fast.
  """
  model = nnx.eval_shape(lambda: lm.Transformer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  rng = np.random.default_rng(seed)

  def draw(path, x):
    module, name = (p.key for p in path[-2:])
    fan_in = cfg.d_ff if module == "down_proj" else cfg.d_model
    scale = {"scale": 0.2, "bias": 0.2, "embedding": 1.0}.get(name, fan_in**-0.5)
    value = rng.normal(0.0, scale, x.shape) + (name == "scale")
    return jnp.asarray(value, jnp.float32)

  params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


@nnx.jit
def forward(model, toks, positions=None):
  return model(toks, positions)


jitted_loss = nnx.jit(lm.loss)


def params_of(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, 256, dtype=jnp.int32)


@pytest.mark.parametrize(
  "changes",
  [{}, {"n_kv_heads": 4, "mlp": "gelu"}],
  ids=["gqa-swiglu", "mha-gelu"],
)
def test_logits_match_a_float64_reference(changes):
  cfg = dataclasses.replace(TINY, scan_layers=False, **changes)
  model = perturbed(cfg)
  toks = tokens((2, 16))
  want = reference_logits(cfg, params_of(model), np.asarray(toks))
  got = forward(model, toks)
  assert got.dtype == jnp.float32 and got.shape == (2, 16, 256)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def initialized():
  """A freshly initialised scanned TINY model (initialisers are slow to compile)."""
  return lm.Transformer(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def looped():
  return perturbed(dataclasses.replace(TINY, scan_layers=False))


@pytest.mark.slow
def test_parameter_layout_has_explicit_head_axes(initialized):
  scanned = params_of(initialized)["layers"]
  d, n, k, h, f = 32, 4, 2, 8, 48
  assert scanned["attn"]["q_proj"]["kernel"].shape == (2, d, n, h)
  assert scanned["attn"]["k_proj"]["kernel"].shape == (2, d, k, h)
  assert scanned["attn"]["v_proj"]["kernel"].shape == (2, d, k, h)
  assert scanned["attn"]["o_proj"]["kernel"].shape == (2, n, h, d)
  assert scanned["mlp"]["gate_proj"]["kernel"].shape == (2, d, f)
  assert scanned["mlp"]["down_proj"]["kernel"].shape == (2, f, d)
  assert scanned["attn_norm"]["scale"].shape == (2, d)
  # Independently initialised layers.
  q = scanned["attn"]["q_proj"]["kernel"]
  assert not np.allclose(q[0], q[1])
  looped = perturbed(dataclasses.replace(TINY, scan_layers=False))
  assert isinstance(looped.layers, nnx.List) and len(looped.layers) == 2
  assert looped.layers[1].attn.o_proj.kernel.shape == (n, h, d)


def test_stack_and_unstack_layers_are_inverse(looped):
  params = params_of(looped)
  stacked = lm.stack_layers(params)
  q = stacked["layers"]["attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(q[1], params["layers"][1]["attn"]["q_proj"]["kernel"])
  back = lm.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert sorted(back["layers"]) == [0, 1]


@nnx.jit
def grads_and_logits(model, toks):
  def loss_fn(model):
    return lm.loss(model, toks)[0]

  return nnx.to_pure_dict(nnx.grad(loss_fn)(model)), model(toks[:, :-1])


@pytest.fixture(scope="module")
def looped_grads_and_logits(looped):
  return grads_and_logits(looped, tokens((3, 17)))


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_model_matches_looped_model(looped, looped_grads_and_logits, remat):
  scanned = lm.with_layout(looped, scan_layers=True, remat=remat)
  assert scanned.cfg.scan_layers and scanned.cfg.remat == remat
  want_grads, want_logits = looped_grads_and_logits
  grads, logits = grads_and_logits(scanned, tokens((3, 17)))
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  grads = lm.unstack_layers(grads)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  # The round trip gives the looped weights back.
  again = lm.with_layout(scanned, scan_layers=False)
  jax.tree.map(np.testing.assert_array_equal, params_of(again), params_of(looped))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_changing_a_token_changes_only_later_logits(scan_layers):
  model = perturbed(dataclasses.replace(TINY, scan_layers=scan_layers))
  toks = tokens((2, 16))
  j = 9
  changed = toks.at[:, j].set((toks[:, j] + 1) % 256)
  before, after = forward(model, toks), forward(model, changed)
  np.testing.assert_array_equal(before[:, :j], after[:, :j])
  assert np.all(np.abs(before[:, j:] - after[:, j:]).max(-1) > 1e-4)


def test_gqa_equals_mha_with_repeated_key_value_heads():
  gqa = perturbed(dataclasses.replace(TINY, n_kv_heads=2))
  mha_cfg = dataclasses.replace(TINY, n_kv_heads=4)
  mha = perturbed(mha_cfg, seed=5)
  state = nnx.state(mha)
  params = params_of(gqa)
  for name in ("k_proj", "v_proj"):
    kernel = params["layers"]["attn"][name]["kernel"]  # [L, D, K, H]
    params["layers"]["attn"][name]["kernel"] = np.repeat(kernel, 2, axis=2)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(mha, state)
  toks = tokens((2, 16))
  np.testing.assert_allclose(
    forward(mha, toks), forward(gqa, toks), rtol=1e-5, atol=1e-5
  )


def test_rope_scores_depend_on_relative_position_only():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))

  def score(m, n):
    rq = lm.apply_rope(q, jnp.full((1, 1), m), 10_000.0)
    rk = lm.apply_rope(k, jnp.full((1, 1), n), 10_000.0)
    return float(jnp.sum(rq * rk))

  for m, n in [(0, 0), (5, 2), (3, 11), (40, 7)]:
    for shift in (1, 17, 100):
      assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
  assert abs(score(5, 2) - score(5, 3)) > 1e-3
  np.testing.assert_allclose(lm.apply_rope(q, jnp.zeros((1, 1), jnp.int32), 1e4), q)
  rotated = lm.apply_rope(q, jnp.full((1, 1), 33), 1e4)
  np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-6)


def test_model_sees_relative_positions_only():
  model = perturbed(TINY)
  toks = tokens((2, 16))
  positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32)[None, :], (2, 16))
  base = forward(model, toks)
  np.testing.assert_allclose(forward(model, toks, positions), base, rtol=0, atol=0)
  np.testing.assert_allclose(
    forward(model, toks, positions + 37), base, rtol=1e-4, atol=1e-4
  )
  assert np.abs(forward(model, toks, positions * 2) - base).max() > 1e-3


def test_loss_is_next_token_cross_entropy():
  model = perturbed(TINY)
  toks = tokens((2, 17))
  mean, aux = jitted_loss(model, toks)
  logits = np.asarray(forward(model, toks[:, :-1]), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.asarray(toks[:, 1:])
  nats = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(aux["per_example"], nats.mean(1), rtol=1e-5)
  np.testing.assert_allclose(mean, nats.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["bits_per_byte"], nats.mean() / math.log(2), rtol=1e-5)


def test_uniform_predictions_cost_eight_bits_per_byte():
  model = perturbed(TINY)
  model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])
  model.lm_head.bias[...] = jnp.zeros_like(model.lm_head.bias[...])
  mean, aux = jitted_loss(model, tokens((2, 17)))
  np.testing.assert_allclose(mean, math.log(256), rtol=1e-6)
  np.testing.assert_allclose(aux["bits_per_byte"], 8.0, rtol=1e-6)


@pytest.mark.slow
def test_adam_steps_fit_a_batch(initialized):
  model = lm.with_layout(initialized, scan_layers=True, remat=True)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  toks = tokens((4, 17))

  @nnx.jit
  def step(model, optimizer, toks):
    (loss, _), grads = nnx.value_and_grad(lm.loss, has_aux=True)(model, toks)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, toks)) for _ in range(20)]
  assert losses[0] > 5.0 and losses[-1] < 0.5 * losses[0]


def test_bfloat16_computation_gives_float32_logits():
  f32 = perturbed(TINY)
  bf16_cfg = dataclasses.replace(TINY, dtype="bfloat16")
  bf16 = nnx.eval_shape(lambda: lm.Transformer(bf16_cfg, rngs=nnx.Rngs(0)))
  nnx.update(bf16, nnx.state(f32))
  assert bf16.layers.attn.q_proj.kernel.dtype == jnp.float32
  toks = tokens((2, 16))
  got, want = forward(bf16, toks), forward(f32, toks)
  assert got.dtype == jnp.float32
  assert 0 < np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_too_long_input_raises():
  with pytest.raises(ValueError, match="max_len"):
    perturbed(TINY)(tokens((1, 17)))


@pytest.mark.parametrize(
  "changes, match",
  [
    ({"n_heads": 3}, "multiple of n_heads"),
    ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"d_model": 24, "n_heads": 8, "n_kv_heads": 8}, "even head_dim"),
    ({"mlp": "relu"}, "mlp"),
    ({"n_layers": 0}, "n_layers"),
    ({"scan_layers": False, "remat": True}, "remat"),
  ],
)
def test_config_rejects_bad_values(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TINY, **changes)
