"""Language-model study: RGFT against the usual methods on a domain shift.

A byte-level decoder pretrained to a plateau on Python source (the
checkpoint shipped in `checkpoints/lm_plateau.npz`, which
`python -m experiments.lm.plateau` rebuilds) is fine-tuned on pydoc's English
help topics, or with `--target cheaders` on CPython's C headers (both ship
with CPython, `experiments/lm/data.py`), with each method given the same
steps and seeds. `--pretrained train` pretrains a smaller decoder here
instead, on the standard library's source (cached in `--workdir`), as the
study's results before the peers study did:

  python -m experiments.lm            # the default study
  python -m experiments.lm --help     # every flag

Each method picks its learning rate from one shared grid on the target
validation split (seed 0), runs every seed at it, and is reported on the
target test split next to the source test split after fine-tuning
(forgetting), its training FLOPs (XLA's count of the compiled steps times
the steps run), peak memory and wall time. Writes `results.json`,
`results.md` and `plots/` into `--workdir`, where the pretraining is cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any

import numpy as np

from experiments import cli
from experiments import compare
from experiments import configs
from experiments import loop
from experiments import report
from experiments import store
from experiments.lm import data
from experiments.lm import methods as methods_lib
from experiments.lm import model as lm
from experiments.lm import pretrain as pretrain_lib
from experiments.lm import shipped
from experiments.lm import train as train_lib

DEFAULT_METHODS = (
  "full",
  "rgft_blocks",
  "rgft_heads",
  "rgft_budget@0.5",
  "uniform_budget@0.5",
  "lora",
  "lisa",
  "full@0.5",
)

PEER_METHODS = compare.peer_methods(("full",))

# The model flags' values with --pretrained train (the study's earlier model).
TRAIN_MODEL = {
  "context": 64,
  "d_model": 128,
  "n_layers": 4,
  "n_heads": 4,
  "n_kv_heads": 2,
  "d_ff": 384,
}


def shipped_record() -> dict[str, Any]:
  """The shipped decoder's sidecar, with `corpus_name`: the corpus it was
  pretrained on. Raises ValueError when there is none (naming the command
  that builds it)."""
  side = shipped.sidecar_path(shipped.DEFAULT_PATH)
  if not os.path.exists(side):
    raise ValueError(
      f"No shipped decoder: {side} is missing. Build it with `python -m "
      "experiments.lm.plateau`, or use --pretrained train."
    )
  record = store.load_json(side)
  return {**record, "corpus_name": record["settings"]["corpus"]}


def shipped_model() -> dict[str, int]:
  """The model flags of the shipped decoder, from its sidecar."""
  model = shipped_record()["model"]
  return {
    "context": model["max_len"],
    **{k: model[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")},
  }


@dataclasses.dataclass(frozen=True)
class Config(
  configs.RgftConfig, configs.BudgetConfig, configs.BaselineConfig, configs.RunConfig
):
  """Every setting of the study, each a flag: the shared ones (`configs`),
  some with this study's own defaults, and its own."""

  # Comma-separated, name@b for budgets; "peers": budgeted RGFT, DropBP,
  # GreenTrainer, the controls and full@b at budgets 0.4, 0.5 and 0.7.
  methods: str = ",".join(DEFAULT_METHODS)
  seeds: int = 4
  tune_seeds: int = 1  # Seeds 0..tune_seeds-1 pick the rate (mean validation).
  learning_rates: str = "3e-4,1e-3,3e-3"  # The grid every method picks from.
  target: str = "pydoc"  # Target domain: pydoc (English prose) or cheaders (C).
  steps: int = 150  # Fine-tuning steps of every method (full@b: b x steps).
  batch_size: int = 8  # Fine-tuning windows per step.
  # Source model: "shipped" loads checkpoints/lm_plateau.npz (SHA-256 checked),
  # "train" pretrains one here on the stdlib for --pretrain_steps (cached).
  pretrained: str = "shipped"
  # Model flags: 0 takes the shipped model's, or with --pretrained train
  # the value in brackets; with "shipped", any other must equal the model's.
  context: int = 0  # Bytes the decoder reads, a window holds one more [64].
  d_model: int = 0  # Decoder width [128].
  n_layers: int = 0  # Decoder layers [4].
  n_heads: int = 0  # Query heads [4].
  n_kv_heads: int = 0  # Key/value heads, grouped-query attention [2].
  d_ff: int = 0  # MLP hidden width [384].
  pretrain_steps: int = 600  # --pretrained train: pretraining steps (cached).
  pretrain_batch_size: int = 16  # --pretrained train: windows per step.
  pretrain_learning_rate: float = 3e-3  # --pretrained train: peak rate.
  budget_every: int = 25
  lora_rank: int = 8
  lisa_period: int = 25
  eval_windows: int = 256  # Most windows per evaluation split (evenly spaced).
  eval_every: int = 25
  target_margin: float = 0.01  # FLOPs to reach full's final validation + this.
  workdir: str = "workdir/lm"

  def method_names(self) -> list[str]:
    if self.methods == "peers":
      return list(PEER_METHODS)
    names = [m.strip() for m in self.methods.split(",") if m.strip()]
    if not names:
      raise ValueError("--methods names no method.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"--methods repeats {repeated}.")
    for name in names:
      try:
        methods_lib.parse(name)
      except ValueError as e:
        raise ValueError(f"--methods: {e}") from None
    return names

  def grid(self) -> list[float]:
    """The learning rates of `--learning_rates`, checked."""
    try:
      grid = [float(x) for x in self.learning_rates.split(",") if x.strip()]
    except ValueError:
      raise ValueError(
        f"--learning_rates must be comma-separated numbers, got "
        f"{self.learning_rates!r}."
      ) from None
    if not grid:
      raise ValueError("--learning_rates names no learning rate.")
    bad = [x for x in grid if not (math.isfinite(x) and x > 0)]
    if bad:
      raise ValueError(f"--learning_rates must be finite and > 0, got {bad}.")
    if len(set(grid)) != len(grid):
      raise ValueError(f"--learning_rates repeats a value: {grid}.")
    return grid

  def resolved(self) -> Config:
    """This config with every model flag left at 0 filled in: from the shipped
    model's sidecar, or with `--pretrained train` from `TRAIN_MODEL`.

    Raises:
      ValueError: naming `--pretrained` when it is neither, or each model
        flag given that differs from the shipped model's.
    """
    if self.pretrained not in ("shipped", "train"):
      raise ValueError(
        f"--pretrained must be shipped or train, got {self.pretrained!r}."
      )
    model = TRAIN_MODEL if self.pretrained == "train" else shipped_model()
    given = {k: getattr(self, k) for k in model if getattr(self, k)}
    if self.pretrained == "shipped":
      wrong = [
        f"--{k} {v} (it has {model[k]})" for k, v in given.items() if v != model[k]
      ]
      if wrong:
        raise ValueError(
          f"The shipped decoder ({shipped.DEFAULT_PATH}) is another model: "
          f"{', '.join(wrong)}. Leave the model flags at 0, or use --pretrained "
          "train to pretrain this one."
        )
    return dataclasses.replace(self, **{**model, **given})

  def source(self) -> str:
    """The source domain's corpus (`data.load`): the shipped model's, or the
    stdlib's."""
    return shipped_record()["corpus_name"] if self.pretrained == "shipped" else "stdlib"

  def validate(self) -> None:
    """Raises ValueError naming the flag and its allowed range, before any compute."""
    self.resolved()._validate()

  def _validate(self) -> None:
    configs.RunConfig.validate(self)
    at_least = {
      "steps": 1,
      "batch_size": 1,
      "context": 1,
      "pretrain_steps": 1,
      "pretrain_batch_size": 1,
      "d_model": 1,
      "n_layers": 1,
      "n_heads": 1,
      "n_kv_heads": 1,
      "d_ff": 1,
      "eval_windows": 1,
      "tune_seeds": 1,
    }
    cli.check_integers(self, at_least)
    configs.BaselineConfig.validate(self)
    configs.BudgetConfig.validate(self)
    if self.tune_seeds > self.seeds:
      raise ValueError(
        f"--tune_seeds must be in [1, --seeds={self.seeds}], got {self.tune_seeds}."
      )
    if self.target not in data.TARGETS:
      raise ValueError(f"--target must be one of {data.TARGETS}, got {self.target!r}.")
    m = self.target_margin
    if not (isinstance(m, int | float) and math.isfinite(m) and m >= 0):
      raise ValueError(f"--target_margin must be finite and >= 0, got {m}.")
    cli.check_rate("pretrain_learning_rate", self.pretrain_learning_rate)
    if self.lisa_layers > self.n_layers:
      raise ValueError(
        f"--lisa_layers must be in [1, --n_layers={self.n_layers}], got "
        f"{self.lisa_layers}."
      )
    self.method_names()
    self.grid()
    try:
      pretrain_lib.model_config(self)
    except ValueError as e:
      raise ValueError(
        f"Model flags (--d_model, --n_layers, --n_heads, --n_kv_heads, --d_ff, "
        f"--context): {e}"
      ) from None
    configs.RgftConfig.validate(self)
    width = self.context + 1
    for corpus, split, least in (
      (self.target, "train", 2 * width),
      (self.target, "validation", width),
      (self.target, "test", width),
      (self.source(), "test", width),
    ):
      size = len(data.load(corpus).splits[split])
      if size < least:
        raise ValueError(
          f"--context {self.context} is too long for the {corpus} {split} split "
          f"({size} bytes; it needs at least {least})."
        )
    batches = [("batch_size", self.target)]
    if self.pretrained == "train":
      batches.append(("pretrain_batch_size", "stdlib"))
    for flag, corpus in batches:
      batch = getattr(self, flag)
      windows = len(data.load(corpus).splits["train"]) // width - 1
      cli.check_batch(flag, batch, windows, f"the {corpus} train split's windows")
      need = cli.activation_bytes(
        batch,
        self.context,
        self.d_model,
        self.d_ff,
        self.n_layers,
        self.n_heads,
        outputs=pretrain_lib.model_config(self).vocab_size,
      )
      cli.check_memory(flag, batch, need, "the activations of one training step")


def eval_sets(cfg: Config) -> dict[str, np.ndarray]:
  """The evaluation sets: target validation and test, source test."""
  target, source = data.load(cfg.target), data.load(cfg.source())

  def windows(split):
    return data.eval_windows(split, context=cfg.context, max_windows=cfg.eval_windows)

  return {
    "validation": windows(target.splits["validation"]),
    "test": windows(target.splits["test"]),
    "source_test": windows(source.splits["test"]),
  }


def train_batches(cfg: Config, seed: int):
  """The target-domain training batches of `seed` (`batches[step]`)."""
  return data.train_batches(
    data.load(cfg.target).splits["train"],
    context=cfg.context,
    batch_size=cfg.batch_size,
    seed=seed + 1,
  )


# Bumped whenever the same settings would give another run record.
_RUN_FORMAT = 1
# Settings that choose which runs a study makes, not what one run gives.
NOT_IN_SIGNATURE = (
  "methods",
  "seeds",
  "tune_seeds",
  "tune_budget",
  "learning_rates",
  "workdir",
  "progress",
)


def signature(cfg: Config) -> str:
  """A hash of every setting that changes a run's record, the corpora's
  fingerprint and the shipped decoder's SHA-256: runs are kept under it and
  reused by it."""
  named = {
    k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_SIGNATURE
  }
  named["format"] = _RUN_FORMAT
  named["data"] = data.fingerprint((cfg.target, cfg.source()))  # This machine's.
  if cfg.pretrained == "shipped":
    named["shipped_sha256"] = shipped_record()["sha256"]
  text = json.dumps(named, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def run_path(cfg: Config, name: str, lr: float, seed: int) -> str:
  """`<workdir>/runs/<signature[:12]>/<method>/lr<rate>/seed<k>.json`."""
  return os.path.join(
    cfg.workdir, "runs", signature(cfg)[:12], name, f"lr{lr:g}", f"seed{seed}.json"
  )


def load_run(path: str, cfg: Config, name: str, lr: float, seed: int) -> dict:
  """The record at `path`, refused (ValueError naming it) unless it is the
  finished run of `name` at `lr` and `seed` under `cfg`'s signature."""
  record = store.load_json(path)
  want = {
    "method": name,
    "learning_rate": lr,
    "seed": seed,
    "signature": signature(cfg),
  }
  wrong = [
    f"{k} {record.get(k)!r} (this run: {v!r})"
    for k, v in want.items()
    if not isinstance(record, dict) or record.get(k) != v
  ]
  if not wrong and not all(
    k in record for k in ("test_bpb", "source_bpb", "validation_bpb")
  ):
    wrong.append("no final bits/byte")
  if wrong:
    raise ValueError(
      f"{path} is not this run's record: {', '.join(wrong)}. It is left as it "
      "is and not used; remove it to redo the run."
    )
  return record


def _method_runs(cfg: Config, method, variants, bpb, log, rate=None):
  """The learning-rate search of `method` on seeds `0..tune_seeds-1` (their
  mean validation bits/byte picks; with `rate`, that rate alone), then every
  seed at the picked rate: `(search, [(record, final parameters) per seed])`.

  Each run's record is saved when it ends (`run_path`) and read back instead
  of training again, so an interrupted study resumes; the final parameters
  of a run read back are None.
  """
  grid = cfg.grid() if rate is None else [rate]

  def one(lr, seed):
    where = run_path(cfg, method.name, lr, seed)
    if os.path.exists(where):
      record = load_run(where, cfg, method.name, lr, seed)
      log(f"{method.name} lr {lr:g} seed {seed}: read from {where}")
      return record, None
    record, tree = train_lib.run(
      method,
      variants,
      train_batches(cfg, seed),
      steps=cfg.steps,
      learning_rate=lr,
      seed=seed,
      log_every=cfg.log_every,
      evaluate=lambda tree: bpb(method.to_params(tree), "validation"),
      eval_every=cfg.eval_every,
    )
    final = method.to_params(tree)
    record["validation_bpb"] = bpb(final, "validation")
    record["test_bpb"] = bpb(final, "test")
    record["source_bpb"] = bpb(final, "source_test")
    record["signature"] = signature(cfg)
    store.save_json(where, record)
    log(
      f"{method.name} lr {lr:g} seed {seed}: validation "
      f"{record['validation_bpb']:.4f} bits/byte, {record['wall_s']:.1f} s"
    )
    return record, final

  tune = range(cfg.tune_seeds)
  tried = {(lr, seed): one(lr, seed) for lr in grid for seed in tune}
  scores = [
    float(np.mean([tried[lr, seed][0]["validation_bpb"] for seed in tune]))
    for lr in grid
  ]
  picked = grid[int(np.argmin(scores))]  # The first of equal scores.
  search = {
    "learning_rates": grid,
    "validation_bpb": scores,
    "picked": picked,
    "tune_seeds": cfg.tune_seeds,
  }
  seeds = [
    tried[picked, seed] if seed in tune else one(picked, seed)
    for seed in range(cfg.seeds)
  ]
  return search, seeds


def _costs(costs) -> dict[str, Any]:
  return {
    "full_step_flops": costs.full,
    "lisa_step_flops": costs.lisa,
    "rgft_step_flops": costs.detach.full,
    "all_detached_step_flops": costs.detach.floor,
    "detach_saving": dict(
      zip(costs.detach.names, costs.detach.saving.tolist(), strict=True)
    ),
    "additivity_error": costs.detach.additivity_error,
  } | (
    {}
    if costs.freeze is None
    else {
      "freeze": {
        "tensors": list(costs.freeze.names),
        "forward": costs.freeze.forward,
        "alone": costs.freeze.alone.tolist(),
        "weight": costs.freeze.weight.tolist(),
        "additivity_error": costs.freeze.additivity_error,
      }
    }
  )


def study(cfg: Config, log=print, keep: dict | None = None) -> dict[str, Any]:
  """Pretrains (or reads the cache), then runs every method and seed.

  With `keep` (a dict), the final decoder parameters of each reported run
  trained in this call (not read back from the work directory) are stored in
  it under `(method, seed)`.

  Returns:
    JSON-serialisable results: the config, the pretraining record, the
    pretrained decoder's bits per byte, the step costs, every run's record,
    the learning-rate search, the methods that could not run and why, and
    the summary per method.
  """
  cfg = cfg.resolved()
  names = cfg.method_names()
  if cfg.pretrained == "shipped":
    scanned, side = shipped.load_shipped(model=pretrain_lib.model_config(cfg))
    pre_record = {
      "path": os.path.relpath(shipped.DEFAULT_PATH, os.getcwd()),
      "corpus_name": side["corpus_name"] if "corpus_name" in side else cfg.source(),
      **{
        k: side[k]
        for k in (
          "sha256",
          "command",
          "wall_s",
          "best",
          "stopped",
          "test_bits_per_byte",
        )
      },
    }
    if "corpus_matches" in side:
      pre_record["corpus_matches"] = side["corpus_matches"]
    directory = shipped.DEFAULT_PATH
  else:
    scanned, pre_record = pretrain_lib.pretrain(cfg, log)
    directory = pretrain_lib.directory(cfg)[0]
  looped = dataclasses.replace(pretrain_lib.model_config(cfg), scan_layers=False)
  decoder = methods_lib.Decoder(looped)
  params = lm.unstack_layers(scanned)
  windows = eval_sets(cfg)

  def bpb(p, split):
    return train_lib.bits_per_byte(decoder, p, windows[split])

  before = {split: bpb(params, split) for split in windows}
  log(
    f"pretrained: source test {before['source_test']:.3f}, target test "
    f"{before['test']:.3f} bits/byte"
  )
  setup = methods_lib.Setup(
    decoder,
    params,
    train_batches(cfg, 0)[0],
    cfg,
    scanned=methods_lib.Decoder(pretrain_lib.model_config(cfg)),
  )
  if any(methods_lib.needs_costs(n) for n in names):
    freeze = any(methods_lib.needs_freeze_costs(n) for n in names)
    costs = methods_lib.measure_costs(setup, freeze=freeze)
    setup = dataclasses.replace(setup, costs=costs)
  search, unavailable = {}, {}
  done: dict[str, list] = {}
  shared: dict[str, Any] = {}  # Compiled steps, by method family.

  def go(name: str) -> None:
    """Runs `name` (after the method whose rate it reuses, `--tune_budget`)."""
    tuned = compare.tuned_as(name, cfg.tune_budget)
    if tuned != name and tuned not in search and tuned not in unavailable:
      go(tuned)
    rate = None if tuned == name or tuned not in search else search[tuned]["picked"]
    try:
      method = methods_lib.build(name, setup)
    except methods_lib.Unavailable as e:
      unavailable[name] = str(e)
      log(f"{name}: not run: {e}")
      return
    if method.family not in shared:
      shared[method.family] = loop.variants_of(method)
    search[name], done[name] = _method_runs(
      cfg, method, shared[method.family], bpb, log, rate
    )
    if rate is not None:
      search[name]["tuned_as"] = tuned

  for name in names:
    if name not in search and name not in unavailable:
      go(name)
  runs = []
  for name in names:
    for record, final in done.get(name, []):
      runs.append(record)
      if keep is not None and final is not None:
        keep[(name, record["seed"])] = final
  search = {n: search[n] for n in names if n in search}
  out = {
    "config": dataclasses.asdict(cfg),
    "pretrain": {**pre_record, "directory": directory},
    "pretrained_bpb": before,
    "windows": {split: len(w) for split, w in windows.items()},
    "runs": runs,
    "lr_search": search,
    "unavailable": unavailable,
    "summary": summarize(runs, cfg.target_margin),
  }
  if setup.costs is not None:
    out["costs"] = _costs(setup.costs)
  return out


def _mean_sd(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def trained_fraction(record: dict) -> dict[str, float]:
  """Per component, the fraction of a run's steps it was trained (not detached)."""
  total = sum(record["steps_per_variant"].values())
  out = {}
  for name in record.get("components", []):
    held = sum(
      n
      for v, n in record["steps_per_variant"].items()
      if v != "all" and name in v.split(",")
    )
    out[name] = 1.0 - held / total
  return out


def flops_to_target(runs: list[dict], name: str, margin: float) -> dict | None:
  """FLOPs `name` spent before its validation bits/byte first came within
  `margin` of full fine-tuning's final one, seed by seed (paired).

  Returns None without learning curves or full fine-tuning runs; else
  `{"seeds": [...], "flops": [FLOPs, or None where never reached]}`.
  """
  full = {r["seed"]: r for r in runs if r["method"] == "full"}
  out: dict[str, list] = {"seeds": [], "flops": []}
  for r in runs:
    if r["method"] != name or r["seed"] not in full or "curve" not in r:
      continue
    target = full[r["seed"]]["validation_bpb"] + margin
    curve = r["curve"]
    hit = [
      f
      for f, v in zip(curve["train_flops"], curve["value"], strict=True)
      if v <= target
    ]
    out["seeds"].append(r["seed"])
    out["flops"].append(hit[0] if hit else None)
  return out if out["seeds"] else None


def summarize(runs: list[dict], margin: float = 0.01) -> dict[str, dict[str, Any]]:
  """Per method: bits per byte over seeds, the paired difference to full
  fine-tuning with its 95% interval, forgetting, costs relative to full, and
  the FLOPs to come within `margin` of full's final validation bits/byte."""
  out = {}
  for name in dict.fromkeys(r["method"] for r in runs):
    rs = [r for r in runs if r["method"] == name]
    s = {
      "seeds": len(rs),
      "steps": rs[0]["steps"],
      "learning_rate": rs[0]["learning_rate"],
    }
    for key in ("test_bpb", "source_bpb", "validation_bpb"):
      s[f"{key}_mean"], s[f"{key}_std"] = _mean_sd([r[key] for r in rs])
    s["train_flops"] = float(np.mean([r["train_flops"] for r in rs]))
    s["wall_s"] = float(np.mean([r["wall_s"] for r in rs]))
    s["peak_bytes"] = int(max(r["peak_bytes"] for r in rs))
    s["step_variants"] = int(max(r["step_variants"] for r in rs))
    s["compilations"] = int(sum(r["compilations"] for r in rs))
    if "error_map" in rs[0]:
      maps = [np.array(list(r["error_map"].values())) for r in rs]
      normed = np.mean([m / max(m.max(), 1e-30) for m in maps], axis=0)
      s["error_map"] = dict(zip(rs[0]["error_map"], normed.tolist(), strict=True))
    if "budget" in rs[0]:
      s["budget_fraction"] = float(np.mean([r["budget"]["fraction"] for r in rs]))
      fractions = [trained_fraction(r) for r in rs]
      s["trained_fraction"] = {
        c: float(np.mean([f[c] for f in fractions])) for c in fractions[0]
      }
    vs_full = compare.paired(runs, name, "full", "test_bpb") if name != "full" else None
    if vs_full is not None:
      s["diff_vs_full"], s["diff_ci95"] = vs_full["mean"], vs_full["ci95"]
    out[name] = s
  if "full" in out:
    base = out["full"]
    for name, s in out.items():
      s["flops_vs_full"] = s["train_flops"] / base["train_flops"]
      s["time_vs_full"] = s["wall_s"] / max(base["wall_s"], 1e-9)
      reach = flops_to_target(runs, name, margin)
      if reach is not None:
        hit = [f for f in reach["flops"] if f is not None]
        s["target_reached"] = f"{len(hit)}/{len(reach['flops'])}"
        # Over the seeds that reached it, as a fraction of full's whole run.
        s["flops_to_target"] = (
          float(np.mean(hit)) / base["train_flops"] if hit else None
        )
  compare.versus_peers(
    runs,
    out,
    key="test_bpb",
    mean="test_bpb_mean",
    higher_is_better=False,
  )
  return out


def _fmt(x, spec: str) -> str:
  return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


_TARGET_TITLE = {"pydoc": "pydoc prose", "cheaders": "CPython's C headers"}


def _source_title(results: dict[str, Any]) -> str:
  name = results["pretrain"].get("corpus_name", "stdlib")
  return {"stdlib": "stdlib source", "python_source": "Python source"}.get(name, name)


def _pretraining(results: dict[str, Any]) -> str:
  """How the decoder was pretrained, for the table's caption."""
  pre = results["pretrain"]
  if "stopped" in pre:  # The shipped checkpoint.
    return (
      f"pretrained to a plateau ({pre['path']}, {pre['stopped']['step']} steps, "
      f"best at step {pre['best']['step']})"
    )
  return f"pretrained for {results['config']['pretrain_steps']} steps"


def _bits(p: dict[str, Any]) -> str:
  return f"{p['mean']:+.4f} (± {_fmt(p['ci95'], '.4f')})"


def _peer(s: dict[str, Any]) -> str:
  """`+0.0123 (± 0.0040) vs dropbp@0.5`, or n/a."""
  if "best_peer" not in s:
    return "n/a"
  return f"{_bits({'mean': s['diff_vs_best_peer'], 'ci95': s['diff_vs_best_peer_ci95']})} vs {s['best_peer']}"


def _reach(s: dict) -> str:
  """`0.420 (4/4)`: FLOPs to target over full's, and the seeds that got there."""
  if "target_reached" not in s:
    return "n/a"
  return f"{_fmt(s['flops_to_target'], '.3f')} ({s['target_reached']})"


def markdown(results: dict[str, Any]) -> str:
  """The results table, the learning-rate search and the RGFT error maps."""
  cfg, before = results["config"], results["pretrained_bpb"]
  summary = results["summary"]
  lines = [
    f"### Byte-level LM: {_source_title(results)} -> "
    f"{_TARGET_TITLE[cfg.get('target', 'pydoc')]}",
    "",
    f"Decoder d{cfg['d_model']} x {cfg['n_layers']} layers, context "
    f"{cfg['context']}, batch {cfg['batch_size']}, {cfg['steps']} fine-tuning "
    f"steps, seeds 0-{cfg['seeds'] - 1}; {_pretraining(results)}: source test "
    f"{before['source_test']:.3f} bits/byte, target test "
    f"{before['test']:.3f} bits/byte before fine-tuning. Lower is better. "
    f"FLOPs to target: spent before the validation bits/byte first came within "
    f"{cfg.get('target_margin', 0.01)} of full fine-tuning's final one, seed by "
    "seed, over full's FLOPs (validation measured every "
    f"{cfg.get('eval_every', 0)} steps).",
    "",
    "| method | lr | steps | target test bpb (mean ± sd) | vs full, paired (95% CI) "
    "| vs best peer at its budget, paired (95% CI) "
    "| source test bpb after (forgetting) | FLOPs vs full | FLOPs to target "
    "(reached) | train GFLOPs | peak MiB | wall s | time vs full |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, s in summary.items():
    diff = s.get("diff_vs_full")
    vs = "n/a" if diff is None else f"{diff:+.4f} (± {_fmt(s['diff_ci95'], '.4f')})"
    lines.append(
      f"| {name} | {s['learning_rate']:g} | {s['steps']} | "
      f"{s['test_bpb_mean']:.4f} ± {s['test_bpb_std']:.4f} | {vs} | {_peer(s)} | "
      f"{s['source_bpb_mean']:.4f} ± {s['source_bpb_std']:.4f} | "
      f"{_fmt(s.get('flops_vs_full'), '.3f')} | {_reach(s)} | "
      f"{s['train_flops'] / 1e9:.4g} | "
      f"{s['peak_bytes'] / 2**20:.1f} | {s['wall_s']:.1f} | "
      f"{_fmt(s.get('time_vs_full'), '.2f')} |"
    )
  for name, why in results["unavailable"].items():
    lines.append(f"| {name} | not run: {why} |" + " |" * 11)
  lines += [
    "",
    *report.head_to_head_markdown(
      results["runs"], "test_bpb", _bits, "target test bits/byte"
    ),
  ]
  search = results["lr_search"]
  if search:
    grid = next(iter(search.values()))["learning_rates"]
    lines += [
      "",
      "Learning-rate search (target validation bits/byte, seed 0; picked in bold):",
      "",
      "| method | " + " | ".join(f"{lr:g}" for lr in grid) + " |",
      "|---|" + "---|" * len(grid),
    ]
    for name, s in search.items():
      cells = [
        f"**{v:.4f}**" if lr == s["picked"] else f"{v:.4f}"
        for lr, v in zip(s["learning_rates"], s["validation_bpb"], strict=True)
      ]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  maps = {n: s for n, s in summary.items() if "error_map" in s}
  groups: dict[tuple[str, ...], list[str]] = {}
  for name, s in maps.items():  # Methods with the same components share a table.
    groups.setdefault(tuple(s["error_map"]), []).append(name)
  for comps, names in groups.items():
    lines += [
      "",
      "Final EMA error map (each run's divided by its largest entry, mean over "
      "seeds); for budgets, the fraction of steps each branch was trained:",
      "",
    ]
    if all(re.search(r"/head\d+$", c) for c in comps):
      lines += _head_table(names, comps, maps)
      continue
    lines += [
      "| method | " + " | ".join(comps) + " |",
      "|---|" + "---|" * len(comps),
    ]
    for name in names:
      s = maps[name]
      lines.append(
        f"| {name} | " + " | ".join(f"{s['error_map'][c]:.2f}" for c in comps) + " |"
      )
      if "trained_fraction" in s:
        cells = " | ".join(f"{s['trained_fraction'][c]:.2f}" for c in comps)
        lines.append(f"| {name}, trained | {cells} |")
  return "\n".join(lines) + "\n"


def _head_table(names: list[str], comps: tuple[str, ...], maps: dict) -> list[str]:
  """Per-head error maps as one row per method and attention, one column per head."""
  heads = sorted({int(c.rpartition("/head")[2]) for c in comps})
  attentions = list(dict.fromkeys(c.rpartition("/head")[0] for c in comps))
  lines = [
    "| method | attention | " + " | ".join(f"head {h}" for h in heads) + " |",
    "|---|---|" + "---|" * len(heads),
  ]
  for name in names:
    for a in attentions:
      cells = [maps[name]["error_map"].get(f"{a}/head{h}") for h in heads]
      text = " | ".join("" if v is None else f"{v:.2f}" for v in cells)
      lines.append(f"| {name} | {a} | {text} |")
  return lines


def plots(results: dict[str, Any], where: str) -> list[str]:
  """Bits per byte against training FLOPs (and forgetting), and each RGFT
  method's error map over steps and per layer."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from rgft_jax import viz

  save, files = report.figure_saver(where)

  runs, summary = results["runs"], results["summary"]
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  colors = plt.get_cmap("tab10")
  for i, (name, s) in enumerate(summary.items()):
    target = [r["test_bpb"] for r in runs if r["method"] == name]
    source = [r["source_bpb"] for r in runs if r["method"] == name]
    sd = np.std(target, ddof=1) if len(target) > 1 else 0.0
    style = dict(fmt="o", color=colors(i % 10), label=name)
    axes[0].errorbar(s["train_flops"] / 1e12, np.mean(target), yerr=sd, **style)
    axes[1].errorbar(
      np.mean(target),
      np.mean(source),
      xerr=sd,
      yerr=np.std(source, ddof=1) if len(source) > 1 else 0.0,
      **style,
    )
  before = results["pretrained_bpb"]
  axes[1].axhline(before["source_test"], color="gray", ls=":", label="pretrained")
  axes[0].set_xlabel("training TFLOPs (XLA-counted)")
  target = results["config"].get("target", "pydoc")
  axes[0].set_ylabel(f"target ({target}) test bits/byte")
  axes[0].set_title("target bits/byte against training FLOPs (mean ± sd)")
  axes[1].set_xlabel(f"target ({target}) test bits/byte")
  axes[1].set_ylabel("source (stdlib) test bits/byte after")
  axes[1].set_title("forgetting against fitting")
  for ax in axes:
    ax.legend(fontsize=7)
  save(fig, "bpb_vs_flops.png")
  for name, s in summary.items():
    rs = [r for r in runs if r["method"] == name and r["history"]["error_map"]]
    if not rs:
      continue
    h, comps = rs[0]["history"], rs[0]["components"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    viz.error_map_heatmap(h["error_map"], h["step"], comps, ax=axes[0])
    axes[0].set_title(f"{name}, seed {rs[0]['seed']}: EMA error map / max")
    layers = sorted({c.rsplit("/", 1)[0] for c in comps}, key=_natural)
    branches = sorted({c.rsplit("/", 1)[1] for c in comps})
    grid = np.full((len(layers), len(branches)), np.nan)
    for c, v in s["error_map"].items():
      layer, branch = c.rsplit("/", 1)
      grid[layers.index(layer), branches.index(branch)] = v
    im = axes[1].imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    for (i, j), v in np.ndenumerate(grid):
      color = "k" if v > 0.6 else "w"
      axes[1].text(j, i, f"{v:.2f}", ha="center", va="center", color=color)
    axes[1].set_xticks(range(len(branches)), branches)
    axes[1].set_yticks(range(len(layers)), layers)
    axes[1].set_title("final error map / max, mean over seeds")
    fig.colorbar(im, ax=axes[1])
    save(fig, f"error_map_{name.replace('@', '_at_')}.png")
  return files


def _natural(name: str) -> list:
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def write(results: dict[str, Any], workdir: str) -> tuple[str, list[str]]:
  """`results.json`, `results.md` and `plots/` in `workdir`; returns the table."""
  store.save_json(os.path.join(workdir, "results.json"), results)
  table = markdown(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table)
  return table, plots(results, os.path.join(workdir, "plots"))


def get_config(arg: str = "") -> Config:
  """The study's settings: `""` its defaults, `"quick"` a tiny study for tests
  and notebooks (a few seconds per method):

    python -m experiments.lm --config quick
  """
  configs.check_arg(arg)
  if arg == "quick":
    return Config(
      seeds=2,
      pretrained="train",
      learning_rates="1e-3,1e-2",
      steps=12,
      batch_size=4,
      context=16,
      pretrain_steps=30,
      pretrain_batch_size=8,
      d_model=32,
      n_layers=2,
      n_heads=4,
      n_kv_heads=2,
      d_ff=256,
      budget_every=4,
      lora_rank=2,
      lisa_period=12,
      greentrainer_period=1.0,
      eval_windows=24,
      eval_every=4,
      log_every=2,
      progress=False,
    )
  return Config()


def parse(argv: list[str]) -> Config:
  """The Config of command-line flags (`cli.parse`: `--config`, then one flag
  per field, with its --help)."""
  methods = methods_lib.METHODS.help()
  description = __doc__.split("\n\n")[0] + f" Methods: {methods}."
  return cli.parse(get_config, argv, description, prog="python -m experiments.lm")


def run(cfg: Config, keep: dict | None = None) -> dict[str, Any]:
  """Checks `cfg`, runs the study in its work directory (one study at a time)
  and writes and prints its results; `keep` as in `study`."""
  cfg = dataclasses.replace(cfg, workdir=os.path.expanduser(cfg.workdir))
  cfg.validate()
  start = time.perf_counter()

  def log(*args):
    if cfg.progress:
      minutes, seconds = divmod(int(time.perf_counter() - start), 60)
      print(f"[{minutes:02d}:{seconds:02d}]", *args, flush=True)

  with store.lock(cfg.workdir):
    results = study(cfg, log=log, keep=keep)
    table, files = write(results, cfg.workdir)
  print(table)
  print(f"results: {os.path.join(cfg.workdir, 'results.json')}, results.md; plots:")
  print("\n".join(files))
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return run(parse(sys.argv[1:] if argv is None else argv))
