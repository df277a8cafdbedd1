"""The one method registry both studies use (`experiments.registry`)."""

import pytest

from experiments import methods as vit_methods
from experiments import registry
from experiments.lm import methods as lm_methods


def _registry():
  methods = registry.Registry()
  methods.register("plain", help="no budget")(lambda: "plain")
  methods.register("both", budget="optional", help="either")(lambda: "both")
  methods.register("needs", budget="required", help="budgeted")(lambda: "needs")
  return methods


def test_names_are_the_plain_methods_then_each_budget():
  methods = _registry()
  assert methods.names() == ("plain", "both")
  assert methods.names((0.3, 0.5)) == (
    "plain",
    "both",
    "both@0.3",
    "needs@0.3",
    "both@0.5",
    "needs@0.5",
  )
  assert methods.help() == "plain: no budget; both: either; needs: budgeted"
  assert methods["needs"].build() == "needs"


@pytest.mark.parametrize(
  "name, message",
  [
    ("nope", r"Unknown method 'nope'; the methods are \['plain', 'both', 'needs'\]"),
    ("needs", r"needs needs a budget: needs@<fraction>, e\.g\. needs@0\.5"),
    ("plain@0.5", r"plain takes no budget, got 'plain@0\.5'"),
    ("both@x", r"The budget of 'both@x' is not a number"),
    ("both@1.5", r"must be in \(0, 1\], got 1\.5"),
    ("needs@0", r"must be in \(0, 1\], got 0\.0"),
  ],
)
def test_a_bad_name_is_refused_with_what_is_wrong(name, message):
  with pytest.raises(ValueError, match=message):
    _registry().parse(name)


def test_a_name_is_registered_once_and_without_an_at():
  methods = _registry()
  with pytest.raises(ValueError, match="'plain' is registered already"):
    methods.register("plain", help="again")
  with pytest.raises(ValueError, match="without '@'"):
    methods.register("a@b", help="")
  with pytest.raises(ValueError, match="budget must be one of"):
    methods.register("other", budget="maybe", help="")


def test_both_studies_take_budgets_where_their_methods_do():
  for methods in (vit_methods.REGISTRY, lm_methods.METHODS):
    assert methods.parse("full") == ("full", None)
    assert methods.parse("full@0.5") == ("full", 0.5)
    assert methods.parse("rgft_budget@0.4") == ("rgft_budget", 0.4)
    for required in ("rgft_budget", "dropbp", "greentrainer", "surgical_last"):
      with pytest.raises(ValueError, match="needs a budget"):
        methods.parse(required)
    for plain in ("rgft_blocks", "rgft_heads", "lora"):
      with pytest.raises(ValueError, match="takes no budget"):
        methods.parse(plain + "@0.5")
  # LISA's equal-FLOPs variant runs on the ViT's looped blocks only.
  assert vit_methods.REGISTRY.parse("lisa@0.5") == ("lisa", 0.5)
  with pytest.raises(ValueError, match="takes no budget"):
    lm_methods.METHODS.parse("lisa@0.5")
