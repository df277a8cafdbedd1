"""Times `tx.update` of `rgft()` against `optax.adam` on a ViT-B/16-sized tree.

The parameter tree has the layout and shapes of ViT-B/16 (about 86M parameters);
components are one per attention head (its query/key/value/output slices) and
one per block for the rest of the block. Both updates are jitted with donated
buffers and timed interleaved in one process; the ratio of medians is printed
and written to JSON.

  python benchmarks/bench_update.py --out benchmarks/results/update.json
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


def vit_b16_params(depth=12, width=768, heads=12, mlp=3072, classes=1000, patch=16):
  """A zero tree shaped like google-research/vision_transformer's ViT-B/16."""
  head_dim = width // heads
  z = jnp.zeros
  attn = {
    name: {"kernel": z((width, heads, head_dim)), "bias": z((heads, head_dim))}
    for name in ("query", "key", "value")
  }
  attn["out"] = {"kernel": z((heads, head_dim, width)), "bias": z((width,))}

  def block():
    return {
      "LayerNorm_0": {"scale": z((width,)), "bias": z((width,))},
      "MultiHeadDotProductAttention_1": attn,
      "LayerNorm_2": {"scale": z((width,)), "bias": z((width,))},
      "MlpBlock_3": {
        "Dense_0": {"kernel": z((width, mlp)), "bias": z((mlp,))},
        "Dense_1": {"kernel": z((mlp, width)), "bias": z((width,))},
      },
    }

  encoder = {f"encoderblock_{i}": block() for i in range(depth)}
  encoder["encoder_norm"] = {"scale": z((width,)), "bias": z((width,))}
  encoder["posembed_input"] = {"pos_embedding": z((1, 197, width))}
  return {
    "cls": z((1, 1, width)),
    "embedding": {"kernel": z((patch, patch, 3, width)), "bias": z((width,))},
    "Transformer": encoder,
    "head": {"kernel": z((width, classes)), "bias": z((classes,))},
  }


BLOCK = r"Transformer/encoderblock_(\d+)"
RULES = [
  (
    BLOCK + r"/MultiHeadDotProductAttention_1/(query|key|value)/kernel",
    r"block\1/head{head}",
    1,
  ),
  (
    BLOCK + r"/MultiHeadDotProductAttention_1/(query|key|value)/bias",
    r"block\1/head{head}",
    0,
  ),
  (BLOCK + r"/MultiHeadDotProductAttention_1/out/kernel", r"block\1/head{head}", 0),
  (BLOCK + r"/.*", r"block\1"),
  (r".*", None),
]


def time_updates(txs, params, error_map, repeats):
  """Median seconds per jitted update of each transformation, interleaved."""
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  steps, states = {}, {}
  for name, tx in txs.items():
    steps[name] = jax.jit(
      lambda g, s, p, tx=tx: tx.update(g, s, p, error_map=error_map), donate_argnums=1
    )
    states[name] = tx.init(params)
    for _ in range(2):  # Compile and warm up.
      updates, states[name] = steps[name](grads, states[name], params)
      jax.block_until_ready(updates)
      del updates
  times = {name: [] for name in txs}
  for r in range(repeats):
    for name in list(txs)[:: 1 if r % 2 == 0 else -1]:  # Alternate the order.
      start = time.perf_counter()
      updates, states[name] = steps[name](grads, states[name], params)
      jax.block_until_ready(updates)
      times[name].append(time.perf_counter() - start)
      del updates
  return {name: float(np.median(t)) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()

  params = vit_b16_params()
  comps = rgft_jax.Components.from_regex(params, RULES)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  error_map = {
    n: jnp.float32(v)
    for n, v in zip(comps.names, rng.uniform(size=len(comps)), strict=True)
  }
  txs = {
    "adam": optax.with_extra_args_support(optax.adam(1e-3)),
    "rgft": rgft_jax.rgft(1e-3, comps, warmup_steps=100),
  }
  median = time_updates(txs, params, error_map, args.repeats)
  ratio = median["rgft"] / median["adam"]
  print(
    f"params: {n_params / 1e6:.1f}M, components: {len(comps)}, repeats: {args.repeats}"
  )
  print(f"{'update':<8}{'median ms':>12}")
  for name, t in median.items():
    print(f"{name:<8}{t * 1e3:>12.1f}")
  print(f"ratio rgft/adam: {ratio:.3f}")
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
      "params": int(n_params),
      "components": len(comps),
      "repeats": args.repeats,
      "median_s": median,
      "ratio": ratio,
      "backend": jax.default_backend(),
      "devices": len(jax.devices()),
      "machine": platform.machine(),
      "jax": jax.__version__,
      "optax": optax.__version__,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
