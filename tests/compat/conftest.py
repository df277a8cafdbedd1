"""Third-party model code under the repository's strict test settings."""

import jax
import pytest

# Detailed assertion messages in the shared checks too.
pytest.register_assert_rewrite("_compat_reference")


@pytest.fixture(autouse=True, scope="module")
def _allow_rank_promotion():
  """tests/conftest.py makes implicit rank promotion an error for our code;
  Hugging Face's Flax models rely on it (GPT-2's `y + bias`, say). Module
  scope, so that it also covers the module-scoped model fixtures, and ends
  with the module."""
  with jax.numpy_rank_promotion("allow"):
    yield
