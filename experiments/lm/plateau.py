"""Pretraining a decoder until its validation loss stops improving, resumably.

  python -m experiments.lm.plateau   # train (into workdir/lm_plateau), resume, export
  python -m experiments.lm.plateau --help                      # every flag

Trains on the train split of `--corpus` (`"python_source"`: the stdlib and
site-packages source, `data.py`) with AdamW behind gradient clipping, and
measures bits per byte on `--eval_windows` fixed windows of its validation
split every `--eval_every` steps. The learning rate warms up linearly over
`--warmup_steps`, then stays constant until the validation curve plateaus:
at an evaluation after warmup, when the best of the last `--window`
evaluations improves on the best before them by less than `--threshold`
bits/byte (`plateaued`). Then it decays linearly to zero over a cooldown of
`--cooldown` times the steps run so far, and the run stops when the cooldown
ends. A constant rate suits early stopping, which does not know the run's
length in advance (a cosine schedule must); its plateau is the floor the
rate's noise sets, and the short linear cooldown removes that noise
(warmup-stable-decay schedules; Hägele et al., 2024, "Scaling Laws and
Compute-Optimal Training Beyond Fixed Training Durations"). Without a
plateau the cooldown starts at step `--max_steps / (1 + --cooldown)`, so
every run ends with one, by about `--max_steps`. The parameters of the best
evaluation are kept and shipped.

A checkpoint (orbax, checksummed, signed by every setting that changes the
result and the corpus fingerprint; `experiments/checkpoint.py`) is written
to `--workdir` every `--checkpoint_every_s` seconds, on SIGTERM or SIGINT
(then the process exits), and at the end. Running the same command again
continues exactly where the checkpoint left off; a checkpoint of other
settings or another corpus is refused. When the run has ended, the command
writes the best parameters and their sidecar to `--export`
(`experiments/lm/shipped.py`); on a finished work directory it only
exports again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from experiments import checkpoint
from experiments import cli
from experiments import configs
from experiments.lm import data
from experiments.lm import model as lm
from experiments.lm import pretrain as pretrain_lib
from experiments.lm import shipped
from experiments.lm import train as train_lib
from experiments.lm.methods import Decoder

# Bumped whenever the same settings would train differently.
_FORMAT = 1
# Fields that do not change the trained weights (left out of the signature).
_OPERATIONAL = ("workdir", "export", "checkpoint_every_s", "log_every", "progress")


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of the pretraining, each a flag."""

  corpus: str = data.PYTHON_SOURCE  # Training and validation corpus (data.load).
  context: int = 128  # Bytes the decoder reads.
  d_model: int = 192  # Decoder width.
  n_layers: int = 4  # Decoder layers.
  n_heads: int = 4  # Query heads.
  n_kv_heads: int = 2  # Key/value heads (grouped-query attention).
  d_ff: int = 768  # MLP hidden width.
  batch_size: int = 32  # Training windows per step.
  learning_rate: float = 2e-3  # Peak (and constant-phase) learning rate.
  warmup_steps: int = 200  # Linear warmup from 0 to the peak.
  b2: float = 0.95  # Adam's second-moment decay.
  weight_decay: float = 0.1  # Decoupled, on every parameter but scales and biases.
  clip: float = 1.0  # Largest global gradient norm.
  eval_every: int = 150  # Steps between validation evaluations.
  eval_windows: int = 1024  # Validation windows (evenly spaced, fixed).
  window: int = 3  # Plateau: evaluations the improvement is measured over.
  threshold: float = 0.01  # Plateau: least improvement in bits/byte over them.
  cooldown: float = 0.2  # Linear decay to 0 over this fraction of the steps so far.
  max_steps: int = 4000  # The run ends by about this step, plateau or not.
  seed: int = 0  # Initialisation and data order.
  workdir: str = "workdir/lm_plateau"  # Checkpoints and the log of the run.
  export: str = (
    shipped.DEFAULT_PATH
  )  # Where the best parameters go at the end ("" for nowhere).
  checkpoint_every_s: float = 300.0  # Seconds between checkpoints.
  log_every: int = 50  # Steps between training-loss lines.
  progress: bool = True  # Print progress.

  def validate(self) -> None:
    """Raises ValueError naming the flag and its allowed range."""
    cli.check_integers(
      self,
      {
        "context": 1,
        "d_model": 1,
        "n_layers": 1,
        "n_heads": 1,
        "n_kv_heads": 1,
        "d_ff": 1,
        "batch_size": 1,
        "warmup_steps": 1,
        "eval_every": 1,
        "eval_windows": 1,
        "window": 1,
        "max_steps": 2,
        "seed": 0,
        "log_every": 1,
      },
    )
    for name in ("learning_rate", "clip", "cooldown", "checkpoint_every_s"):
      cli.check_rate(name, getattr(self, name))
    for name in ("threshold", "weight_decay"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"--{name} must be finite and >= 0, got {value}.")
    if not 0 <= self.b2 < 1:
      raise ValueError(f"--b2 must be in [0, 1), got {self.b2}.")
    if self.corpus not in (*data.CORPORA, data.PYTHON_SOURCE):
      raise ValueError(f"--corpus {self.corpus!r} is not a corpus of data.load.")
    if not self.workdir.strip():
      raise ValueError("--workdir must name a directory, got an empty string.")
    try:
      model_config(self)
    except ValueError as e:
      raise ValueError(f"Model flags: {e}") from None


def model_config(cfg: Config) -> lm.Config:
  """The decoder trained (scanned layers, float32): the study's own reading
  of the same flags."""
  return pretrain_lib.model_config(cfg)


def settings(cfg: Config) -> dict[str, Any]:
  """Everything that changes the trained weights: the flags that do, the
  model, and the corpus fingerprint."""
  flags = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _OPERATIONAL}
  return {
    "format": _FORMAT,
    **flags,
    "model": dataclasses.asdict(model_config(cfg)),
    "data": data.fingerprint((cfg.corpus,)),
  }


def command(cfg: Config) -> str:
  """The command line that runs `cfg`, every setting spelled out."""
  parts = ["python", "-m", "experiments.lm.plateau"]
  for f in dataclasses.fields(cfg):
    if f.name in ("export", "progress"):
      continue
    parts += [f"--{f.name}", str(getattr(cfg, f.name))]
  return shlex.join(parts)


def plateaued(curve: list[float], window: int, threshold: float) -> bool:
  """Whether the best of the last `window` values of `curve` (bits/byte, one
  per evaluation) improves on the best before them by less than `threshold`.

  >>> plateaued([3.0, 2.0, 1.99, 1.98], window=2, threshold=0.05)
  True
  >>> plateaued([3.0, 2.0, 1.99, 1.9], window=2, threshold=0.05)
  False
  """
  if len(curve) <= window:
    return False
  return min(curve[:-window]) - min(curve[-window:]) < threshold


def cooldown_steps(cfg: Config, start: int) -> int:
  """Steps of the cooldown that starts at step `start`."""
  return max(1, round(cfg.cooldown * start))


def learning_rate(cfg: Config, step: int, cooldown_start: int | None) -> float:
  """The learning rate of update `step` (0 for the first): linear warmup to
  the peak, constant, then from `cooldown_start` a linear decay reaching 0
  at the cooldown's end.

  >>> cfg = Config(learning_rate=1.0, warmup_steps=4, cooldown=0.5)
  >>> [learning_rate(cfg, t, None) for t in (0, 3, 9)]
  [0.25, 1.0, 1.0]
  >>> [round(learning_rate(cfg, t, 10), 6) for t in (10, 12, 14)]
  [1.0, 0.6, 0.2]
  """
  warm = cfg.learning_rate * min(1.0, (step + 1) / cfg.warmup_steps)
  if cooldown_start is None or step < cooldown_start:
    return warm
  return cfg.learning_rate * (
    1.0 - (step - cooldown_start) / cooldown_steps(cfg, cooldown_start)
  )


def optimizer(cfg: Config) -> optax.GradientTransformation:
  """Clipping, Adam and decoupled weight decay; the caller scales by -lr."""

  def decayed(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: str(path[-1].key) not in ("scale", "bias"), params
    )

  return optax.chain(
    optax.clip_by_global_norm(cfg.clip),
    optax.scale_by_adam(b1=0.9, b2=cfg.b2, eps=1e-8),
    optax.add_decayed_weights(cfg.weight_decay, mask=decayed),
  )


def _signature(cfg: Config, state: Any) -> dict[str, Any]:
  run = types.SimpleNamespace(name="plateau", components=None)
  return checkpoint.signature(
    run, state, settings(cfg), seed=cfg.seed, task=f"lm pretraining on {cfg.corpus}"
  )


def train(
  cfg: Config,
  log: Callable[..., None] = print,
  should_stop: Callable[[int], bool] = lambda step: False,
  evaluate: Callable[[Any, int], float] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains from the newest checkpoint in `cfg.workdir` (or from scratch).

  Args:
    cfg: The run.
    log: Called with progress lines.
    should_stop: Called with the step after each update; when it says True,
      a checkpoint is written and the function returns (the run is
      `"interrupted"` and resumes from there).
    evaluate: `evaluate(params, step)` -> validation bits/byte; the fixed
      validation windows by default (tests give a curve of their own).

  Returns:
    `(best parameters, progress)`; `progress["stopped"]` is `"plateau"` or
    `"max_steps"` (which started the cooldown) when the run has ended, or
    `"interrupted"`.
  """
  decoder = Decoder(model_config(cfg))
  corpus = data.load(cfg.corpus)
  batches = data.train_batches(
    corpus.splits["train"],
    context=cfg.context,
    batch_size=cfg.batch_size,
    seed=cfg.seed,
  )
  if evaluate is None:
    windows = data.eval_windows(
      corpus.splits["validation"], context=cfg.context, max_windows=cfg.eval_windows
    )

    def evaluate(params, step):
      return train_lib.bits_per_byte(decoder, params, windows)

  tx = optimizer(cfg)

  @jax.jit
  def update(params, opt_state, batch, lr):
    nats, grads = jax.value_and_grad(lambda p: lm.loss(decoder(p), batch)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, nats

  params = decoder.init(cfg.seed)
  state = {"params": params, "opt_state": tx.init(params), "best": params}
  ckpts = checkpoint.Checkpoints(cfg.workdir, _signature(cfg, state), every=1)
  found = ckpts.resume(state)
  if found is None:
    progress = {
      "step": 0,
      "curve": [],  # [step, validation bits/byte] per evaluation.
      "losses": [],  # [step, training bits/byte of that step's batch].
      "best_step": None,
      "best_bpb": None,
      "cooldown_start": None,
      "stopped_by": None,  # What started the cooldown: "plateau" or "max_steps".
      "stopped": None,
      "wall_s": 0.0,  # Summed over the invocations.
      "invocations": 0,
    }
  else:
    state, progress = found
    progress = {k: v for k, v in progress.items() if not k.endswith("checksum")}
    progress.pop("signature", None)
    log(f"resumed at step {progress['step']} from {ckpts.dir}")
  progress["invocations"] += 1
  start, wall0 = time.monotonic(), progress["wall_s"]
  saved_at, last_save = progress["step"], time.monotonic()

  def save(t):
    nonlocal saved_at, last_save
    progress["wall_s"] = wall0 + time.monotonic() - start
    if t != saved_at:
      ckpts.save(t, state, progress)
      saved_at, last_save = t, time.monotonic()

  forced = int(cfg.max_steps / (1 + cfg.cooldown))
  params, opt_state = state["params"], state["opt_state"]
  try:
    while progress["stopped"] in (None, "interrupted"):
      progress["stopped"] = None
      t, cs = progress["step"], progress["cooldown_start"]
      lr = np.float32(learning_rate(cfg, t, cs))
      params, opt_state, nats = update(params, opt_state, batches[t], lr)
      t += 1
      progress["step"] = t
      if t % cfg.log_every == 0:
        progress["losses"].append([t, float(nats) / math.log(2)])
        log(f"step {t}: train {progress['losses'][-1][1]:.4f} bits/byte, lr {lr:.3g}")
      end = None if cs is None else cs + cooldown_steps(cfg, cs)
      if t % cfg.eval_every == 0 or t == end:
        bpb = float(evaluate(params, t))
        progress["curve"].append([t, bpb])
        if progress["best_bpb"] is None or bpb < progress["best_bpb"]:
          progress["best_step"], progress["best_bpb"] = t, bpb
          state["best"] = params
        log(
          f"step {t}: validation {bpb:.4f} bits/byte (best {progress['best_bpb']:.4f})"
        )
        values = [v for _, v in progress["curve"]]
        if (
          cs is None
          and t >= cfg.warmup_steps
          and plateaued(values, cfg.window, cfg.threshold)
        ):
          progress["cooldown_start"], progress["stopped_by"] = t, "plateau"
          log(f"step {t}: plateau; cooling down for {cooldown_steps(cfg, t)} steps")
      if progress["cooldown_start"] is None and t >= forced:
        progress["cooldown_start"], progress["stopped_by"] = t, "max_steps"
        log(
          f"step {t}: no plateau by then; cooling down for {cooldown_steps(cfg, t)} steps"
        )
      state["params"], state["opt_state"] = params, opt_state
      if end is not None and t >= end:
        progress["stopped"] = progress["stopped_by"]
        save(t)
        log(
          f"done at step {t}: best {progress['best_bpb']:.4f} bits/byte at step {progress['best_step']}"
        )
      elif should_stop(t):
        progress["stopped"] = "interrupted"
        save(t)
        log(f"interrupted at step {t}; checkpoint in {ckpts.dir}")
        break
      elif time.monotonic() - last_save >= cfg.checkpoint_every_s:
        save(t)
  finally:
    ckpts.close()
  return state["best"], progress


def finish(
  cfg: Config, best: dict[str, Any], progress: dict[str, Any]
) -> dict[str, Any]:
  """Writes the best parameters of an ended run and their sidecar to `cfg.export`."""
  decoder = Decoder(model_config(cfg))
  corpus = data.load(cfg.corpus)
  test = data.eval_windows(
    corpus.splits["test"], context=cfg.context, max_windows=4 * cfg.eval_windows
  )
  record = {
    "command": command(cfg),
    "wall_s": progress["wall_s"],
    "invocations": progress["invocations"],
    "model": dataclasses.asdict(model_config(cfg)),
    "settings": settings(cfg),
    "corpus": data.fingerprint((cfg.corpus,)),
    "packages": data.installed_packages() if cfg.corpus == data.PYTHON_SOURCE else [],
    "curve": progress["curve"],
    "best": {"step": progress["best_step"], "bits_per_byte": progress["best_bpb"]},
    "stopped": {
      "by": progress["stopped"],
      "cooldown_start": progress["cooldown_start"],
      "step": progress["step"],
    },
    "test_bits_per_byte": {
      "windows": len(test),
      "bits_per_byte": float(train_lib.bits_per_byte(decoder, best, test)),
    },
  }
  return shipped.write(cfg.export, best, record)


def run(cfg: Config, should_stop: Callable[[int], bool] = lambda step: False):
  """Checks `cfg`, trains (or resumes) and, when the run has ended, exports."""
  cfg = dataclasses.replace(cfg, workdir=os.path.expanduser(cfg.workdir))
  cfg.validate()
  begin = time.perf_counter()

  def log(*args):
    if cfg.progress:
      minutes, seconds = divmod(int(time.perf_counter() - begin), 60)
      print(f"[{minutes:02d}:{seconds:02d}]", *args, flush=True)

  log(f"corpus {cfg.corpus}: {json.dumps(data.load(cfg.corpus).summary())}")
  best, progress = train(cfg, log, should_stop)
  if progress["stopped"] == "interrupted" or not cfg.export:
    return progress
  record = finish(cfg, best, progress)
  log(f"wrote {cfg.export} (sha256 {record['sha256']}) and its sidecar")
  return record


def get_config(arg: str = "") -> Config:
  """The pretraining's settings: `""` its defaults, `"quick"` a tiny run for
  tests (a second or two on a CPU; it exports nothing)."""
  configs.check_arg(arg)
  if arg == "quick":
    return Config(
      corpus="pydoc",
      context=16,
      d_model=16,
      n_layers=2,
      n_heads=2,
      n_kv_heads=1,
      d_ff=32,
      batch_size=4,
      learning_rate=1e-2,
      warmup_steps=4,
      eval_every=5,
      eval_windows=16,
      window=2,
      threshold=0.05,
      max_steps=40,
      export="",
      checkpoint_every_s=1e9,
      progress=False,
    )
  return Config()


def parse(argv: list[str]) -> Config:
  """The Config of command-line flags (`cli.parse`: `--config`, then one flag
  per field, with its --help)."""
  return cli.parse(
    get_config,
    argv,
    __doc__.split("\n\n")[0],
    prog="python -m experiments.lm.plateau",
  )


def main(argv: list[str] | None = None):
  cfg = parse(sys.argv[1:] if argv is None else argv)
  stop = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.append(True))
  return run(cfg, should_stop=lambda step: bool(stop))


if __name__ == "__main__":
  main()
