import numpy as np
import pytest
from matplotlib.figure import Figure

from rgft_jax import viz


def _ax():
  return Figure().subplots()


def _grid(ax):
  return ax.images[0].get_array().filled(np.nan)


def _rows(ax):
  return [t.get_text() for t in ax.get_yticklabels()]


def test_head_grid_takes_the_module_not_the_first_number_as_the_row():
  # "b16" is no layer: one module, two heads.
  ax = viz.head_grid(
    [1.0, 2.0], ["vit_b16/block1/head0", "vit_b16/block1/head1"], _ax()
  )
  np.testing.assert_array_equal(_grid(ax), [[1.0, 2.0]])
  assert _rows(ax) == ["vit_b16/block1"]


def test_head_grid_draws_tracker_names_one_row_per_block_in_order():
  attn = "Transformer/encoderblock_{}/MultiHeadDotProductAttention_1/head{}"
  names = [attn.format(10, 1), attn.format(2, 0), attn.format(2, 1)]
  ax = viz.head_grid([5.0, 6.0, 7.0], names, _ax())
  np.testing.assert_array_equal(_grid(ax), [[6.0, 7.0], [np.nan, 5.0]])
  module = "Transformer/encoderblock_{}/MultiHeadDotProductAttention_1"
  assert _rows(ax) == [module.format(2), module.format(10)]  # As given.


def test_head_grid_labels_rows_with_label():
  names = ["enc/block10/attn/head0", "enc/block9/attn/head1"]
  ax = viz.head_grid([1.0, 2.0], names, _ax(), label=lambda m: m.split("/")[1])
  assert _rows(ax) == ["block9", "block10"]  # Still in the modules' order.
  np.testing.assert_array_equal(_grid(ax), [[np.nan, 2.0], [1.0, np.nan]])


def test_head_grid_does_not_allocate_for_a_huge_layer_number():
  # Too long for int(); sorted after block1 all the same.
  huge = "block" + "9" * 5000
  ax = viz.head_grid([1.0, 2.0], [huge + "/head0", "block1/head0"], _ax())
  assert _rows(ax) == ["block1", huge]
  np.testing.assert_array_equal(_grid(ax), [[2.0], [1.0]])
  # One row, not 10**8 (the first number used to be the layer).
  ax = viz.head_grid([3.0], ["block99999999/head0"], _ax())
  np.testing.assert_array_equal(_grid(ax), [[3.0]])


@pytest.mark.parametrize(
  ("names", "match"),
  [
    (["block1/head0", "block1/mlp"], r"head from component name 'block1/mlp'"),
    (["block1/head0/x"], r"'block1/head0/x': it must end in '/head<k>'"),
    (["block1/head1024"], r"'block1/head1024' has head 1024; .* 0 to 1023"),
    (["block1/head" + "9" * 5000], r"head_grid draws heads 0 to 1023 only"),
    (["a/head1", "a/head01"], r"same cell: 'a/head01'"),
  ],
)
def test_head_grid_names_a_name_it_cannot_draw(names, match):
  with pytest.raises(ValueError, match=match):
    viz.head_grid(np.ones(len(names)), names, _ax())


def test_head_grid_needs_one_value_per_name():
  with pytest.raises(ValueError, match=r"values has shape \(3,\), there are 2 names"):
    viz.head_grid([1.0, 2.0, 3.0], ["a/head0", "a/head1"], _ax())


def test_deprecated_short_name_warns_and_still_renames():
  attn = "Transformer/encoderblock_11/MultiHeadDotProductAttention_1/head3"
  with pytest.warns(DeprecationWarning, match=r"use experiments\.vit\.short_name"):
    assert viz.short_name(attn) == "block11/attn/head3"


def test_error_map_heatmap_labels_each_component_row():
  ax = viz.error_map_heatmap([[1.0, 4.0], [2.0, 2.0]], [0, 10], ["a", "b"], _ax())
  np.testing.assert_allclose(_grid(ax), [[0.25, 1.0], [1.0, 1.0]])
  assert _rows(ax) == ["a", "b"]
  names = ["Transformer/encoderblock_0/MlpBlock_3", "Transformer/encoder_norm"]
  ax = viz.error_map_heatmap(np.ones((1, 2)), [0], names, _ax(), label=str.upper)
  assert _rows(ax) == [n.upper() for n in names]


def test_plots_refuse_values_that_do_not_match_their_labels():
  with pytest.raises(
    ValueError, match=r"\(2, 3\) for 2 steps and 3 names, got \(2, 2\)"
  ):
    viz.error_map_heatmap(np.ones((2, 2)), [0, 1], ["a", "b", "c"], _ax())
  with pytest.raises(ValueError, match=r"with 3 steps, got \(2, 2\)"):
    viz.alpha_distribution(np.ones((2, 2)), [0, 1, 2], _ax())
