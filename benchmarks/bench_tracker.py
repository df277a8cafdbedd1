"""Cost and faithfulness of ErrorTracker on a ViT.

1. XLA-counted FLOPs (compiled cost analysis) of a tracked RGFT train step
   against the plain Adam train step, for ViT-Ti/4 on 32x32 inputs.
2. Step time of both, jitted and timed interleaved in one process (median).
3. On a ViT-xs/4 trained for a few hundred steps on a synthetic 10-class image
   task, the Spearman rank correlation of each cheap attribution with exact
   ablation, over held-out batches, for block branches and for heads.

  python benchmarks/bench_tracker.py --out benchmarks/results/tracker.json
"""

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

import rgft_jax
from experiments.vit import VisionTransformer


def synthetic_images(key, n, classes=10, size=32):
  """Class templates (smooth random patterns), randomly shifted, plus noise."""
  kl, ks, kn = jax.random.split(key, 3)
  coarse = jax.random.normal(
    jax.random.key(1234), (classes, 4, 4, 3)
  )  # Same for every split.
  templates = jax.image.resize(coarse, (classes, size, size, 3), "bilinear")
  labels = jax.random.randint(kl, (n,), 0, classes)
  shifts = jax.random.randint(ks, (n, 2), -4, 5)
  images = jax.vmap(lambda t, s: jnp.roll(t, s, axis=(0, 1)))(templates[labels], shifts)
  return images + 0.8 * jax.random.normal(kn, images.shape), labels


def make_loss(model):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def make_steps(model, params, x, select):
  loss_fn = make_loss(model)
  adam = optax.adam(1e-3)
  tracker = rgft_jax.ErrorTracker(model, select=select)
  tx = rgft_jax.rgft(1e-3, tracker.components(params, x), warmup_steps=100)

  def plain(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  def tracked(params, state, x, y):
    loss, grads, error_map = tracker.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, error_map=error_map)
    return optax.apply_updates(params, updates), state, loss

  return {
    "plain": (plain, adam.init(params)),
    f"rgft_{select}": (tracked, tx.init(params)),
  }


def cost_and_time(repeats, batch):
  model = VisionTransformer(10, patch=4, size="Ti")
  x, y = synthetic_images(jax.random.key(0), batch)
  params = model.init(jax.random.key(1), x[:1])["params"]
  steps = make_steps(model, params, x, "branches")
  steps.update(
    {k: v for k, v in make_steps(model, params, x, "heads").items() if k != "plain"}
  )
  compiled, states, flops = {}, {}, {}
  for name, (fn, state) in steps.items():
    compiled[name] = jax.jit(fn).lower(params, state, x, y).compile()
    flops[name] = rgft_jax.compiled_cost(compiled[name])[0]
    states[name] = state
    for _ in range(2):
      jax.block_until_ready(compiled[name](params, state, x, y))
  times = {name: [] for name in steps}
  names = list(steps)
  for r in range(repeats):
    for name in names[r % len(names) :] + names[: r % len(names)]:  # Rotate the order.
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](params, states[name], x, y))
      times[name].append(time.perf_counter() - start)
  median = {name: float(np.median(t)) for name, t in times.items()}
  return flops, median


def faithfulness(train_steps, eval_batches, batch):
  model = VisionTransformer(10, patch=4, size="xs")
  x, y = synthetic_images(jax.random.key(2), train_steps * batch)
  params = model.init(jax.random.key(3), x[:1])["params"]
  loss_fn = make_loss(model)
  adam = optax.adam(1e-3)
  state = adam.init(params)

  @jax.jit
  def train(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(train_steps):
    sl = slice(i * batch, (i + 1) * batch)
    params, state = train(params, state, x[sl], y[sl])
  xt, yt = synthetic_images(jax.random.key(4), eval_batches * batch)
  logits = model.apply({"params": params}, xt)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == yt))

  result = {"train_steps": train_steps, "test_accuracy": accuracy}
  for select in ("branches", "heads"):
    maps = {}
    for method in ("norm_product", "taylor", "ablation"):
      tracker = rgft_jax.ErrorTracker(model, select=select, method=method)
      fn = jax.jit(tracker.value_and_grad(loss_fn))
      per_batch = []
      for b in range(eval_batches):
        sl = slice(b * batch, (b + 1) * batch)
        _, _, error_map = fn(params, xt[sl], yt[sl])
        per_batch.append(error_map)
      names = sorted(per_batch[0])
      maps[method] = np.mean([[float(m[n]) for n in names] for m in per_batch], axis=0)
    ablation = maps["ablation"]
    result[select] = {
      "components": len(ablation),
      **{
        f"spearman_{m}_vs_ablation": float(stats.spearmanr(maps[m], ablation).statistic)
        for m in ("norm_product", "taylor")
      },
      **{
        f"spearman_{m}_vs_abs_ablation": float(
          stats.spearmanr(maps[m], np.abs(ablation)).statistic
        )
        for m in ("norm_product", "taylor")
      },
    }
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--train_steps", type=int, default=300)
  parser.add_argument("--eval_batches", type=int, default=8)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()

  flops, median = cost_and_time(args.repeats, args.batch)
  print(
    f"ViT-Ti/4, 32x32, batch {args.batch}; median of {args.repeats} interleaved steps"
  )
  print(f"{'step':<16}{'GFLOPs':>10}{'x plain':>10}{'ms':>10}{'x plain':>10}")
  for name in flops:
    print(
      f"{name:<16}{flops[name] / 1e9:>10.3f}{flops[name] / flops['plain']:>10.4f}"
      f"{median[name] * 1e3:>10.1f}{median[name] / median['plain']:>10.3f}"
    )
  faith = faithfulness(args.train_steps, args.eval_batches, args.batch)
  print(
    f"\nViT-xs/4 after {faith['train_steps']} steps, test accuracy {faith['test_accuracy']:.3f}"
  )
  print(f"{'select':<10}{'n':>4}  Spearman with ablation (signed | absolute)")
  for select in ("branches", "heads"):
    r = faith[select]
    print(
      f"{select:<10}{r['components']:>4}  norm_product {r['spearman_norm_product_vs_ablation']:+.3f}"
      f" | {r['spearman_norm_product_vs_abs_ablation']:+.3f}   taylor "
      f"{r['spearman_taylor_vs_ablation']:+.3f} | {r['spearman_taylor_vs_abs_ablation']:+.3f}"
    )
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {
      "step": {"model": "ViT-Ti/4", "batch": args.batch, "repeats": args.repeats},
      "flops": flops,
      "median_s": median,
      "flops_ratio": {k: v / flops["plain"] for k, v in flops.items()},
      "time_ratio": {k: v / median["plain"] for k, v in median.items()},
      "faithfulness": faith,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
  main()
