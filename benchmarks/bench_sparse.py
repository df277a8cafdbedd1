"""FLOPs per train step of sparse RGFT's frozen variants at real scale.

ViT-B/16 on 224x224 inputs (CIFAR-10 upsampled, 10 classes), block-branch
components, the RGFT step with the frozen components behind `stop_gradient`:
XLA's cost analysis of each compiled variant against the variant with nothing
frozen. From compiling alone (abstract parameters, nothing is run).

  python benchmarks/bench_sparse.py --out benchmarks/results/sparse.json
"""

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import optax

import rgft_jax
from experiments.methods import STEM
from experiments.vit import SIZES
from experiments.vit import VisionTransformer


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", default="B")
  parser.add_argument("--patch", type=int, default=16)
  parser.add_argument("--image", type=int, default=224)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--out", default="benchmarks/results/sparse.json")
  args = parser.parse_args()

  model = VisionTransformer(num_classes=10, patch=args.patch, size=args.size)
  x = jax.ShapeDtypeStruct((args.batch, args.image, args.image, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(params, x)
  tx = rgft_jax.rgft(1e-3, comps)
  state = jax.eval_shape(tx.init, params)
  freezer = rgft_jax.Freezer(comps, policy="prefix", stem=STEM)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  step = freezer.train_step(tracker, tx, loss_fn)
  depth = SIZES[args.size].depth
  blocks = [comps.names[2 * i : 2 * i + 2] for i in range(depth)]  # attn, mlp.
  variants = {"nothing frozen": frozenset()}
  for k in (depth // 4, depth // 2, 3 * depth // 4, depth):
    variants[f"any: top {k} blocks"] = frozenset(
      n for b in blocks[depth - k :] for n in b
    )
  for k in (depth // 4, depth // 2, 3 * depth // 4, depth):
    variants[f"prefix: bottom {k} blocks + stem"] = frozenset(
      n for b in blocks[:k] for n in b
    )

  rows = []
  for label, frozen in variants.items():
    tic = time.perf_counter()
    lowered = jax.jit(lambda *a, frozen=frozen: step(*a, frozen=frozen)).lower(
      params, state, x, y
    )
    analysis = lowered.compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    rows.append(
      {
        "variant": label,
        "frozen_components": len(frozen),
        "gflops": analysis["flops"] / 1e9,
        "compile_s": time.perf_counter() - tic,
      }
    )
    print(f"{label}: {rows[-1]['gflops']:.1f} GFLOPs", flush=True)
  full = rows[0]["gflops"]
  print(
    f"\nViT-{args.size}/{args.patch}, {args.image}x{args.image}, batch {args.batch}"
  )
  print("| variant | frozen components | GFLOPs per step | vs nothing frozen |")
  print("|---|---|---|---|")
  for r in rows:
    r["vs_full"] = r["gflops"] / full
    print(
      f"| {r['variant']} | {r['frozen_components']} | {r['gflops']:.1f} | "
      f"{r['vs_full']:.3f} |"
    )
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
