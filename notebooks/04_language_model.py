# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # RGFT on a byte-level language model
#
# A small decoder (`experiments/lm/model.py`: RMSNorm, rotary embeddings,
# grouped-query attention, gated-SiLU MLP) is pretrained here on the standard
# library's Python source (the study's `--pretrained train`; by default the
# study loads the larger decoder shipped in `checkpoints/`) and fine-tuned on
# pydoc's English help topics. Both
# corpora ship with CPython, so nothing is downloaded. This notebook looks at
# the pieces of `python -m experiments.lm` one at a time: the two domains, the
# pretrained decoder, where its error sits on the new domain, why budgeted
# RGFT runs the decoder with one module per layer, and the study's results.
#
# `RGFT_CONFIG=quick` runs it on the study's tiny settings (what CI does).

# %%
import dataclasses
import json
import os
import pathlib

import jax
import matplotlib.pyplot as plt
import numpy as np

import rgft_jax
from experiments.lm import data
from experiments.lm import methods
from experiments.lm import model as lm
from experiments.lm import pretrain
from experiments.lm import study
from experiments.lm import train
from rgft_jax import viz

ROOT = pathlib.Path.cwd()  # Where the work directory goes: the repository root.
if not (ROOT / "experiments").exists():  # Started from notebooks/.
  ROOT = ROOT.parent
ARG = os.environ.get("RGFT_CONFIG", "")  # study.get_config's argument.
WORKDIR = str(pathlib.Path(os.environ.get("WORKDIR", ROOT / "workdir")) / "lm")
cfg = dataclasses.replace(
  study.get_config(ARG), workdir=WORKDIR, progress=False, pretrained="train"
).resolved()
BATCHES = 2 if ARG == "quick" else 8  # Target batches the error maps are averaged over.

# %% [markdown]
# ## The two domains
#
# Each document goes wholly to one split by a hash of its name; a split is its
# documents' bytes, each after a `\x00`.

# %%
for name in data.CORPORA:
  corpus = data.load(name)
  sizes = ", ".join(
    f"{s} {v['bytes'] / 1e3:.0f} KB ({v['documents']} docs)"
    for s, v in corpus.summary().items()
  )
  print(f"{name}: {sizes}")
  start = corpus.splits["train"][1:161].tobytes().decode("utf-8", "replace")
  print("  " + start.replace("\n", "\n  "))

# %% [markdown]
# ## The pretrained decoder (cached in the work directory)
#
# Bits per byte is the mean next-byte cross-entropy in bits (8 is a uniform
# guess). The decoder learns the source domain and transfers part of it.

# %%
scanned, record = pretrain.pretrain(cfg, log=lambda *a: None)
looped = dataclasses.replace(pretrain.model_config(cfg), scan_layers=False)
decoder = methods.Decoder(looped)
params = lm.unstack_layers(scanned)
windows = study.eval_sets(cfg)
for split, label in (("source_test", "source (stdlib) test"), ("test", "target test")):
  bpb = train.bits_per_byte(decoder, params, windows[split])
  print(f"{label}: {bpb:.3f} bits/byte")
steps, curve = zip(*record["bits_per_byte"], strict=True)
plt.figure(figsize=(5, 3))
plt.plot(steps, curve, "o-")
plt.xlabel("pretraining step")
plt.ylabel("training bits/byte")
plt.show()

# %% [markdown]
# ## Where the error sits on the target domain, before fine-tuning
#
# The tracker measures each layer's attention and MLP branch at its output
# (`select` is a predicate on the module path). `norm_product` is the cheap
# attribution RGFT trains with; `ablation` is the exact loss change when the
# branch's output is zeroed (negative: the model relies on it), shown as
# `|ablation|`.

# %%
model = decoder(params)
batches = study.train_batches(cfg, seed=100)
names = (
  rgft_jax.ErrorTracker(model, select=methods.is_branch)
  .components(methods.params_of(model), batches[0][:, :-1])
  .names
)
maps = {}
for how in ("norm_product", "ablation"):
  tracker = rgft_jax.ErrorTracker(model, select=methods.is_branch, method=how)
  measure = jax.jit(
    lambda p, x, tracker=tracker: tracker.value_and_grad(lm.loss, has_aux=True)(
      decoder(p), x
    )[2]
  )
  per_batch = [measure(params, batches[k]) for k in range(BATCHES)]
  maps[how] = np.mean([[float(m[n]) for n in names] for m in per_batch], axis=0)
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(8, 3.5))
for i, how in enumerate(maps):
  v = np.abs(maps[how])
  ax.bar(x + (i - 0.5) * 0.4, v / v.max(), width=0.4, label=how)
ax.set_xticks(x, names, rotation=45, ha="right")
ax.set_ylabel("error / max")
ax.legend()
plt.show()

# %% [markdown]
# The same, layer by head: `select="heads"` finds each attention's heads from
# the dataflow (the `weights @ values` product feeding `o_proj`) and measures
# each head on its slice of `o_proj`'s input. With grouped-query attention a
# key/value head serves two query heads, so `k_proj` and `v_proj` belong to
# no head; a head owns its `q_proj` and `o_proj` slices.

# %%
heads = rgft_jax.ErrorTracker(model, select="heads")
head_names = heads.components(methods.params_of(model), batches[0][:, :-1]).names
measure = jax.jit(
  lambda p, x: heads.value_and_grad(lm.loss, has_aux=True)(decoder(p), x)[2]
)
per_batch = [measure(params, batches[k]) for k in range(BATCHES)]
head_map = np.mean([[float(m[n]) for n in head_names] for m in per_batch], axis=0)
fig, ax = plt.subplots(figsize=(5, 3.5))
viz.head_grid(head_map / head_map.max(), head_names, ax=ax)
ax.set_title("norm_product per head / max, before fine-tuning")
plt.show()

# %% [markdown]
# ## Detaching inside `nnx.scan` is a mask
#
# Budgeted RGFT saves compute by detaching a branch's output, so that XLA
# drops its backward pass. With the layers stacked under `nnx.scan` (the
# default layout) one scan body runs every layer's backward pass, so
# detaching a branch in some layers only masks its gradient; only a branch
# detached in every layer saves FLOPs. With one module per layer (the looped
# layout, `lm.with_layout(model, scan_layers=False)`) each detached branch
# saves its own backward pass. XLA's counts of the lowered RGFT steps (every
# layer of a scan counted, `rgft_jax.flops_of`), as fractions of the step
# with nothing detached:

# %%
batch = batches[0]
for scan in (True, False):
  layout = dataclasses.replace(looped, scan_layers=scan)
  dec = methods.Decoder(layout)
  p = scanned if scan else params
  live = dec(p)
  tracker = rgft_jax.ErrorTracker(live, select=methods.is_branch)
  comps = tracker.components(methods.params_of(live), batch[:, :-1])
  tx = rgft_jax.rgft(1e-3, comps)
  state = tx.init(p)
  mlps = [n for n in comps.names if n.endswith("/mlp")]
  counts = {}
  for label, detached in (
    ("nothing", ()),
    ("layer 0's MLP", mlps[:1]),
    ("every MLP", mlps),
  ):
    step = methods.tracked_step(dec, tracker, tx, comps, frozenset(detached))
    counts[label] = rgft_jax.flops_of(step, p, state, batch)
  row = ", ".join(f"{k} {v / counts['nothing']:.3f}" for k, v in counts.items())
  print(f"{'scanned' if scan else 'looped '}: detached {row}")

# %% [markdown]
# ## The study
#
# Every method from the same pretrained decoder (looped layout), with the same
# steps and seeds; each picks its learning rate from one shared grid on the
# target validation split. Below: the results of `python -m experiments.lm`
# if they are in the work directory for these settings, else the study is
# run here (about 15 minutes on 2 CPU cores at full size).


# %%
def settings(config: dict) -> dict:
  """What changes the results (not where they go, nor the progress output)."""
  return {k: v for k, v in config.items() if k not in ("workdir", "progress")}


saved = pathlib.Path(cfg.workdir, "results.json")
results = json.loads(saved.read_text()) if saved.exists() else None
if results is None or settings(results["config"]) != settings(dataclasses.asdict(cfg)):
  results = study.run(cfg)
else:
  print(study.markdown(results))

# %%
for png in sorted(pathlib.Path(cfg.workdir, "plots").glob("*.png")):
  plt.figure(figsize=(13, 4.8))
  plt.imshow(plt.imread(png))
  plt.axis("off")
  plt.title(png.name)
  plt.show()
