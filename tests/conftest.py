"""Make numerical mistakes loud, give JAX several CPU devices, and reuse
XLA's compiled programs across tests."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# A script run as its own process by test_parallel; importing it would start it.
collect_ignore = ["rgft_jax/_multihost_worker.py"]

# XLA's compiled programs reused across tests: many compile the same step from
# a new closure. Per process, removed at exit. A program read back has the
# same cost and memory analyses as a fresh one.
_CACHE = tempfile.mkdtemp(prefix="rgft_jax_tests_xla_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
