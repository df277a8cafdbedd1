import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgft_jax
from rgft_jax.tensorboard import ErrorMapWriter


class _Recorder:
  def __init__(self):
    self.scalars = {}
    self.histograms = {}

  def add_scalar(self, tag, value, step):
    self.scalars[tag, step] = value

  def add_histogram(self, tag, values, step):
    self.histograms[tag, step] = np.asarray(values)


def _setup():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  comps = rgft_jax.Components.from_regex(params, [(r"(\w)", r"\1")])
  return params, comps


def test_writer_reads_rgft_state_inside_a_chain():
  params, comps = _setup()
  tx = rgft_jax.rgft(0.1, comps, thresh_init=0.5, thresh_final=0.5)
  _, state = tx.update(params, tx.init(params), params, error_map={"a": 1.0, "b": 0.1})
  recorder = _Recorder()
  assert ErrorMapWriter(recorder, comps.names, every=5)(5, state)
  # alpha = clip(error / (thresh * max error), 0, 1) = [1, 0.1 / 0.5].
  assert recorder.scalars["alpha/a", 5] == pytest.approx(1.0)
  assert recorder.scalars["alpha/b", 5] == pytest.approx(0.2)
  np.testing.assert_allclose(recorder.histograms["alpha", 5], [1.0, 0.2], rtol=1e-6)
  assert not ErrorMapWriter(recorder, comps.names, every=5)(6, state)


def test_writer_says_the_optimizer_state_has_no_rgft_state():
  params, comps = _setup()
  state = optax.adam(0.1).init(params)
  with pytest.raises(
    ValueError, match=r"\(from rgft\(\) or scale_by_residual_error\).*found 0"
  ):
    ErrorMapWriter(_Recorder(), comps.names)(0, state)


def test_writer_says_when_names_do_not_match_the_state():
  params, comps = _setup()
  tx = rgft_jax.scale_by_residual_error(comps, thresh=0.5)
  with pytest.raises(ValueError, match=r"error map has shape \(2,\).*given 3 names"):
    ErrorMapWriter(_Recorder(), ["a", "b", "c"])(0, tx.init(params))
