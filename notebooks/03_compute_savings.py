# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Compute savings: soft RGFT, detached branches, a FLOP budget
#
# Soft RGFT scales each component's update by its multiplier; every gradient
# is still computed. Sparse RGFT detaches the *output* of the components it
# does not train this step (`rgft_jax.detachable_step(..., detached=...)`): the
# output goes behind `stop_gradient`, so XLA drops that branch's whole
# backward pass while the gradient still reaches the layers below through the
# residual stream. A `rgft_jax.Budget` decides which components stay trained,
# from the error map, within a fraction of a full fine-tuning step's FLOPs.
#
# Every FLOP count here is XLA's cost analysis of a compiled step (nothing is
# timed). The model is the study's small ViT on the embedded label-shift task
# (MNIST digits 0-4 to 5-9), pretrained on the source task.
#
# `RGFT_CONFIG=quick` runs it on the study's tiny settings (what CI does).

# %%
import dataclasses
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

import rgft_jax
from experiments import data
from experiments import finetune
from experiments import train
from rgft_jax import compiled_cost

ROOT = pathlib.Path.cwd()  # Where the work directory goes: the repository root.
if not (ROOT / "experiments").exists():  # Started from notebooks/.
  ROOT = ROOT.parent
ARG = os.environ.get("RGFT_CONFIG", "")  # finetune.get_config's argument.
WORKDIR = os.environ.get("WORKDIR", str(ROOT / "workdir" / "finetune"))
cfg = dataclasses.replace(finetune.get_config(ARG), workdir=WORKDIR, progress=False)
STEPS = cfg.steps  # Fine-tuning steps of each run.
EVERY = cfg.budget_every  # Steps between the budget's decisions.
BUDGET = 0.5  # Fraction of a full fine-tuning step's FLOPs, on average.

# %% [markdown]
# ## The pretrained model and the target task

# %%
source, target = data.embedded_tasks()["label_shift"]
batches = finetune.train_batches_of(cfg, target.train, seed=1)
example = batches[0]["image"][:2]
pretrained, source_accuracy = finetune.pretrain(cfg, "label_shift", source, example)
model, fresh = finetune.init_model(cfg, target.num_classes, example)
params = {**pretrained, "head": fresh["head"]}  # A new, zero head for the new labels.
batch = batches[0]
print(f"ViT-{cfg.size}/{cfg.patch}, batch {cfg.batch_size}, images {example.shape[1:]}")
print(f"source-task test accuracy after pretraining: {source_accuracy:.3f}")

loss_fn = functools.partial(train.loss_and_accuracy, model)  # (loss, accuracy).


@jax.jit
def correct(params, batch):
  logits = model.apply({"params": params}, batch["image"])
  return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"])


def test_accuracy(params):
  hits = total = 0.0
  for b in data.eval_batches(target.test, cfg.eval_batch_size):
    hits += float(correct(params, b))
    total += float(b["mask"].sum())
  return hits / total


# %% [markdown]
# ## 1. Soft RGFT saves nothing
#
# The plain full fine-tuning step (Adam, no tracker) against the RGFT step with
# nothing detached (soft RGFT): the tracker reads the error map off the
# backward pass that full fine-tuning runs anyway, and the multipliers only
# scale updates, so every gradient is still computed. `x full` is the ratio of
# the two compiled steps' FLOPs.

# %%
adam = optax.adam(cfg.learning_rate)


def full_step(params, opt_state, batch):
  out, grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
  updates, opt_state = adam.update(grads, opt_state, params)
  return out, optax.apply_updates(params, updates), opt_state


full_compiled = jax.jit(full_step).lower(params, adam.init(params), batch).compile()
unit, full_peak = compiled_cost(full_compiled)

tracker = rgft_jax.ErrorTracker(model, select="branches")
comps = tracker.components(params, example)
tx = rgft_jax.rgft(cfg.learning_rate, comps, warmup_steps=STEPS)
opt_state = tx.init(params)
step = rgft_jax.detachable_step(tracker, tx, loss_fn, comps, has_aux=True)
variants = rgft_jax.StepVariants(
  lambda detached: lambda *a: step(*a, detached=detached), max_variants=32
)
soft, soft_peak = variants.cost(frozenset(), params, opt_state, batch)
print(f"{'step':<28}{'MFLOPs':>10}{'x full':>8}{'peak KiB':>10}")
print(
  f"{'full fine-tuning (Adam)':<28}{unit / 1e6:>10.1f}{1:>8.4f}{full_peak / 1024:>10.0f}"
)
print(
  f"{'soft RGFT':<28}{soft / 1e6:>10.1f}{soft / unit:>8.4f}{soft_peak / 1024:>10.0f}"
)

# %% [markdown]
# ## 2. What detaching branches saves
#
# `detach_costs` compiles the RGFT step with each of the 2 x depth block
# branches (attention, MLP) detached alone, and checks on a few random subsets
# that the savings add up. Below, its prediction for the bottom or the top `k`
# branches detached, next to the FLOPs of that variant compiled, as fractions
# of the plain full fine-tuning step.

# %%
costs = rgft_jax.detach_costs(
  step, comps.names, params, opt_state, batch, compiled=True
)
short = [n.replace("Transformer/encoderblock_", "block ") for n in comps.names]
for name, saving in zip(short, costs.saving, strict=True):
  print(f"{name:<42} saves {saving / unit:.4f} of a full step")
print(f"everything detached (the floor): {costs.floor / unit:.4f} of a full step")
print(f"largest gap between a checked subset and the sum: {costs.additivity_error:.2e}")

# %%
n = len(comps.names)
ks = [0, n // 2, n] if ARG == "quick" else list(range(0, n + 1, 2))
rows = []
for k in ks:
  for where, names in (("bottom", comps.names[:k]), ("top", comps.names[n - k :])):
    detached = frozenset(names)
    flops, peak = variants.cost(detached, params, opt_state, batch)
    rows.append((k, where, costs.step(detached) / unit, flops / unit, peak))
print(f"{'detached':>9}  {'where':<7}{'predicted':>10}{'compiled':>10}{'peak KiB':>10}")
for k, where, predicted, compiled, peak in rows:
  print(f"{k:>9}  {where:<7}{predicted:>10.4f}{compiled:>10.4f}{peak / 1024:>10.0f}")

fig, ax = plt.subplots(figsize=(5, 3.5))
for where, marker in (("bottom", "o"), ("top", "x")):
  r = [row for row in rows if row[1] == where]
  ax.plot(
    [row[0] for row in r], [row[3] for row in r], marker, label=f"{where}, compiled"
  )
ax.plot(
  ks,
  [costs.step(comps.names[:k]) / unit for k in ks],
  "-",
  lw=1,
  label="predicted (bottom)",
)
ax.set_xlabel("block branches detached")
ax.set_ylabel("step FLOPs / full fine-tuning step")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 3. A budgeted run
#
# `Budget` spends `BUDGET` of a full fine-tuning step's FLOPs per step on
# average, tracking included (`unit=` the plain Adam step above). Step 0
# detaches everything (it only measures the error map); from step 1, every
# `EVERY` steps, it keeps trained the branches with the most EMA error whose
# cost fits (`rule="top"`). `SparseTrainStep` runs the variant it chooses.
# The control spends the same budget on branches drawn uniformly at random
# (`rule="uniform"`, no error map). The equal-FLOPs baseline is full
# fine-tuning for `BUDGET * STEPS` steps; full fine-tuning for all `STEPS`
# steps is shown for reference. One seed, the same batches for every run.


# %%
def run_sparse(rule):
  budget = rgft_jax.Budget(
    costs, BUDGET, total_steps=STEPS, every=EVERY, rule=rule, unit=unit
  )
  sparse = rgft_jax.SparseTrainStep(step, budget, max_variants=32)
  p, s = params, tx.init(params)
  for t in range(STEPS):
    _, p, s = sparse(t, p, s, batches[t])
  return p, budget, sparse.compilations


def run_full(steps):
  fn = jax.jit(full_step)
  p, s = params, adam.init(params)
  for t in range(steps):
    _, p, s = fn(p, s, batches[t])
  return p


results = {}
budgets = {}
for rule in ("top", "uniform"):
  p, budgets[rule], compilations = run_sparse(rule)
  results[f"budget {BUDGET} ({rule})"] = (budgets[rule].fraction, test_accuracy(p))
  print(f"rule {rule!r}: {compilations} step variants compiled")
short_steps = round(BUDGET * STEPS)
results[f"full, {short_steps} steps"] = (
  short_steps / STEPS,
  test_accuracy(run_full(short_steps)),
)
results[f"full, {STEPS} steps"] = (1.0, test_accuracy(run_full(STEPS)))

# %% [markdown]
# Which branches the error map kept trained at each decision (`"top"`):

# %%
for t, trained in budgets["top"].decisions:
  kept = [s.replace("Transformer/encoderblock_", "") for s in trained]
  print(f"step {t:>4}: {len(kept)} of {n} trained: {', '.join(kept) or '-'}")

# %% [markdown]
# FLOPs spent over `STEPS` full fine-tuning steps (`Budget.fraction`, counted
# from the per-branch savings; the full runs by their step count) and test
# accuracy on the target task:

# %%
print(f"{'run':<28}{'FLOPs / full run':>18}{'test accuracy':>15}")
for name, (fraction, accuracy) in results.items():
  print(f"{name:<28}{fraction:>18.3f}{accuracy:>15.3f}")
