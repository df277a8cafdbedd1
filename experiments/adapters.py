"""Bottleneck adapters (Houlsby et al., 2019) after each residual branch.

Each branch output `h` (attention and MLP, before it is added to the stream)
becomes `h + gelu(h @ down + down_bias) @ up + up_bias` (GELU, tanh form, as
the ViT's MLP; a ReLU bottleneck can start dead when a branch's outputs are
alike across tokens); `up` and both biases start at zero, so the adapted
model starts as the pretrained one. The model's
code is not changed: `forward` intercepts the branches' calls.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import rgft_jax


def adapter(p: dict[str, jax.Array], h: jax.Array) -> jax.Array:
  """`h + gelu(h @ down + down_bias) @ up + up_bias` over the last axis of `h`."""
  lead = (1,) * (h.ndim - 1)
  z = jax.nn.gelu(h @ p["down"] + p["down_bias"].reshape(*lead, -1), approximate=True)
  return h + z @ p["up"] + p["up_bias"].reshape(*lead, -1)


def _key(path: tuple[str, ...]) -> str:
  return ".".join(path)


def init(model: nn.Module, params: Any, example: jax.Array, width: int, key) -> dict:
  """Adapter parameters, one set per residual branch of `model` (by dataflow).

  `down` [d, width] is drawn from N(0, 1/d), `up` [width, d] and the biases
  are zeros. Keys are the branches' module paths joined by ".".
  """
  if width < 1:
    raise ValueError(f"The adapter width must be >= 1, got {width}.")
  names = rgft_jax.ErrorTracker(model, select="branches").components(params, example)
  wanted = {tuple(n.split("/")) for n in names.names}
  dims: dict[str, int] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.path in wanted:
      dims[_key(context.module.path)] = out.shape[-1]
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: model.apply({"params": p}, example), params)
  out = {}
  for k, name in zip(jax.random.split(key, len(dims)), sorted(dims), strict=True):
    d = dims[name]
    out[name] = {
      "down": jax.random.normal(k, (d, width)) / np.sqrt(d),
      "down_bias": jnp.zeros((width,)),
      "up": jnp.zeros((width, d)),
      "up_bias": jnp.zeros((d,)),
    }
  return out


def forward(model: nn.Module, tree: dict[str, Any], images: jax.Array) -> jax.Array:
  """Logits of `model` on `images`: `tree["base"]` with `tree["adapters"]` in place."""
  adapters = tree["adapters"]

  def adapt(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    p = adapters.get(_key(context.module.path))
    return out if p is None else adapter(p, out)

  with nn.intercept_methods(adapt):
    return model.apply({"params": tree["base"]}, images)
