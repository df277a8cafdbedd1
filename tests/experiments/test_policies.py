"""LISA's policy, shared by both studies (`experiments.policies.LisaPolicy`)."""

import numpy as np
import pytest

from experiments.policies import LisaPolicy
from experiments.policies import block_layers

LAYERS = {
  "block_0": frozenset({"b0/w", "b0/b"}),
  "block_1": frozenset({"b1/w"}),
  "block_2": frozenset({"b2/w"}),
  "block_3": frozenset({"b3/w", "b3/b"}),
}


def test_lisa_trains_active_layers_redrawn_every_period():
  policy = LisaPolicy(LAYERS, active=2, period=3, seed=7)
  draws = [policy.trained(step) for step in range(12)]
  for start in range(0, 12, 3):  # Constant within a period.
    assert draws[start] == draws[start + 1] == draws[start + 2]
  for trained in draws:
    assert len(set(trained)) == 2 and set(trained) <= {0, 1, 2, 3}
  # The seed's own stream, one draw per period (numpy's, as LISA samples).
  for period in range(4):
    rng = np.random.default_rng([7, period])
    assert draws[3 * period] == tuple(sorted(rng.choice(4, 2, replace=False)))
  assert len(set(draws)) > 1  # It does move.


def test_the_variant_holds_every_layer_not_drawn():
  policy = LisaPolicy(LAYERS, active=1, period=5, seed=0)
  for step in range(0, 20, 5):
    (trained,) = policy.trained(step)
    labels = list(LAYERS)
    variant = policy.variant(step, None)
    held = set().union(*(LAYERS[n] for i, n in enumerate(labels) if i != trained))
    assert variant == held
    assert policy.variant_name(variant) == ",".join(
      sorted(n for i, n in enumerate(labels) if i != trained)
    )


def test_more_active_layers_than_there_are_is_refused():
  with pytest.raises(ValueError, match=r"lisa_layers must be in \[1, 4\], got 5"):
    LisaPolicy(LAYERS, active=5, period=1, seed=0)


def test_vit_blocks_are_the_paths_under_each_block():
  paths = [
    "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel",
    "Transformer/encoderblock_0/LayerNorm_0/scale",
    "Transformer/encoderblock_10/LayerNorm_0/scale",
    "Transformer/encoder_norm/scale",
    "head/kernel",
  ]
  assert block_layers(paths) == {
    "encoderblock_0": frozenset({paths[1]}),
    "encoderblock_1": frozenset({paths[0]}),
    "encoderblock_10": frozenset({paths[2]}),
  }
