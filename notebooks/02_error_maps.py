# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # What the error map sees
#
# On the two embedded transfer tasks (label shift: MNIST 0-4 to 5-9; input
# shift: MNIST to scikit-learn's 8x8 digits), a ViT pretrained on the source
# task gets a linear probe on the target task, and then the question is: which
# blocks and heads carry the remaining error? Three attributions answer it:
# the cheap `norm_product` and `taylor` (one backward pass) and exact
# `ablation` (the loss change when a component's output is zeroed). Their rank
# agreement says how far the cheap ones can be trusted.
#
# `RGFT_CONFIG=quick` runs it on the study's tiny settings (what CI does).

# %%
import dataclasses
import os
import pathlib
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax
from scipy import stats

import rgft_jax
from experiments import data
from experiments import finetune
from experiments import methods
from experiments import train
from experiments.vit import short_name
from rgft_jax import viz

ROOT = pathlib.Path.cwd()  # Where the work directory goes: the repository root.
if not (ROOT / "experiments").exists():  # Started from notebooks/.
  ROOT = ROOT.parent
ARG = os.environ.get("RGFT_CONFIG", "")  # finetune.get_config's argument.
WORKDIR = os.environ.get("WORKDIR", str(ROOT / "workdir" / "finetune"))
FIGURES = pathlib.Path(os.environ.get("FIGURES", ROOT / "docs" / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
cfg = dataclasses.replace(finetune.get_config(ARG), workdir=WORKDIR, progress=False)
PROBE_STEPS = 10 if ARG == "quick" else cfg.steps
BATCHES = 1 if ARG == "quick" else 8
TASKS = tuple(cfg.tasks.split(","))

# %% [markdown]
# ## Pretrain (cached), then fit the new head only


# %%
def probed_model(name):
  source, target = data.embedded_tasks()[name]
  example = finetune.train_batches_of(cfg, target.train, 0)[0]["image"][:2]
  pre, acc = finetune.pretrain(cfg, name, source, example)
  model, fresh = finetune.init_model(cfg, target.num_classes, example)
  method = methods.make(
    "head_only", model, {**pre, "head": fresh["head"]}, example, cfg
  )
  with tempfile.TemporaryDirectory() as where:
    record, params = train.run(
      model,
      method,
      finetune.train_batches_of(cfg, target.train, 1),
      finetune.eval_batches_of(cfg, target.test),
      steps=PROBE_STEPS,
      learning_rate=cfg.learning_rate,
      seed=0,
      workdir=where,
      progress=False,
    )
  print(
    f"{name}: source accuracy {acc:.3f}, target accuracy after the linear probe "
    f"{record['test_accuracy']:.3f}"
  )
  return model, params, target


# %% [markdown]
# ## Error maps by three methods


# %%
def error_maps(model, params, target, select):
  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  batches = data.train_batches(target.test, 100, seed=2)
  # In the order the model calls them (a jitted dict comes back sorted by key).
  names = (
    rgft_jax.ErrorTracker(model, select=select)
    .components(params, batches[0]["image"])
    .names
  )
  maps = {}
  for method in ("norm_product", "taylor", "ablation"):
    tracker = rgft_jax.ErrorTracker(model, select=select, method=method)
    step = jax.jit(tracker.value_and_grad(loss_fn))
    total = None
    for k in range(BATCHES):
      _, _, em = step(params, batches[k]["image"], batches[k]["label"])
      v = np.array([float(em[n]) for n in names])
      total = v if total is None else total + v
    maps[method] = total / BATCHES
  return names, maps


results = {}
for task_name in TASKS:
  model, params, target = probed_model(task_name)
  for select in ("branches", "heads"):
    names, maps = error_maps(model, params, target, select)
    results[task_name, select] = names, maps
    ablation = np.abs(maps["ablation"])
    rho = {
      m: stats.spearmanr(maps[m], ablation).statistic
      for m in ("norm_product", "taylor")
    }
    print(
      f"{task_name:12s} {select:8s} n={len(names):2d}  Spearman with |ablation|: "
      f"norm_product {rho['norm_product']:.3f}, taylor {rho['taylor']:.3f}"
    )

# %% [markdown]
# ## Pictures: blocks, then heads

# %%
fig, axes = plt.subplots(1, len(TASKS), figsize=(6.5 * len(TASKS), 4), squeeze=False)
for ax, task_name in zip(axes[0], TASKS, strict=True):
  names, maps = results[task_name, "branches"]
  x = np.arange(len(names))
  for i, method in enumerate(("norm_product", "taylor", "ablation")):
    v = np.abs(maps[method])
    ax.bar(x + (i - 1) * 0.27, v / v.max(), width=0.27, label=method)
  ax.set_xticks(x, [short_name(n) for n in names], rotation=45, ha="right")
  ax.set_ylabel("error / max (|ablation|)")
  ax.set_title(task_name)
  ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "error_map_branches.png", dpi=110)
plt.show()

fig, axes = plt.subplots(len(TASKS), 2, figsize=(10, 3.5 * len(TASKS)), squeeze=False)
for row, task_name in enumerate(TASKS):
  names, maps = results[task_name, "heads"]
  viz.head_grid(maps["norm_product"], names, ax=axes[row, 0], label=short_name)
  axes[row, 0].set_title(f"{task_name}: norm_product")
  viz.head_grid(np.abs(maps["ablation"]), names, ax=axes[row, 1], label=short_name)
  axes[row, 1].set_title(f"{task_name}: |ablation|")
fig.tight_layout()
fig.savefig(FIGURES / "error_map_heads.png", dpi=110)
plt.show()
