"""The baselines and RGFT variants, each against an independent computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgft_jax
from experiments import adapters
from experiments import error_maps
from experiments import loop
from experiments import masks
from experiments import methods as methods_lib
from experiments import registry
from experiments import steps as steps_lib
from experiments.trees import flat
from experiments.trees import unflat
from experiments.vit import SIZES
from experiments.vit import MlpBlock
from experiments.vit import VisionTransformer

CLASSES, IMAGE, PATCH = 3, 16, 4


def _setup(seed=0):
  """The mu ViT with every parameter drawn from N(0, 0.1) (no ties), a batch."""
  model = VisionTransformer(num_classes=CLASSES, patch=PATCH, size="mu")
  x = jnp.zeros((2, IMAGE, IMAGE, 3))
  params = flat(model.init(jax.random.key(0), x)["params"])
  keys = jax.random.split(jax.random.key(seed + 1), len(params))
  params = unflat(
    {
      p: 0.1 * jax.random.normal(k, v.shape)
      for (p, v), k in zip(params.items(), keys, strict=True)
    }
  )
  rng = np.random.default_rng(seed)
  batch = {
    "image": jnp.asarray(rng.normal(size=(4, IMAGE, IMAGE, 3)), jnp.float32),
    "label": jnp.asarray(rng.integers(0, CLASSES, size=4), jnp.int32),
  }
  return model, params, x, batch


LR = 1e-3


def _train(model, method, batch, steps=3, seed=0):
  """`steps` steps of `method` on `batch` from its start at rate `LR` and
  `seed`; the final parameters and state."""
  del model
  step = jax.jit(method.make_step(frozenset()))
  params, state = method.init(LR, seed)
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  return params, state


def _bits(x):
  return np.asarray(x).view(np.uint32)


def _in_blocks(params):
  """Entries RGFT's block branches own, by hand: every encoder block parameter."""
  return {
    p: np.full(np.shape(v), "encoderblock_" in p) for p, v in flat(params).items()
  }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random_sparse", "magnitude_sparse"])
def test_masked_entries_and_their_adam_state_are_held_bit_for_bit(name):
  model, params, x, batch = _setup()
  # Negative zeros among the held entries: `p + 0.0` would turn them positive.
  params = jax.tree.map(lambda v: jnp.where(jnp.abs(v) < 0.02, -0.0, v), params)
  hyper = methods_lib.Hyper(sparse_fraction=0.5)
  method = methods_lib.make(name, model, params, x, hyper)
  final, state = _train(model, method, batch, seed=3)
  held = flat(masks.held_entries(state))
  before, after = flat(params), flat(final)
  mu, nu = flat(optax.tree.get(state, "mu")), flat(optax.tree.get(state, "nu"))
  assert any(
    np.any(m & np.signbit(before[p]) & (before[p] == 0)) for p, m in held.items()
  )
  moved = 0
  for p, m in held.items():
    np.testing.assert_array_equal(_bits(after[p])[m], _bits(before[p])[m])
    assert not np.any(np.asarray(mu[p])[m]) and not np.any(np.asarray(nu[p])[m])
    moved += int(np.sum(np.asarray(after[p]) != np.asarray(before[p])))
  in_blocks = _in_blocks(params)
  size = sum(int(v.sum()) for v in in_blocks.values())
  total = sum(v.size for v in in_blocks.values())
  assert sum(int(m.sum()) for m in held.values()) == size - round(0.5 * size)
  trained = methods_lib.trainable_count(method, final, state)
  assert trained == round(0.5 * size) + total - size
  assert moved > 0.9 * trained  # The rest train.
  for p, m in held.items():  # Nothing outside the blocks is held.
    assert not np.any(m & ~in_blocks[p])


def test_the_magnitude_mask_is_numpy_s_top_k():
  model, params, x, _ = _setup()
  comps = rgft_jax.ErrorTracker(model, select="branches").components(params, x)
  held = flat(masks.magnitude_mask(comps, params, 0.3))
  in_blocks = _in_blocks(params)
  values = np.concatenate(
    [np.abs(np.asarray(v))[in_blocks[p]] for p, v in flat(params).items()]
  )
  k = round(0.3 * values.size)
  threshold = np.sort(values)[-k]  # The k-th largest (no ties: normal draws).
  for p, v in flat(params).items():
    expected = in_blocks[p] & (np.abs(np.asarray(v)) < threshold)
    np.testing.assert_array_equal(held[p], expected)


def test_random_masks_train_the_same_count_and_differ_by_seed():
  model, params, x, _ = _setup()
  comps = rgft_jax.ErrorTracker(model, select="branches").components(params, x)
  a, b, a2 = (masks.random_mask(comps, params, 0.4, s) for s in (0, 1, 0))
  size = sum(int(v.sum()) for v in _in_blocks(params).values())
  for mask in (a, b):
    assert sum(int(m.sum()) for m in jax.tree.leaves(mask)) == size - round(0.4 * size)
  same = jax.tree.leaves(jax.tree.map(np.array_equal, a, a2))
  assert all(same)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def _by_hand(params, ads, images):
  """The mu ViT written out with flax layers, adapters after each branch."""
  s = SIZES["mu"]
  p, t = params, params["Transformer"]

  def adapted(h, a):
    z = h @ a["down"] + a["down_bias"][None, None]
    z = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    return h + z @ a["up"] + a["up_bias"][None, None]

  x = nn.Conv(s.width, (PATCH, PATCH), strides=PATCH, padding="VALID").apply(
    {"params": p["embedding"]}, images
  )
  b, h, w, c = x.shape
  x = x.reshape(b, h * w, c)
  x = jnp.concatenate([jnp.tile(p["cls"], (b, 1, 1)), x], axis=1)
  x = x + t["posembed_input"]["pos_embedding"]
  for i in range(s.depth):
    block, name = t[f"encoderblock_{i}"], f"Transformer.encoderblock_{i}"
    y = nn.LayerNorm().apply({"params": block["LayerNorm_0"]}, x)
    y = nn.MultiHeadDotProductAttention(num_heads=s.heads).apply(
      {"params": block["MultiHeadDotProductAttention_1"]}, y, y
    )
    x = x + adapted(y, ads[f"{name}.MultiHeadDotProductAttention_1"])
    y = nn.LayerNorm().apply({"params": block["LayerNorm_2"]}, x)
    y = MlpBlock(s.mlp_dim).apply({"params": block["MlpBlock_3"]}, y)
    x = x + adapted(y, ads[f"{name}.MlpBlock_3"])
  x = nn.LayerNorm().apply({"params": t["encoder_norm"]}, x)
  return x[:, 0] @ p["head"]["kernel"] + p["head"]["bias"][None]


@pytest.mark.slow
def test_adapters_are_residual_bottlenecks_after_each_branch():
  model, params, x, batch = _setup()
  method = methods_lib.make("adapters", model, params, x, methods_lib.Hyper())
  tree, _ = method.init(LR, 5)
  ads = tree["adapters"]
  assert len(ads) == 2 * SIZES["mu"].depth
  # Zero up-projections: the adapted model is the pretrained one, exactly.
  plain = model.apply({"params": params}, batch["image"])
  np.testing.assert_array_equal(adapters.forward(model, tree, batch["image"]), plain)
  # Random adapters: the hand-written residual bottleneck after every branch.
  keys = iter(jax.random.split(jax.random.key(7), 4 * len(ads)))
  ads = jax.tree.map(lambda v: 0.3 * jax.random.normal(next(keys), v.shape), ads)
  tree = {"base": params, "adapters": ads}
  np.testing.assert_allclose(
    adapters.forward(model, tree, batch["image"]),
    _by_hand(params, ads, batch["image"]),
    rtol=1e-5,
    atol=1e-5,
  )


def test_adapters_train_only_the_adapters_and_the_head():
  model, params, x, batch = _setup()
  hyper = methods_lib.Hyper(adapter_width=3)
  method = methods_lib.make("adapters", model, params, x, hyper)
  final, state = _train(model, method, batch, seed=5)
  before, after = flat(method.init(LR, 5)[0]), flat(final)
  for p in before:
    changed = not np.array_equal(before[p], after[p])
    assert changed == (p.startswith("adapters/") or p.startswith("base/head/")), p
  w, d = SIZES["mu"].width, SIZES["mu"].depth
  head = w * CLASSES + CLASSES
  want = 2 * d * (2 * w * 3 + 3 + w) + head
  assert methods_lib.trainable_count(method, final, state) == want


@pytest.mark.slow
def test_the_random_error_map_is_a_seeded_uniform_draw_not_the_tracker_s():
  model, params, x, batch = _setup()
  hyper = methods_lib.Hyper()
  method = methods_lib.make("rgft_random", model, params, x, hyper)
  n = len(method.components)
  _, state = _train(model, method, batch, steps=1, seed=4)
  ema = rgft_jax.residual_error_state(state).ema  # ema_1 = the first map.
  drawn = jax.random.uniform(jax.random.fold_in(jax.random.key(4), 0), (n,))
  np.testing.assert_array_equal(ema, drawn)
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  tracker.components(params, x)
  loss_fn = steps_lib.method_loss(model)
  _, _, real = tracker.value_and_grad(loss_fn, has_aux=True)(params, batch)
  real = np.array([real[c] for c in method.components.names])
  assert np.all(real > 0) and not np.allclose(real / real.max(), ema / ema.max())
  # Another seed draws another map; the next step draws afresh.
  _, other_state = _train(model, method, batch, steps=1, seed=5)
  assert not np.array_equal(rgft_jax.residual_error_state(other_state).ema, ema)
  draw = error_maps.RandomErrorMap(method.components.names).draw
  second = np.array(list(draw(state).values()))
  assert not np.array_equal(second, drawn) and np.all((second >= 0) & (second < 1))


@pytest.mark.slow
def test_the_shuffled_error_map_is_the_measured_map_permuted():
  model, params, x, batch = _setup()
  hyper = methods_lib.Hyper(error_method="shuffled")
  method = methods_lib.make("rgft_blocks", model, params, x, hyper)
  names = method.components.names
  _, state = _train(model, method, batch, steps=1, seed=3)
  ema = np.asarray(rgft_jax.residual_error_state(state).ema)  # The first map.
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  tracker.components(params, x)
  loss_fn = steps_lib.method_loss(model)
  _, _, real = tracker.value_and_grad(loss_fn, has_aux=True)(params, batch)
  real = np.array([real[c] for c in names])
  perm = np.asarray(jax.random.permutation(jax.random.key(3), len(names)))
  assert not np.array_equal(perm, np.arange(len(names)))
  np.testing.assert_allclose(ema, real[perm], rtol=1e-5)
  # The same permutation every step: the EMA stays the measured EMA permuted.
  _, state = _train(model, method, batch, steps=3, seed=3)
  measure = error_maps.ShuffledErrorMap(error_maps.Tracked(tracker), names)
  _, _, again = measure.tracked(loss_fn, params, None, batch)
  shuffled = measure.shuffle(again, state)
  np.testing.assert_array_equal(
    [shuffled[n] for n in names], np.array([again[n] for n in names])[perm]
  )


@pytest.mark.slow
def test_the_mix_measures_heads_in_attention_and_whole_mlps():
  model, params, x, batch = _setup()
  method = methods_lib.make("rgft_mix", model, params, x, methods_lib.Hyper())
  comps = method.components
  heads = rgft_jax.ErrorTracker(model, select="heads")
  branches = rgft_jax.ErrorTracker(model, select="branches")
  head_names = heads.components(params, x).names
  mlps = [n for n in branches.components(params, x).names if "MlpBlock" in n]
  s = SIZES["mu"]
  expected = []
  for i in range(s.depth):
    expected += [n for n in head_names if f"encoderblock_{i}/" in n] + [mlps[i]]
  assert comps.names == tuple(expected)
  index = flat(comps.index)
  attention = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
  query = np.broadcast_to(index[f"{attention}/query/kernel"], (s.width, s.heads, 1))
  assert [comps.names[j] for j in query[0, :, 0]] == [
    f"{attention}/head{h}" for h in range(s.heads)
  ]
  dense = index["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]
  assert comps.names[int(dense)] == mlps[0]
  assert int(index["Transformer/encoderblock_0/LayerNorm_0/scale"]) == -1
  # Heads' values from the heads tracker, the MLPs' from the branches tracker:
  # the first step's map (the EMA after one step) is the measured one.
  loss_fn = steps_lib.method_loss(model)
  final, state = _train(model, method, batch, steps=1)
  ema = np.asarray(rgft_jax.residual_error_state(state).ema)
  got = dict(zip(comps.names, ema, strict=True))
  _, _, by_head = heads.value_and_grad(loss_fn, has_aux=True)(params, batch)
  _, _, by_branch = branches.value_and_grad(loss_fn, has_aux=True)(params, batch)
  for name in comps.names:
    want = by_head[name] if name in by_head else by_branch[name]
    np.testing.assert_allclose(got[name], want, rtol=1e-6)
  query = f"{attention}/query/kernel"
  assert not np.array_equal(flat(final)[query], flat(params)[query])


@pytest.mark.slow
def test_exact_ablation_feeds_rgft_its_absolute_value():
  model, params, x, batch = _setup()
  tracker = rgft_jax.ErrorTracker(model, select="branches", method="ablation")
  tracker.components(params, x)
  loss_fn = steps_lib.method_loss(model)
  _, _, signed = tracker.value_and_grad(loss_fn, has_aux=True)(params, batch)
  _, _, fed = error_maps.Tracked(tracker, absolute=True)(loss_fn, params, None, batch)
  for name, value in signed.items():
    np.testing.assert_array_equal(fed[name], np.abs(value))
  hyper = methods_lib.Hyper(error_method="ablation")
  method = methods_lib.make("rgft_blocks", model, params, x, hyper)
  _, state = _train(model, method, batch, steps=1)  # The EMA: the first map.
  ema = rgft_jax.residual_error_state(state).ema
  want = [np.abs(signed[n]) for n in method.components.names]
  assert any(signed[n] < 0 for n in signed)  # Some ablation helps: abs matters.
  # The same ablation in another program: loss differences differ in rounding.
  np.testing.assert_allclose(ema, want, rtol=1e-4, atol=1e-6)


def test_a_new_method_is_one_registry_entry(monkeypatch, tmp_path):
  """An entry the loop has never seen (norms only, plus the head) trains as is."""
  from experiments import train as train_lib

  def norms_only(s):
    trainable = s.head | {p for p in s.paths if "LayerNorm" in p or "norm" in p}
    return methods_lib.Method(
      s.name,
      lambda lr, seed: (s.params, optax.adam(lr).init(s.params)),
      lambda variant: steps_lib.dense_step(
        steps_lib.method_loss(s.model), optax.adam(LR), trainable, variant
      ),
      trainable=trainable,
    )

  methods = registry.METHODS
  monkeypatch.setitem(methods.catalogue, "norms_only", "the norms and the head")
  monkeypatch.setattr(  # Registered for this test only.
    methods, "_builders", {t: dict(b) for t, b in methods._builders.items()}
  )
  methods.register("norms_only", task="vit")(norms_only)
  assert methods.tasks_of("norms_only") == ("vit",)
  model, params, x, batch = _setup()
  method = methods_lib.make("norms_only", model, params, x, methods_lib.Hyper())
  test = [{**batch, "mask": jnp.ones(4)}]
  record, final = train_lib.run(
    model,
    method,
    [batch] * 2,
    lambda: test,
    steps=2,
    learning_rate=LR,
    seed=0,
    workdir=str(tmp_path),
    progress=False,
  )
  assert record["trainable_params"] == methods_lib.count(params, method.trainable)
  changed = {
    p for p in flat(params) if not np.array_equal(flat(params)[p], flat(final)[p])
  }
  assert changed == set(method.trainable)


@pytest.mark.slow
def test_masked_steps_compile_once_for_every_seed():
  """Per-seed masks and random seeds live in the optimizer state, not the step."""
  model, params, x, batch = _setup()
  # Threshold 1: every multiplier is ema_i / max_j ema_j, so seeds' maps show.
  hyper = methods_lib.Hyper(sparse_fraction=0.5, thresh_init=1.0, thresh_final=1.0)
  for name in ("random_sparse", "rgft_random"):
    method = methods_lib.make(name, model, params, x, hyper)
    variants = loop.variants_of(method)
    ran = []
    for seed in (0, 1):
      tree, state = method.init(LR, seed)
      ran.append(variants(frozenset(), tree, state, batch)[0])
    assert variants.compilations == 1
    # Seed 1 through the step compiled for seed 0 is seed 1's own step.
    own, _ = _train(model, methods_lib.make(name, model, params, x, hyper), batch, 1, 1)
    for u, v in zip(jax.tree.leaves(ran[1]), jax.tree.leaves(own), strict=True):
      np.testing.assert_array_equal(u, v)
    assert not all(
      np.array_equal(u, v)
      for u, v in zip(jax.tree.leaves(ran[0]), jax.tree.leaves(ran[1]), strict=True)
    )


def test_hold_entries_zeroes_what_it_holds():
  held = {"w": np.array([True, False, True])}
  tx = optax.chain(masks.hold_entries(held), optax.sgd(1.0))
  params = {"w": jnp.array([1.0, 2.0, 3.0])}
  updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"], [0.0, -1.0, 0.0])
  np.testing.assert_array_equal(masks.held_entries(state)["w"], held["w"])


def _adam_states(state):
  """The Adam states in an optimizer state, optax's or per entry."""
  kinds = (optax.ScaleByAdamState, rgft_jax.ScaleByAdamPerEntryState)
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
  return [type(x) for x in leaves if isinstance(x, kinds)]


@pytest.mark.slow
@pytest.mark.parametrize("count", ["per_entry"])
def test_every_method_s_adam_counts_as_the_flag_says(count):
  """`--adam_count` reaches the Adam of every method that needs no step costs
  (the budgeted ones build theirs with the same two helpers)."""
  model, params, x, _ = _setup()
  hyper = methods_lib.Hyper(adam_count=count)
  want = {
    "global": optax.ScaleByAdamState,
    "per_entry": rgft_jax.ScaleByAdamPerEntryState,
  }
  for name, entry in methods_lib.REGISTRY.items():
    if entry.budget == "required":
      continue
    method = methods_lib.make(name, model, params, x, hyper)
    kinds = _adam_states(method.init(LR, 0)[1])
    assert kinds and set(kinds) == {want[count]}, (name, kinds)


def test_one_compiled_step_serves_every_rate_and_seed():
  """The rate lives in the optimizer state: a step compiled at one rate
  runs another as Adam at that rate would (optax by hand)."""
  model, params, x, batch = _setup()
  method = methods_lib.make("full", model, params, x, methods_lib.Hyper())
  variants = loop.variants_of(method)
  variants(frozenset(), *method.init(LR, 0), batch)
  tree, state = method.init(3e-2, 1)
  got, _, _ = variants(frozenset(), tree, state, batch)
  assert variants.compilations == 1

  def loss(p):
    return steps_lib.loss_and_accuracy(model, p, batch)[0]

  adam = optax.adam(3e-2)
  updates, _ = adam.update(jax.grad(loss)(params), adam.init(params), params)
  want = optax.apply_updates(params, updates)
  # Another program (rounding of tiny gradients in Adam's first step); a step
  # at the rate the step was compiled with would be 0.029 off.
  for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
  assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(params)[0])
