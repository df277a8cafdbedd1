# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Compute savings: soft and sparse RGFT against full fine-tuning
#
# Soft RGFT scales each component's update by its multiplier; every gradient
# is still computed, so it costs what full fine-tuning costs. Sparse RGFT
# (`rgft_jax.Freezer`) takes components whose multiplier has stayed low out of
# differentiation, in separately compiled step variants, and brings them back
# at refresh steps. This notebook measures both on the label-shift task with
# the study's harness (XLA-counted FLOPs), then shows what freezing can save at
# most, per frozen variant, from compiling alone.
#
# `QUICK=1` runs it on tiny settings (what CI does).

# %%
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

ROOT = pathlib.Path.cwd()
if not (ROOT / "experiments").exists():  # Started from notebooks/.
  ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))

import rgft_jax  # noqa: E402
from experiments import finetune  # noqa: E402
from experiments.methods import STEM  # noqa: E402
from experiments.vit import VisionTransformer  # noqa: E402

QUICK = os.environ.get("QUICK") == "1"
WORKDIR = os.environ.get("WORKDIR", str(ROOT / "workdir" / "savings"))

# %% [markdown]
# ## Side by side on label shift

# %%
cfg = finetune.Config(
  tasks="label_shift",
  methods="full,rgft_sparse"
  if QUICK
  else "full,rgft_blocks,rgft_sparse,rgft_sparse_prefix",
  seeds=1 if QUICK else 3,
  steps=20 if QUICK else 200,
  pretrain_steps=20 if QUICK else 400,
  freeze_patience=2 if QUICK else 20,
  refresh_every=10 if QUICK else 50,
  workdir=WORKDIR,
  progress=False,
)
results = finetune.study(cfg)
print(finetune.markdown(results))

# %%
summary = results["tasks"]["label_shift"]["summary"]
fig, ax = plt.subplots(figsize=(6, 4))
for name, s in summary.items():
  ax.errorbar(
    s["flops_vs_full"], s["accuracy_mean"], yerr=s["accuracy_std"], fmt="o", label=name
  )
ax.set_xlabel("training FLOPs / full fine-tuning")
ax.set_ylabel("test accuracy")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Which components the sparse runs froze, and for how many steps:

# %%
for run in results["tasks"]["label_shift"]["runs"]:
  if run["method"].startswith("rgft_sparse") and run["seed"] == 0:
    print(run["method"], "steps per variant:", run["steps_per_variant"])

# %% [markdown]
# ## The most freezing can save, per variant
#
# One train step of the same ViT with a bottom prefix of blocks (and the patch
# embedding, the "stem") frozen, or with blocks frozen from the top, FLOPs as
# XLA counts the compiled step.

# %%
model = VisionTransformer(num_classes=5, patch=7, size="xs")
x = jax.ShapeDtypeStruct((64, 28, 28, 1), jnp.float32)
y = jax.ShapeDtypeStruct((64,), jnp.int32)
params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
tracker = rgft_jax.ErrorTracker(model)
comps = tracker.components(params, x)
tx = rgft_jax.rgft(1e-3, comps)
freezer = rgft_jax.Freezer(comps, policy="prefix", stem=STEM)


def loss_fn(p, x, y):
  logits = model.apply({"params": p}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


step = freezer.train_step(tracker, tx, loss_fn)
state = jax.eval_shape(tx.init, params)


def step_flops(frozen):
  compiled = (
    jax.jit(lambda *a: step(*a, frozen=frozen)).lower(params, state, x, y).compile()
  )
  analysis = compiled.cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


full = step_flops(frozenset())
depth = len(comps) // 2
for k in (1, depth) if QUICK else range(1, depth + 1):
  bottom = frozenset(comps.names[: 2 * k])
  top = frozenset(comps.names[len(comps) - 2 * k :])
  print(
    f"{k} of {depth} blocks frozen: bottom + stem {step_flops(bottom) / full:.3f}, "
    f"top {step_flops(top) / full:.3f} of the full step"
  )
