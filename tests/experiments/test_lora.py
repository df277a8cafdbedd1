"""LoRA's factors and merge (`experiments.lora`), against the formula by hand."""

import re

import jax
import numpy as np

from experiments import lora

TARGET = re.compile(r"layers/\d+/attn/(q|o)_proj/kernel")
OUTPUT = re.compile(r".*/o_proj/kernel")


def _params():
  rng = np.random.default_rng(0)
  return {  # Integer layer keys, as a pure NNX dict has them.
    "layers": {
      0: {
        "attn": {
          "q_proj": {"kernel": rng.normal(size=(4, 2, 3)).astype(np.float32)},
          "o_proj": {"kernel": rng.normal(size=(2, 3, 4)).astype(np.float32)},
          "norm": {"scale": np.ones(4, np.float32)},
        }
      }
    },
    "head": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)},
  }


def test_factors_are_on_the_targets_with_heads_merged():
  factors = lora.init(_params(), 2, jax.random.key(0), TARGET, OUTPUT)
  assert sorted(factors) == [
    "layers.0.attn.o_proj.kernel",
    "layers.0.attn.q_proj.kernel",
  ]
  q, o = factors["layers.0.attn.q_proj.kernel"], factors["layers.0.attn.o_proj.kernel"]
  assert q["a"].shape == (4, 2) and q["b"].shape == (2, 6)  # [D, N*H].
  assert o["a"].shape == (6, 2) and o["b"].shape == (2, 4)  # [N*H, D].
  assert not np.any(q["b"]) and not np.any(o["b"])  # The merge starts at W.


def test_merge_adds_a_times_b_to_each_kernel():
  params = _params()
  factors = lora.init(params, 2, jax.random.key(1), TARGET, OUTPUT)
  rng = np.random.default_rng(1)
  for f in factors.values():
    f["b"] = rng.normal(size=f["b"].shape).astype(np.float32)
  merged = lora.merge({"base": params, "lora": factors})
  q, o = factors["layers.0.attn.q_proj.kernel"], factors["layers.0.attn.o_proj.kernel"]
  wq = params["layers"][0]["attn"]["q_proj"]["kernel"]
  wo = params["layers"][0]["attn"]["o_proj"]["kernel"]
  dq = np.einsum("dr,rnh->dnh", q["a"], np.asarray(q["b"]).reshape(2, 2, 3))
  do = np.einsum("nhr,rd->nhd", np.asarray(o["a"]).reshape(2, 3, 2), o["b"])
  attn = merged["layers"][0]["attn"]
  np.testing.assert_allclose(attn["q_proj"]["kernel"], wq + dq, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(attn["o_proj"]["kernel"], wo + do, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(attn["norm"]["scale"], np.ones(4))
  np.testing.assert_array_equal(merged["head"]["kernel"], params["head"]["kernel"])
