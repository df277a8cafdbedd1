"""Runtime gating against compiled variants: step wall time and predicted FLOPs.

Two models, each looped and scanned over layers: ViT-B/16 (the model of
`bench_sparse.py`; smaller images and batch here so that a CPU step takes
about a second) and the byte-level LM decoder (NNX, sized so that a step takes
at least half a second). Components are the residual branches. For each
fraction of components detached (0, 0.25, 0.5, 0.75, 1; a fixed random set of
each size), the RGFT train step (`rgft_jax.detachable_step`) runs in

* `runtime`: one compiled step for every set, the set a boolean array;
* `recompute`: the same, gated calls keeping no residuals (a trained one
  recomputes its forward pass);
* `runtime_mask`: `runtime` with `hold="mask"`: every parameter's optimizer
  update computed, held ones selected back (`runtime` skips them,
  `hold="skip"`);
* `compiled`: one compiled step per set (`stop_gradient` chosen in Python).

`plain` is the tracked step with nothing detached and no gating. Timings are
medians over interleaved repeats (every configuration once per round), so
the machine's load moves them alike; one model state runs through all of
them, donated to each step as a training loop does. Predicted FLOPs are
`rgft_jax.detach_costs(...).step(set) / full` (per-layer shares of a scanned
tap from detaching it in every layer); XLA's count of a runtime step includes
both branches of each `cond`, so only the prediction can be charged.

  python benchmarks/bench_runtime.py --out benchmarks/results/runtime.json

The same script runs unchanged on a GPU (`jax.devices()` says where it ran).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rgft_jax
from experiments.lm import model as lm_model
from experiments.vit import VisionTransformer
from experiments.vit import scan_params

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Runtime gating's variants: (column, recompute, hold).
RUNTIME_MODES = (
  ("runtime", False, "skip"),
  ("recompute", True, "skip"),
  ("runtime_mask", False, "mask"),
)


def vit_case(args, scan: bool):
  """(comps, make_step(recompute), state args, data args) for the ViT."""
  model = VisionTransformer(num_classes=10, patch=16, size=args.vit_size, scan=scan)
  rng = np.random.default_rng(0)
  x = jnp.asarray(
    rng.normal(size=(args.vit_batch, args.image, args.image, 3)), jnp.float32
  )
  y = jnp.asarray(rng.integers(0, 10, args.vit_batch), jnp.int32)
  loop = VisionTransformer(num_classes=10, patch=16, size=args.vit_size)
  params = loop.init(jax.random.key(0), x)["params"]
  params = scan_params(params, scan=scan)
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(params, x)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = rgft_jax.rgft(1e-4, comps)

  def make_step(recompute, hold):
    return rgft_jax.detachable_step(
      tracker, tx, loss_fn, comps, recompute=recompute, hold=hold
    )

  return comps, make_step, (params, tx.init(params)), (x, y)


def lm_case(args, scan: bool):
  """The same for the LM decoder (NNX), as a pure function of its state."""
  cfg = lm_model.Config(
    d_model=args.lm_width,
    n_layers=args.lm_layers,
    n_heads=8,
    n_kv_heads=4,
    d_ff=4 * args.lm_width,
    max_len=args.lm_context,
    scan_layers=scan,
  )
  model = lm_model.Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(
    rng.integers(0, 256, (args.lm_batch, args.lm_context + 1)), jnp.int32
  )
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(model, tokens[:, :-1])
  tx = rgft_jax.rgft(1e-4, comps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def make_step(recompute, hold):
    nnx_step = rgft_jax.detachable_step(
      tracker,
      None,
      lm_model.loss,
      comps,
      has_aux=True,
      recompute=recompute,
      hold=hold,
    )

    def step(state, tokens, detached=frozenset()):
      model, optimizer = nnx.merge(graphdef, state)
      out = nnx_step(model, optimizer, tokens, detached=detached)
      return out, nnx.state((model, optimizer))

    step.components = comps  # Its layer groups: detach_costs' default.
    return step

  return comps, make_step, (state,), (tokens,)


def run_case(label, case, args):
  comps, make_step, state, data = case
  step = make_step(False, "skip")
  names = comps.names
  n = len(names)
  costs = rgft_jax.detach_costs(step, names, *state, *data)
  order = np.random.default_rng(args.seed).permutation(n)
  sets = {f: frozenset(names[i] for i in order[: round(f * n)]) for f in FRACTIONS}
  flags = {f: jnp.asarray([m in sets[f] for m in names]) for f in FRACTIONS}
  k = len(state)  # Leading arguments that are the model's state (donated).
  configs = {}  # (mode, fraction) -> compiled step of (*state, *data).
  extra = {}  # (mode, fraction) -> trailing arguments (the runtime flags).
  peak = {}  # (mode, fraction) -> peak bytes of the compiled step.
  tic = time.perf_counter()

  def compile_(fn, *more):
    jitted = jax.jit(fn, donate_argnums=tuple(range(k)))
    return jitted.lower(*state, *data, *more).compile()

  plain = compile_(lambda *a: step(*a, detached=frozenset()))
  configs[("plain", 0.0)], extra[("plain", 0.0)] = plain, ()
  for mode, recompute, hold in RUNTIME_MODES:
    gated = make_step(recompute, hold)
    compiled = compile_(lambda *a, g=gated: g(*a[:-1], detached=a[-1]), flags[0.0])
    for f in FRACTIONS:
      configs[(mode, f)], extra[(mode, f)] = compiled, (flags[f],)
  for f in FRACTIONS:
    configs[("compiled", f)] = compile_(lambda *a, d=sets[f]: step(*a, detached=d))
    extra[("compiled", f)] = ()
  peak = {key: rgft_jax.peak_bytes(c) for key, c in configs.items()}
  compile_s = time.perf_counter() - tic
  # One state runs through every configuration, each call donating it to the
  # next (as a training loop does), so held leaves can stay in place.
  state = jax.tree.map(jnp.copy, state)
  times = {key: [] for key in configs}
  for r in range(args.repeats + 1):  # The first round warms up.
    for key, fn in configs.items():
      tic = time.perf_counter()
      out = fn(*state, *data, *extra[key])
      jax.block_until_ready(out)
      if r:
        times[key].append(time.perf_counter() - tic)
      state = out[-k:]
  medians = {key: statistics.median(v) for key, v in times.items()}
  base = medians[("plain", 0.0)]
  rows = []
  for (mode, f), seconds in medians.items():
    predicted = costs.step(sets[f]) / costs.full
    rows.append(
      {
        "case": label,
        "mode": mode,
        "fraction_detached": f,
        "predicted_flops_vs_full": predicted,
        "seconds": seconds,
        "time_vs_plain": seconds / base,
        "time_minus_flops": seconds / base - predicted,
        "peak_bytes": peak[(mode, f)],
        "peak_vs_plain": peak[(mode, f)] / peak[("plain", 0.0)],
      }
    )
    print(
      f"{label:10s} {mode:9s} {f:5.2f}  flops {predicted:5.3f}  "
      f"{seconds * 1e3:8.1f} ms  time {seconds / base:5.3f}  "
      f"peak {peak[(mode, f)] / peak[('plain', 0.0)]:5.3f}",
      flush=True,
    )
  return {
    "case": label,
    "components": n,
    "full_lowered_flops": costs.full,
    "additivity_error": costs.additivity_error,
    "compile_s": compile_s,
    "rows": rows,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vit_size", default="B", help="ViT size (B = ViT-B/16).")
  parser.add_argument("--image", type=int, default=64, help="Image side (pixels).")
  parser.add_argument("--vit_batch", type=int, default=8, help="ViT batch size.")
  parser.add_argument("--lm_width", type=int, default=256, help="LM d_model.")
  parser.add_argument("--lm_layers", type=int, default=8, help="LM layers.")
  parser.add_argument("--lm_context", type=int, default=128, help="LM context.")
  parser.add_argument("--lm_batch", type=int, default=16, help="LM batch size.")
  parser.add_argument("--repeats", type=int, default=7, help="Timed rounds.")
  parser.add_argument("--seed", type=int, default=0, help="Seed of the sets.")
  parser.add_argument("--models", default="vit,lm", help="Comma-separated.")
  parser.add_argument("--layouts", default="loop,scan", help="Comma-separated.")
  parser.add_argument("--out", type=pathlib.Path, help="JSON file to write.")
  args = parser.parse_args()
  results = []
  for name in args.models.split(","):
    for scan in [{"loop": False, "scan": True}[x] for x in args.layouts.split(",")]:
      make = {"vit": vit_case, "lm": lm_case}[name]
      label = f"{name}-{'scan' if scan else 'loop'}"
      results.append(run_case(label, make(args, scan), args))
  report = {
    "device": str(jax.devices()[0]),
    "platform": platform.platform(),
    "jax": jax.__version__,
    "args": {k: str(v) for k, v in vars(args).items()},
    "cases": results,
  }
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
