"""Times the optimizer's part of a runtime-gated step: holding detached blocks.

In runtime mode (`detached=` a boolean array) the held components keep their
parameters and optimizer state. `hold="mask"` (`rgft_jax.hold_masked`)
computes every parameter's update and then selects between old and new
values; `hold="skip"` (`rgft_jax.hold_skipped`, the default) updates a leaf
owned by one component inside a `lax.cond` that runs only when the component
trains. This benchmark times both against the plain update (nothing held) on
a ViT-B/16-shaped tree (about 86M parameters, one component per encoder
block), with `optax.adam`, Adam after global-norm clipping and
`rgft_jax.rgft`, for 0, half and all of the blocks held. The two hold modes' results are checked equal before timing.

With `--layout scan` the blocks' parameters are stacked over a leading layer
axis, as `nn.scan` stores them (big_vision's `scan=True`): a held block is
then a row of each stacked leaf, which both modes select back (`jnp.where`),
`hold="skip"` included; Adam only (`rgft`'s components would need the
layer axis).

Every step is jitted with donated parameters and optimizer state and timed
interleaved in one process; medians are printed with their ratio to the plain
update, and written to JSON.

  python benchmarks/bench_hold.py --out benchmarks/results/hold.json
"""

import argparse
import json
import pathlib
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rgft_jax
from benchmarks.bench_update import vit_b16_params
from experiments.vit import scan_params

FRACTIONS = (0.0, 0.5, 1.0)  # Share of the blocks held (detached).


def block_of(params, depth: int):
  """Per leaf: its encoder block, -1 for leaves outside the blocks, or, for a
  leaf stacked over the blocks (the scanned layout), each row's block as an
  index array of shape `[depth, 1, ...]`."""

  def which(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if "encoderblock/" in name:
      return np.arange(depth).reshape((depth,) + (1,) * (leaf.ndim - 1))
    m = re.search(r"encoderblock_(\d+)/", name)
    return int(m.group(1)) if m else -1

  return jax.tree_util.tree_map_with_path(which, params)


def _masks(blocks, held):
  return jax.tree.map(lambda b: False if np.ndim(b) == 0 and b < 0 else held[b], blocks)


def plain_step(tx, blocks, extra):
  def step(params, state, grads, held):
    del held
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


def masked_step(tx, blocks, extra):
  """Runtime mode with `hold="mask"`: every update computed, held blocks
  selected back (`rgft_jax.hold_masked`)."""

  def step(params, state, grads, held):
    updates, new = tx.update(grads, state, params, **extra)
    masks = _masks(blocks, held)
    updates, new = rgft_jax.hold_masked(tx, masks, updates, new, state)
    return optax.apply_updates(params, updates), new

  return step


def skipped_step(tx, blocks, extra):
  """Runtime mode's default, `hold="skip"` (`rgft_jax.hold_skipped`): a held
  block's leaves skip the optimizer's work."""

  def step(params, state, grads, held):
    masks = _masks(blocks, held)
    return rgft_jax.hold_skipped(tx, masks, grads, state, params, **extra)

  return step


STEPS = {"plain": plain_step, "masked": masked_step, "skipped": skipped_step}


def time_layout(args, layout, params, grads, blocks, optimizers, rng):
  """Rows of medians for one parameter layout: each optimizer, each fraction."""
  rows = []
  for opt, (tx, extra) in optimizers.items():
    steps = {n: make(tx, blocks, extra) for n, make in STEPS.items()}
    # Exactness: one step from the same start, half the blocks held.
    held = jnp.asarray(rng.permutation(args.depth) < args.depth // 2)
    ref = jax.jit(steps["masked"])(params, tx.init(params), grads, held)
    got = jax.jit(steps["skipped"])(params, tx.init(params), grads, held)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    jitted = {n: jax.jit(s, donate_argnums=(0, 1)) for n, s in steps.items()}
    for fraction in FRACTIONS:
      held = jnp.asarray(rng.permutation(args.depth) < round(fraction * args.depth))
      state = {n: (jax.tree.map(jnp.copy, params), tx.init(params)) for n in jitted}
      times = {n: [] for n in jitted}
      for r in range(args.repeats + 2):  # Two warm-up rounds.
        for n in list(jitted)[:: 1 if r % 2 == 0 else -1]:
          start = time.perf_counter()
          state[n] = jitted[n](*state[n], grads, held)
          jax.block_until_ready(state[n])
          if r >= 2:
            times[n].append(time.perf_counter() - start)
      median = {n: float(np.median(t)) for n, t in times.items()}
      rows.append(
        {
          "layout": layout,
          "optimizer": opt,
          "held": fraction,
          "median_s": median,
          "vs_plain": {n: median[n] / median["plain"] for n in median},
        }
      )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--depth", type=int, default=12, help="Encoder blocks.")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument(
    "--layouts", default="loop,scan", help="Comma-separated: loop and/or scan."
  )
  args = parser.parse_args()
  layouts = args.layouts.split(",")
  if not layouts or set(layouts) - {"loop", "scan"}:
    parser.error(f"--layouts must be some of loop,scan; got {args.layouts!r}.")

  looped = vit_b16_params(depth=args.depth)
  looped = jax.tree.map(lambda p: p + 0.5, looped)
  comps = rgft_jax.Components.from_regex(
    looped, [(r"Transformer/encoderblock_(\d+)/.*", r"block\1"), (r".*", None)]
  )
  rng = np.random.default_rng(0)
  error_map = {
    n: jnp.float32(v)
    for n, v in zip(comps.names, rng.uniform(size=len(comps)), strict=True)
  }
  rows = []
  for layout in layouts:
    params = scan_params(looped, scan=layout == "scan")
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    blocks = block_of(params, args.depth)
    optimizers = {"adam": (optax.adam(1e-3), {})}
    if layout == "loop":
      # Global-norm clipping: every leaf's update reads every gradient.
      clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
      optimizers["clipped_adam"] = (clipped, {})
      optimizers["rgft"] = (
        rgft_jax.rgft(1e-3, comps, warmup_steps=100),
        {"error_map": error_map},
      )
    rows += time_layout(args, layout, params, grads, blocks, optimizers, rng)

  n_params = sum(p.size for p in jax.tree.leaves(params))
  print(
    f"params: {n_params / 1e6:.1f}M in {args.depth} blocks, repeats: {args.repeats}"
  )
  print(
    f"{'layout':<8}{'optimizer':<10}{'held':>6}{'plain ms':>10}{'masked':>10}"
    f"{'skipped':>10}  (ratio to plain)"
  )
  for row in rows:
    m, v = row["median_s"], row["vs_plain"]
    print(
      f"{row['layout']:<8}{row['optimizer']:<10}{row['held']:>6.2f}"
      f"{m['plain'] * 1e3:>10.1f}{v['masked']:>10.2f}{v['skipped']:>10.2f}"
    )
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
      "params": int(n_params),
      "depth": args.depth,
      "repeats": args.repeats,
      "rows": rows,
      "backend": jax.default_backend(),
      "devices": len(jax.devices()),
      "machine": platform.machine(),
      "jax": jax.__version__,
      "optax": optax.__version__,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
