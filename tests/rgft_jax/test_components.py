import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rgft_jax import Components


def _params():
  return {
    "attn": {"query": jnp.ones((4, 2, 3)), "bias": jnp.ones((2, 3))},
    "blk0": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)},
    "blk1": {"w": jnp.ones((4, 4))},
    "emb": jnp.ones(5),
  }


_RULES = [
  (r"attn/query", "head{head}", 1),
  (r"attn/bias", "head{head}", -2),
  (r"blk(\d+)/.*", r"block\1"),
  (r"emb", None),
]


def test_from_regex_assigns_names_and_head_slices():
  comps = Components.from_regex(_params(), _RULES)
  # Flattened order: attn/bias, attn/query, blk0/b, blk0/w, blk1/w, emb.
  assert comps.names == ("head0", "head1", "block0", "block1")
  np.testing.assert_array_equal(comps.index["attn"]["query"], [[[0], [1]]])
  assert comps.index["attn"]["query"].shape == (1, 2, 1)
  np.testing.assert_array_equal(comps.index["attn"]["bias"], [[0], [1]])
  assert int(comps.index["blk0"]["w"]) == 2
  assert int(comps.index["blk0"]["b"]) == 2
  assert int(comps.index["blk1"]["w"]) == 3
  assert int(comps.index["emb"]) == -1


def test_sizes_and_ownership_match_hand_count():
  comps = Components.from_regex(_params(), _RULES)
  # Each head: 4*3 query entries + 3 bias entries.
  np.testing.assert_array_equal(comps.sizes(_params()), [15, 15, 16, 16])
  assert comps.unassigned(_params()) == ["emb"]
  assert comps.owned_paths()["block0"] == ["blk0/b", "blk0/w"]
  assert comps.owned_paths()["head1"] == ["attn/bias", "attn/query"]


def test_scale_multiplies_each_entry_by_its_component():
  comps = Components.from_regex(_params(), _RULES)
  alpha = jnp.array([0.5, 0.25, 2.0, 3.0])
  out = comps.scale(_params(), alpha)
  np.testing.assert_allclose(out["attn"]["query"][:, 0], 0.5)
  np.testing.assert_allclose(out["attn"]["query"][:, 1], 0.25)
  np.testing.assert_allclose(out["attn"]["bias"], [[0.5] * 3, [0.25] * 3])
  np.testing.assert_allclose(out["blk0"]["b"], 2.0)
  np.testing.assert_allclose(out["blk1"]["w"], 3.0)
  np.testing.assert_allclose(out["emb"], 1.0)


def test_unmatched_parameters_are_listed():
  rules = [*_RULES[:2], (r"blk1/w", "b1"), (r"emb", None)]
  with pytest.raises(ValueError, match=r"2 unmatched: 'blk0/b', 'blk0/w'"):
    Components.from_regex(_params(), rules)


def test_head_rule_needs_head_placeholder():
  with pytest.raises(ValueError, match=r"\{head\}"):
    Components.from_regex(_params(), [(r"attn/query", "head", 1)])


def test_head_axis_out_of_range():
  with pytest.raises(ValueError, match=r"out of range for 'attn/query'"):
    Components.from_regex(_params(), [(r"attn/query", "h{head}", 3), (".*", None)])


def test_check_names_missing_and_unknown_paths():
  comps = Components.from_regex(_params(), _RULES)
  params = _params()
  del params["blk1"]
  params["extra"] = jnp.ones(2)
  with pytest.raises(ValueError, match=r"lack: \['blk1/w'\].*lack: \['extra'\]"):
    comps.check(params)


def test_check_rejects_index_that_does_not_broadcast():
  comps = Components.from_regex(_params(), _RULES)
  params = _params()
  params["attn"]["query"] = jnp.ones((4, 3, 3))
  with pytest.raises(ValueError, match=r"\(1, 2, 1\) at 'attn/query'"):
    comps.check(params)


def test_invalid_index_values_and_names():
  with pytest.raises(ValueError, match="outside"):
    Components(names=("a",), index={"w": np.array(1)})
  with pytest.raises(ValueError, match="repeated"):
    Components(names=("a", "a"), index={"w": np.array(0)})
  with pytest.raises(TypeError, match="integers"):
    Components(names=("a",), index={"w": np.array(0.0)})


def test_names_must_not_be_a_bare_string():
  with pytest.raises(TypeError, match=r"names.*'ab'"):
    Components(names="ab", index={"w": np.array(0)})


@pytest.mark.parametrize(
  "rules, error, match",
  [
    ([r".*"], TypeError, r"Rule '\.\*': a bare string"),
    ((r"blk0/w", "b0"), TypeError, r"Rule 'blk0/w': a bare string"),
    (r".*", TypeError, r"rules must be a list"),
    ([{"pattern": ".*"}], TypeError, r"Rule \{'pattern': '\.\*'\}: a dict"),
    ([(r".*",)], ValueError, r"Rule \('\.\*',\): 1 entries"),
    ([(1, "a")], TypeError, r"Rule \(1, 'a'\): the pattern is a int"),
    ([(r".*", 0)], TypeError, r"Rule \('\.\*', 0\): the name is a int"),
    ([(r".*", "h{head}", "1")], TypeError, r"head_axis is a str"),
    ([(r".*", "h{head}", True)], TypeError, r"head_axis is a bool"),
    ([(r"(blk", "a")], ValueError, r"Rule \('\(blk', 'a'\): invalid pattern"),
    ([(r".*", r"\2")], ValueError, r"does not expand on 'attn/bias'"),
  ],
)
def test_malformed_rules_are_named(rules, error, match):
  with pytest.raises(error, match=match):
    Components.from_regex(_params(), rules)


def test_rules_may_be_lists():
  comps = Components.from_regex(_params(), [list(r) for r in _RULES])
  assert comps.names == ("head0", "head1", "block0", "block1")


def test_a_component_that_owns_nothing_is_named():
  with pytest.raises(ValueError, match=r"\['b'\] own no parameter"):
    Components(names=("a", "b"), index={"w": np.array(0), "v": np.array(-1)})
  # Owning only an empty leaf: caught where the parameters are known.
  params = {"w": jnp.ones(3), "z": jnp.ones((2, 0))}
  with pytest.raises(ValueError, match=r"'z_comp' own no entry of the params"):
    Components.from_regex(params, [("w", "w_comp"), ("z", "z_comp")])
  comps = Components(names=("a", "b"), index={"w": np.array(0), "z": np.array(1)})
  with pytest.raises(ValueError, match=r"'b' own no entry of the params"):
    comps.check(params)


def test_masked_parameters_count_as_absent():
  comps = Components.from_regex(_params(), _RULES)
  params = _params()
  params["emb"] = optax.MaskedNode()  # A leaf masked out.
  params["blk0"]["b"] = optax.MaskedNode()  # block0 still owns blk0/w.
  comps.check(params)
  out = comps.scale(params, jnp.array([0.5, 0.25, 2.0, 3.0]))
  assert isinstance(out["emb"], optax.MaskedNode)
  np.testing.assert_allclose(out["blk0"]["w"], 2.0)
  # A masked subtree that holds all of block1.
  params["blk1"] = optax.MaskedNode()
  with pytest.raises(ValueError, match=r"'block1' own no entry.*masked out"):
    comps.check(params)
  # Unmasked but absent paths are still missing.
  del params["attn"]
  with pytest.raises(ValueError, match=r"lack: \['attn/bias', 'attn/query'\]"):
    comps.check(params)
