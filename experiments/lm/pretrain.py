"""Source-domain pretraining of the decoder, cached with orbax in the work directory.

The cache directory is named by a hash of every setting that changes the
result, the corpora's `data.fingerprint()` included, so another setup never
reuses it; its `done.json` holds those settings and a SHA-256 of the saved
arrays, and a checkpoint whose arrays do not restore or do not match it is
refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import optax

from experiments import checkpoint
from experiments.lm import data
from experiments.lm import model as lm
from experiments.lm.methods import Decoder

# Bumped whenever the same settings would pretrain differently.
_FORMAT = 1


def settings(cfg) -> dict[str, Any]:
  """The settings that change the pretrained weights (`cfg`: the study's Config)."""
  return {
    "format": _FORMAT,
    "model": dataclasses.asdict(model_config(cfg)),
    "steps": cfg.pretrain_steps,
    "batch_size": cfg.pretrain_batch_size,
    "learning_rate": cfg.pretrain_learning_rate,
    "seed": 0,
    "data": data.fingerprint(),
  }


def model_config(cfg) -> lm.Config:
  """The decoder pretrained (the default scanned layout, no remat)."""
  return lm.Config(
    d_model=cfg.d_model,
    n_layers=cfg.n_layers,
    n_heads=cfg.n_heads,
    n_kv_heads=cfg.n_kv_heads,
    d_ff=cfg.d_ff,
    max_len=cfg.context,
  )


def directory(cfg) -> tuple[str, dict[str, Any]]:
  """Where the pretraining of `cfg` is cached, and the settings naming it."""
  named = settings(cfg)
  key = hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()
  m = named["model"]
  tag = f"d{m['d_model']}-l{m['n_layers']}-t{m['max_len']}-{cfg.pretrain_steps}"
  return os.path.join(cfg.workdir, "pretrained", f"{tag}-{key[:12]}"), named


def _schedule(cfg) -> optax.Schedule:
  warmup = max(1, min(100, cfg.pretrain_steps // 10))
  return optax.warmup_cosine_decay_schedule(
    0.0,
    cfg.pretrain_learning_rate,
    warmup_steps=warmup,
    decay_steps=max(cfg.pretrain_steps, warmup + 1),
    end_value=0.1 * cfg.pretrain_learning_rate,
  )


def _train(cfg, decoder: Decoder, log) -> tuple[dict[str, Any], dict[str, Any]]:
  tx = optax.adam(_schedule(cfg))

  @jax.jit
  def step(params, opt_state, batch):
    def loss(p):
      return lm.loss(decoder(p), batch)[0]

    nats, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nats

  params = decoder.init(0)
  opt_state = tx.init(params)
  corpus = data.load("stdlib")
  batches = data.train_batches(
    corpus.splits["train"],
    context=cfg.context,
    batch_size=cfg.pretrain_batch_size,
    seed=0,
  )
  losses, tic = [], time.perf_counter()
  every = max(1, cfg.pretrain_steps // 10)
  for t in range(cfg.pretrain_steps):
    params, opt_state, nats = step(params, opt_state, batches[t])
    if (t + 1) % every == 0 or t + 1 == cfg.pretrain_steps:
      losses.append((t + 1, float(nats) / math.log(2.0)))
      log(
        f"pretraining step {t + 1}/{cfg.pretrain_steps}: {losses[-1][1]:.3f} bits/byte"
      )
  return params, {"bits_per_byte": losses, "wall_s": time.perf_counter() - tic}


def pretrain(cfg, log=print) -> tuple[dict[str, Any], dict[str, Any]]:
  """The decoder pretrained on the stdlib source (scanned layout), and its record.

  Reads the cache when it holds these settings; otherwise trains and saves.

  Raises:
    ValueError: when the cached `done.json` names other settings, or the
      cached arrays do not restore or differ from their saved checksum (the
      cache is left as it is, to be looked at or removed;
      `checkpoint.load_cached`, which the ViT study's cache shares).
  """
  where, named = directory(cfg)
  decoder = Decoder(model_config(cfg))
  abstract = jax.eval_shape(lambda: decoder.init(0))
  found = checkpoint.load_cached(where, abstract, named, "pretraining")
  if found is not None:
    log(f"pretrained decoder read from {where}")
    return found
  params, record = _train(cfg, decoder, log)
  return params, checkpoint.save_cached(where, params, {**record, "settings": named})
