"""Make numerical mistakes loud, and give JAX several CPU devices."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# A script run as its own process by test_parallel; importing it would start it.
collect_ignore = ["rgft_jax/_multihost_worker.py"]
