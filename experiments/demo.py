"""Fine-tunes a small residual Flax model with `rgft()` on data made here.

A model of three pre-norm residual MLP blocks is pretrained on one
classification task, then fine-tuned on a related one whose labels come from a
teacher that differs only in its last layer. The error map (norm product,
from `ErrorTracker`) and the multipliers are printed as fine-tuning goes.

  python -m experiments.demo
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rgft_jax


class MlpBlock(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.hidden)(x)))


class ResidualNet(nn.Module):
  width: int = 32
  depth: int = 6
  classes: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="embed")(x)
    for i in range(self.depth):
      x = x + MlpBlock(2 * self.width, name=f"block{i}")(
        nn.LayerNorm(name=f"norm{i}")(x)
      )
    return nn.Dense(self.classes, name="head")(nn.LayerNorm(name="final_norm")(x))


def teacher_labels(key, x, depth, shift_last):
  """Labels of a random deep teacher; `shift_last` redraws its last layer only."""
  keys = jax.random.split(key, depth + 1)
  h = x
  for k in keys[:-1]:
    h = jnp.tanh(
      h @ jax.random.normal(k, (h.shape[-1], h.shape[-1])) / np.sqrt(h.shape[-1])
    )
  last = keys[-1] if not shift_last else jax.random.fold_in(keys[-1], 1)
  return jnp.argmax(h @ jax.random.normal(last, (h.shape[-1], 4)), axis=-1)


def make_task(key, n, shift_last):
  x = jax.random.normal(key, (n, 16))
  return x, teacher_labels(jax.random.key(42), x, depth=3, shift_last=shift_last)


def loss_fn(model, params, x, y):
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model, params, x, y):
  return float(jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrain_steps", type=int, default=300)
  parser.add_argument("--finetune_steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--print_every", type=int, default=50)
  args = parser.parse_args()

  model = ResidualNet()
  xa, ya = make_task(jax.random.key(0), 4096, shift_last=False)
  xb, yb = make_task(jax.random.key(1), 4096, shift_last=True)
  xt, yt = make_task(jax.random.key(2), 2048, shift_last=True)
  params = model.init(jax.random.key(3), xa[:1])["params"]
  rng = np.random.default_rng(0)

  # Pretraining on task A with plain Adam.
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def pretrain_step(params, opt_state, x, y):
    grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(args.pretrain_steps):
    idx = rng.integers(0, len(xa), args.batch)
    params, opt_state = pretrain_step(params, opt_state, xa[idx], ya[idx])
  print(
    f"pretrained: task A accuracy {accuracy(model, params, xa, ya):.3f}, "
    f"task B test accuracy {accuracy(model, params, xt, yt):.3f}"
  )

  # Fine-tuning on task B with RGFT: the model code is untouched.
  tracker = rgft_jax.ErrorTracker(model, select="branches")
  comps = tracker.components(params, xb[:1])
  print("components:", ", ".join(comps.names))
  print("in no component (full updates):", ", ".join(comps.unassigned(params)))
  tx = rgft_jax.rgft(3e-3, comps, warmup_steps=args.finetune_steps // 2)
  opt_state = tx.init(params)

  @jax.jit
  def finetune_step(params, opt_state, x, y):
    loss, grads, error_map = tracker.value_and_grad(
      lambda p, x, y: loss_fn(model, p, x, y)
    )(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, error_map=error_map)
    return optax.apply_updates(params, updates), opt_state, loss

  header = " ".join(f"{n:>14}" for n in comps.names)
  for step in range(1, args.finetune_steps + 1):
    idx = rng.integers(0, len(xb), args.batch)
    params, opt_state, loss = finetune_step(params, opt_state, xb[idx], yb[idx])
    if step % args.print_every == 0 or step == 1:
      ema = optax.tree.get(opt_state, "error_map")
      alpha = optax.tree.get(opt_state, "alpha")
      print(
        f"\nstep {step:4d}  loss {float(loss):.4f}  "
        f"test accuracy {accuracy(model, params, xt, yt):.3f}"
      )
      print(f"{'':>10}{header}")
      print(f"{'error map':>10}" + " ".join(f"{float(v):>14.4f}" for v in ema))
      print(f"{'alpha':>10}" + " ".join(f"{float(v):>14.3f}" for v in alpha))


if __name__ == "__main__":
  main()
