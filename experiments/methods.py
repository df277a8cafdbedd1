"""The fine-tuning methods compared side by side, on one ViT parameter layout.

Every method is a `Method`: the parameters it trains from (LoRA adds factors),
how those become the model's parameters, which of them are trainable, the optax
transformation, and for RGFT the `ErrorTracker`. Frozen parameters are held out
of differentiation, so XLA drops their weight-gradient work and the counted
FLOPs show each method's real cost.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import rgft_jax

METHODS = (
  "full",
  "rgft_blocks",
  "rgft_heads",
  "lora",
  "bitfit",
  "head_only",
  "lisa",
  "rgft_sparse",
  "rgft_sparse_prefix",
)
# Parameters in no component below the first block: frozen with it (prefix policy).
STEM = r"embedding/.*|cls|Transformer/posembed_input/.*"

_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/")
# Kernels LoRA adapts: attention projections and both MLP layers.
_LORA_TARGET = re.compile(
  r".*/(MultiHeadDotProductAttention_1/(query|key|value|out)|MlpBlock_3/Dense_\d)/kernel"
)


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Hyperparameters shared by every method (one rule for all, no per-method tuning)."""

  learning_rate: float = 1e-3
  steps: int = 300
  lora_rank: int = 4
  lisa_layers: int = 1  # Blocks trained at a time.
  lisa_period: int = 20  # Steps between re-sampling them.
  beta: float = 0.9
  thresh_init: float = 0.1
  thresh_final: float = 0.3
  min_scale: float = 0.01
  freeze_level: float = 0.5  # Sparse RGFT: alpha at or below this counts...
  freeze_patience: int = 20  # ...for this many measured steps in a row.
  refresh_every: int = 50  # Full step that can bring frozen components back.


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
  name: str
  params: Any  # What the optimizer updates.
  to_model: Callable[[Any], Any]  # `params` -> the model's parameters.
  trainable: frozenset[str]  # Paths of `params` that are trained.
  tx: optax.GradientTransformation
  tracker: rgft_jax.ErrorTracker | None = None
  components: rgft_jax.Components | None = None
  lisa: tuple[int, int] | None = None  # (layers, period).
  freezer: rgft_jax.Freezer | None = None  # Sparse RGFT.

  def frozen_paths(self, step: int, seed: int) -> frozenset[str]:
    """Paths held fixed at `step` beyond the static partition (LISA's sampling)."""
    if self.lisa is None:
      return frozenset()
    active = lisa_blocks(self.params, step, seed, *self.lisa)
    return frozenset(
      p
      for p in self.trainable
      if (m := _BLOCK.match(p)) is not None and int(m.group(1)) not in active
    )


def identity(tree: Any) -> Any:
  return tree


def flat(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(tree: dict[str, Any]) -> Any:
  return traverse_util.unflatten_dict(tree, sep="/")


def depth(params: Any) -> int:
  return 1 + max(int(m.group(1)) for p in flat(params) if (m := _BLOCK.match(p)))


def lisa_blocks(params, step: int, seed: int, layers: int, period: int) -> tuple:
  """The blocks LISA trains at `step`: `layers` of them, redrawn every `period`."""
  rng = np.random.default_rng([seed, step // period])
  return tuple(sorted(rng.choice(depth(params), size=layers, replace=False).tolist()))


def _frozen_tx(inner: optax.GradientTransformation, params, trainable) -> Any:
  """`inner` on the trainable leaves only (no optimizer state for the rest)."""
  labels = unflat({p: ("train" if p in trainable else "freeze") for p in flat(params)})
  return optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()}, labels)


def _lora_init(params, rank: int, key: jax.Array) -> dict[str, Any]:
  """Factors `a` [d_in, r] (scaled normal) and `b` [r, d_out] (zeros) per kernel."""
  factors = {}
  targets = sorted(p for p in flat(params) if _LORA_TARGET.fullmatch(p))
  for path, k in zip(targets, jax.random.split(key, len(targets)), strict=True):
    d_in, d_out = _lora_shape(path, flat(params)[path].shape)
    factors[path.replace("/", ".")] = {
      "a": jax.random.normal(k, (d_in, rank)) / np.sqrt(d_in),
      "b": jnp.zeros((rank, d_out)),
    }
  return factors


def _lora_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """A kernel as a matrix: out's [H, K, D] is [H*K, D], q/k/v's [D, H, K] is [D, H*K]."""
  if path.endswith("out/kernel"):
    return int(np.prod(shape[:-1])), shape[-1]
  return shape[0], int(np.prod(shape[1:]))


def _lora_merge(tree: dict[str, Any]) -> Any:
  base = flat(tree["base"])
  for key, f in tree["lora"].items():
    path = key.replace(".", "/")
    base[path] = base[path] + (f["a"] @ f["b"]).reshape(base[path].shape)
  return unflat(base)


def make(
  name: str,
  model: nn.Module,
  params: Any,
  example: jax.Array,
  hyper: Hyper,
  key: jax.Array,
) -> Method:
  """The method `name` (one of `METHODS`) set up on pretrained `params`."""
  adam = optax.adam(hyper.learning_rate)
  paths = frozenset(flat(params))
  head = frozenset(p for p in paths if p.startswith("head/"))
  if name == "full":
    return Method(name, params, identity, paths, adam)
  if name.startswith("rgft"):
    select = "heads" if name == "rgft_heads" else "branches"
    tracker = rgft_jax.ErrorTracker(model, select=select)
    comps = tracker.components(params, example)
    tx = rgft_jax.rgft(
      hyper.learning_rate,
      comps,
      beta=hyper.beta,
      thresh_init=hyper.thresh_init,
      thresh_final=hyper.thresh_final,
      warmup_steps=hyper.steps,
      min_scale=hyper.min_scale,
    )
    freezer = None
    if name.startswith("rgft_sparse"):
      prefix = name == "rgft_sparse_prefix"
      freezer = rgft_jax.Freezer(
        comps,
        min_scale=hyper.min_scale,
        patience=hyper.freeze_patience,
        refresh_every=hyper.refresh_every,
        policy="prefix" if prefix else "any",
        stem=STEM if prefix else None,
        level=hyper.freeze_level,
      )
    return Method(name, params, identity, paths, tx, tracker, comps, freezer=freezer)
  if name == "head_only":
    return Method(name, params, identity, head, _frozen_tx(adam, params, head))
  if name == "bitfit":
    trainable = head | {p for p in paths if p.endswith("/bias")}
    return Method(
      name, params, identity, trainable, _frozen_tx(adam, params, trainable)
    )
  if name == "lora":
    tree = {"base": params, "lora": _lora_init(params, hyper.lora_rank, key)}
    trainable = frozenset(
      p for p in flat(tree) if p.startswith("lora/") or p.startswith("base/head/")
    )
    return Method(name, tree, _lora_merge, trainable, _frozen_tx(adam, tree, trainable))
  if name == "lisa":
    if not 1 <= hyper.lisa_layers <= depth(params):
      raise ValueError(
        f"lisa_layers must be in [1, {depth(params)}], got {hyper.lisa_layers}."
      )
    return Method(
      name,
      params,
      identity,
      paths,
      adam,
      lisa=(hyper.lisa_layers, hyper.lisa_period),
    )
  raise ValueError(f"Unknown method {name!r}; choose from {METHODS}.")


def count(tree: Any, paths: frozenset[str] | None = None) -> int:
  """Number of parameter entries (at `paths`, or all)."""
  return sum(
    int(np.prod(np.shape(v)))
    for p, v in flat(tree).items()
    if paths is None or p in paths
  )
