"""What detaching block branches saves per train step, from compiling alone.

ViT-B/16 on 224x224 inputs, 10 classes, batch 32, the 24 block branches
(attention and MLP of each block) as components. Nothing is trained or run:
parameters and optimizer state are abstract (`jax.eval_shape`), and every
figure is XLA's cost or memory analysis of a lowered or compiled step.

1. The unit: FLOPs of a plain full fine-tuning Adam step (no tracker).
2. `rgft_jax.detach_costs` of the RGFT step (`rgft_jax.detachable_step`): what
   detaching each branch alone saves (lowered), and how well savings add up.
3. For budgets 1.0, 0.7 and 0.5 of the unit, and the floor (everything
   detached): the variant a `Budget` allows per step when every branch has
   the same error (`best_within`), compiled, its FLOPs and peak memory next
   to the plain step's.
4. Per-head components (a smaller ViT): compiled FLOPs with one head of one
   block detached, all heads of that block, and nothing.

  python benchmarks/bench_sparse.py --out benchmarks/results/sparse.json
"""

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rgft_jax
from experiments.vit import VisionTransformer
from rgft_jax import best_within
from rgft_jax import compiled_cost


def setup(args, size, select):
  """Model, abstract inputs and parameters, tracker, components, loss."""
  model = VisionTransformer(num_classes=args.classes, patch=args.patch, size=size)
  x = jax.ShapeDtypeStruct((args.batch, args.image, args.image, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model, select=select)
  comps = tracker.components(params, x)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, x, y, tracker, comps, loss_fn


def plain_step(loss_fn, lr):
  """A full fine-tuning Adam step without tracking, and its optimizer."""
  adam = optax.adam(lr)

  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = adam.update(grads, state, params)
    return loss, optax.apply_updates(params, updates), state

  return step, adam


def compile_variant(step, detached, *args):
  """(compiled FLOPs, peak bytes, seconds) of `step` with `detached` detached."""
  tic = time.perf_counter()
  fn = lambda *a: step(*a, detached=frozenset(detached))  # noqa: E731
  flops, peak = compiled_cost(jax.jit(fn).lower(*args).compile())
  return flops, peak, time.perf_counter() - tic


def short(name):
  """`Transformer/encoderblock_3/MlpBlock_3` -> `3/mlp`."""
  parts = name.split("/")
  block = parts[1].removeprefix("encoderblock_")
  kind = "attn" if parts[2].startswith("MultiHead") else "mlp"
  return "/".join([block, kind, *parts[3:]])


def branch_savings(args, lr):
  """Sections 1-3: the unit, per-branch savings, budgeted variants."""
  params, x, y, tracker, comps, loss_fn = setup(args, args.size, "branches")
  names = comps.names
  plain, adam = plain_step(loss_fn, lr)
  adam_state = jax.eval_shape(adam.init, params)
  tic = time.perf_counter()
  lowered = jax.jit(plain).lower(params, adam_state, x, y)
  unit = rgft_jax.flops_of(plain, params, adam_state, x, y)
  plain_flops, plain_peak = compiled_cost(lowered.compile())
  plain_s = time.perf_counter() - tic
  print(
    f"plain Adam step: {plain_flops / 1e9:.1f} GFLOPs ({plain_s:.0f} s)", flush=True
  )

  tx = rgft_jax.rgft(lr, comps)
  state = jax.eval_shape(tx.init, params)
  step = rgft_jax.detachable_step(tracker, tx, loss_fn, comps)
  tic = time.perf_counter()
  costs = rgft_jax.detach_costs(step, names, params, state, x, y)
  costs_s = time.perf_counter() - tic
  print(f"detach_costs: {len(names)} components ({costs_s:.0f} s)", flush=True)

  variants = [("RGFT, nothing detached", None, frozenset())]
  for b in args.budgets:
    trained = best_within(np.ones(len(names)), costs.saving, b * unit - costs.floor)
    detached = frozenset(n for i, n in enumerate(names) if i not in trained)
    variants.append((f"budget {b:g}", b, detached))
  variants.append(("floor (all detached)", costs.floor / unit, frozenset(names)))
  rows, compiled = [], {}
  for label, budget, detached in variants:
    if detached not in compiled:
      compiled[detached] = compile_variant(step, detached, params, state, x, y)
      print(f"{label}: {compiled[detached][0] / 1e9:.1f} GFLOPs", flush=True)
    flops, peak, seconds = compiled[detached]
    rows.append(
      {
        "variant": label,
        "budget": budget,
        "detached": [short(n) for n in names if n in detached],
        "trained_branches": len(names) - len(detached),
        "predicted_flops": costs.step(detached),
        "compiled_flops": flops,
        "vs_plain": flops / plain_flops,
        "peak_bytes": peak,
        "peak_vs_plain": peak / plain_peak,
        "compile_s": seconds,
      }
    )
  return {
    "model": f"ViT-{args.size}/{args.patch}",
    "components": len(names),
    "unit_lowered_flops": unit,
    "plain": {"compiled_flops": plain_flops, "peak_bytes": plain_peak, "s": plain_s},
    "rgft_lowered_flops": costs.full,
    "floor_lowered_flops": costs.floor,
    "saving": {short(n): s for n, s in zip(names, costs.saving.tolist(), strict=True)},
    "saving_vs_unit": {
      short(n): s / unit for n, s in zip(names, costs.saving.tolist(), strict=True)
    },
    "additivity_error": costs.additivity_error,
    "additivity_checks": [
      {"detached": len(d), "measured": m, "predicted": p} for d, m, p in costs.checks
    ],
    "detach_costs_s": costs_s,
    "variants": rows,
  }


def head_savings(args, lr):
  """Section 4: per-head components, one head against the whole block."""
  params, x, y, tracker, comps, loss_fn = setup(args, args.heads_size, "heads")
  tx = rgft_jax.rgft(lr, comps)
  state = jax.eval_shape(tx.init, params)
  step = rgft_jax.detachable_step(tracker, tx, loss_fn, comps)
  block = f"encoderblock_{args.heads_block}/"
  heads = [n for n in comps.names if block in n]
  rows = []
  for label, detached in (
    ("nothing detached", ()),
    (f"one head of block {args.heads_block}", heads[:1]),
    (f"all {len(heads)} heads of block {args.heads_block}", heads),
  ):
    flops, peak, seconds = compile_variant(step, detached, params, state, x, y)
    rows.append(
      {
        "variant": label,
        "detached": len(detached),
        "compiled_flops": flops,
        "peak_bytes": peak,
        "compile_s": seconds,
      }
    )
    print(f"heads, {label}: {flops / 1e9:.2f} GFLOPs", flush=True)
  for r in rows:
    r["saved_flops"] = rows[0]["compiled_flops"] - r["compiled_flops"]
    r["saving_vs_nothing"] = r["saved_flops"] / rows[0]["compiled_flops"]
  return {"model": f"ViT-{args.heads_size}/{args.patch}", "variants": rows}


def print_tables(args, branches, heads):
  unit = branches["unit_lowered_flops"]
  print(
    f"\n{branches['model']}, {args.image}x{args.image}x3, {args.classes} classes, "
    f"batch {args.batch}; unit = plain Adam step, "
    f"{unit / 1e9:.1f} GFLOPs (lowered)\n"
  )
  print(
    f"RGFT step, nothing detached: {branches['rgft_lowered_flops'] / unit:.4f} of the "
    f"unit; everything detached (floor): {branches['floor_lowered_flops'] / unit:.4f}; "
    f"additivity error {branches['additivity_error']:.2e}\n"
  )
  print("| block | attention saving / unit | MLP saving / unit |")
  print("|---|---|---|")
  frac = branches["saving_vs_unit"]
  for b in sorted({int(k.split("/")[0]) for k in frac}):
    print(f"| {b} | {frac[f'{b}/attn']:.4f} | {frac[f'{b}/mlp']:.4f} |")
  plain = branches["plain"]
  print(
    "\n| variant | branches detached (attn, mlp) | GFLOPs (compiled) | vs plain | "
    "predicted vs unit | peak MiB | peak vs plain |"
  )
  print("|---|---|---|---|---|---|---|")
  print(
    f"| plain Adam step | - | {plain['compiled_flops'] / 1e9:.1f} | 1.000 | 1.000 | "
    f"{plain['peak_bytes'] / 2**20:.0f} | 1.000 |"
  )
  for r in branches["variants"]:
    attn = sum(d.endswith("/attn") for d in r["detached"])
    mlp = len(r["detached"]) - attn
    print(
      f"| {r['variant']} | {attn}, {mlp} | {r['compiled_flops'] / 1e9:.1f} "
      f"| {r['vs_plain']:.3f} | {r['predicted_flops'] / unit:.3f} | "
      f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_vs_plain']:.3f} |"
    )
  print(f"\n{heads['model']}, select='heads', same inputs\n")
  print(
    "| variant | heads detached | GFLOPs (compiled) | GFLOPs saved | "
    "saved / nothing detached | peak MiB |"
  )
  print("|---|---|---|---|---|---|")
  for r in heads["variants"]:
    print(
      f"| {r['variant']} | {r['detached']} | {r['compiled_flops'] / 1e9:.3f} | "
      f"{r['saved_flops'] / 1e9:+.4f} | {r['saving_vs_nothing']:+.5f} | "
      f"{r['peak_bytes'] / 2**20:.0f} |"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", default="B", help="ViT size of sections 1-3.")
  parser.add_argument("--patch", type=int, default=16)
  parser.add_argument("--image", type=int, default=224, help="Image side, pixels.")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument(
    "--budgets", type=float, nargs="+", default=[1.0, 0.7, 0.5], help="Of the unit."
  )
  parser.add_argument("--heads_size", default="Ti", help="ViT size of section 4.")
  parser.add_argument("--heads_block", type=int, default=6, help="Its block.")
  parser.add_argument(
    "--out", type=pathlib.Path, default="benchmarks/results/sparse.json"
  )
  args = parser.parse_args()

  tic = time.perf_counter()
  branches = branch_savings(args, 1e-3)
  heads = head_savings(args, 1e-3)
  print_tables(args, branches, heads)
  wall = time.perf_counter() - tic
  print(f"\nwall time {wall:.0f} s")
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
      "args": {
        k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()
      },
      "branches": branches,
      "heads": heads,
      "wall_s": wall,
      "backend": jax.default_backend(),
      "machine": platform.machine(),
      "jax": jax.__version__,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
