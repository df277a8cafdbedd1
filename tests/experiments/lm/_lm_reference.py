"""The byte-level LM in float64 NumPy, to check its logits against."""

import math

import jax
import numpy as np

from experiments.lm import model as lm


def reference_logits(cfg: lm.Config, params: dict, toks: np.ndarray) -> np.ndarray:
  """The model in float64 NumPy, one head at a time, from looped-layout params.

  RoPE is written as a complex rotation of (channel i, channel i + H/2).
  """
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  t = toks.shape[1]
  n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  half = h // 2
  freq = cfg.rope_theta ** (-2.0 * np.arange(half) / h)
  rotation = np.exp(1j * np.arange(t)[:, None] * freq[None, :])  # [T, H/2]

  def rope(v):  # [B, T, H]
    c = (v[..., :half] + 1j * v[..., half:]) * rotation[None]
    return np.concatenate([c.real, c.imag], axis=-1)

  def rms_norm(v, scale):
    return v / np.sqrt((v**2).mean(-1, keepdims=True) + cfg.norm_eps) * scale

  future = np.triu(np.ones((t, t), bool), k=1)
  x = p["embed"]["embedding"][toks]
  for i in range(cfg.n_layers):
    layer = p["layers"][i]
    attn, mlp = layer["attn"], layer["mlp"]
    y = rms_norm(x, layer["attn_norm"]["scale"])
    out = np.zeros_like(x)
    for head in range(n):
      kv = head // (n // k)
      q = rope(y @ attn["q_proj"]["kernel"][:, head])
      key = rope(y @ attn["k_proj"]["kernel"][:, kv])
      v = y @ attn["v_proj"]["kernel"][:, kv]
      scores = np.einsum("bth,bsh->bts", q, key) / math.sqrt(h)
      scores = np.where(future[None], -np.inf, scores)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out += (probs @ v) @ attn["o_proj"]["kernel"][head]
    x = x + out
    y = rms_norm(x, layer["mlp_norm"]["scale"])
    up = y @ mlp["up_proj"]["kernel"]
    if cfg.mlp == "swiglu":
      gate = y @ mlp["gate_proj"]["kernel"]
      hidden = gate / (1 + np.exp(-gate)) * up
    else:  # tanh-approximated GELU, jax.nn.gelu's default.
      hidden = (
        0.5 * up * (1 + np.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3)))
      )
    x = x + hidden @ mlp["down_proj"]["kernel"]
  x = rms_norm(x, p["final_norm"]["scale"])
  return x @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]
