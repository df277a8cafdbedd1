"""The one method registry of every study (`experiments.registry`)."""

import pytest

from experiments import methods as vit_methods
from experiments import registry
from experiments.lm import methods as lm_methods


def _registry():
  methods = registry.Registry(
    {"plain": "no budget", "both": "either", "needs": "budgeted", "other": "elsewhere"}
  )
  methods.register("needs", task="a", budget="required")(lambda: "needs")
  methods.register("plain", task="a")(lambda: "plain")
  methods.register("both", task="a", budget="optional")(lambda: "both")
  methods.register("other", task="b")(lambda: "other")
  methods.register("plain", task="b", budget="optional")(lambda: "plain b")
  return methods


def test_names_are_the_plain_methods_then_each_budget_in_catalogue_order():
  methods = _registry()
  a = methods.task("a")
  assert list(a) == ["plain", "both", "needs"]  # Not the order they registered.
  assert a.names() == ("plain", "both")
  assert a.names((0.3, 0.5)) == (
    "plain",
    "both",
    "both@0.3",
    "needs@0.3",
    "both@0.5",
    "needs@0.5",
  )
  assert a.help() == "plain: no budget; both: either; needs: budgeted"
  assert a["needs"].build() == "needs"
  # One entry per name; each task its own builder and budget.
  b = methods.task("b")
  assert list(b) == ["plain", "other"]
  assert (b["plain"].build(), b["plain"].budget) == ("plain b", "optional")
  assert a["plain"].help == b["plain"].help == "no budget"
  assert methods.tasks_of("plain") == ("a", "b")
  assert methods.tasks_of("other") == ("b",)


@pytest.mark.parametrize(
  "name, message",
  [
    ("nope", r"Unknown method 'nope'; the methods are \['plain', 'both', 'needs'\]"),
    ("other", r"other does not run on the a task \(it runs on b\)"),
    ("needs", r"needs needs a budget: needs@<fraction>, e\.g\. needs@0\.5"),
    ("plain@0.5", r"plain takes no budget on the a task, got 'plain@0\.5'"),
    ("both@x", r"The budget of 'both@x' is not a number"),
    ("both@1.5", r"must be in \(0, 1\], got 1\.5"),
    ("needs@0", r"must be in \(0, 1\], got 0\.0"),
  ],
)
def test_a_bad_name_is_refused_with_what_is_wrong(name, message):
  with pytest.raises(ValueError, match=message):
    _registry().task("a").parse(name)


def test_a_method_is_in_the_catalogue_and_registered_once_per_task():
  methods = _registry()
  with pytest.raises(ValueError, match="'plain' is registered already for task 'a'"):
    methods.register("plain", task="a")
  with pytest.raises(ValueError, match="'new' is not a method of the catalogue"):
    methods.register("new", task="a")
  with pytest.raises(ValueError, match="without '@'"):
    registry.Registry({"a@b": ""})
  with pytest.raises(ValueError, match="budget must be one of"):
    methods.register("other", task="a", budget="maybe")


def test_the_studies_are_views_of_one_registry():
  vit, lm = vit_methods.REGISTRY, lm_methods.METHODS
  assert vit.registry is lm.registry is registry.METHODS
  # Every method of the catalogue runs on some task, and the help is shared.
  for name in registry.CATALOGUE:
    assert registry.METHODS.tasks_of(name), name
  for name in set(vit) & set(lm):
    assert vit[name].help == lm[name].help == registry.CATALOGUE[name]
  # Built for the ViT only: its classifier head and biases, adapters, masks,
  # and the mixed grouping.
  assert set(vit) - set(lm) == {
    "bitfit",
    "head_only",
    "rgft_mix",
    "adapters",
    "random_sparse",
    "magnitude_sparse",
  }
  assert set(lm) <= set(vit)


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
  for methods in (vit_methods.REGISTRY, lm_methods.METHODS):
    assert methods.parse("lisa@0.5") == ("lisa", 0.5)  # Equal FLOPs.
  with pytest.raises(ValueError, match=r"bitfit does not run on the lm task"):
    lm_methods.METHODS.parse("bitfit")
