"""The public-name boundary: the studies use what `rgft_jax` exports.

The studies, benchmarks and notebooks import `rgft_jax` the way a user does:
no private module (`rgft_jax._sparse`) and no private name (`rgft_jax._x`,
`from rgft_jax.viz import _y`). Across the study packages the same holds for
private names of another module (`finetune._batches` from a notebook). Tests
may import private modules; they are not walked.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WALKED = ("experiments", "benchmarks", "notebooks", "tools")


def _private(part: str) -> bool:
  return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _absolute(node: ast.ImportFrom, module: tuple[str, ...]) -> str:
  """The module an `ImportFrom` in `module` reads, relative imports resolved."""
  if not node.level:
    return node.module or ""
  package = module[: -node.level]
  return ".".join([*package, *([node.module] if node.module else [])])


def violations(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[tuple[int, str]]:
  """(line, dotted name) of every private `rgft_jax`/`experiments` name that
  `path` imports or reads as an attribute of an imported module."""
  tree = ast.parse(path.read_text(), filename=str(path))
  module = path.relative_to(root).with_suffix("").parts
  own = ".".join(module)
  modules: dict[str, str] = {}  # Local name -> module it is bound to.
  found = []

  def check(line: int, dotted: str) -> None:
    parts = dotted.split(".")
    if parts[0] not in ("rgft_jax", "experiments"):
      return
    if parts[0] == "experiments" and dotted.rsplit(".", 1)[0] == own:
      return  # A module's own private names.
    if any(_private(p) for p in parts[1:]):
      found.append((line, dotted))

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        check(node.lineno, alias.name)
        top = alias.name.split(".")[0]
        modules[alias.asname or top] = alias.name if alias.asname else top
    elif isinstance(node, ast.ImportFrom):
      base = _absolute(node, module)
      for alias in node.names:
        check(node.lineno, f"{base}.{alias.name}")
        modules[alias.asname or alias.name] = f"{base}.{alias.name}"
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _private(node.attr):
      chain, value = [node.attr], node.value
      while isinstance(value, ast.Attribute):
        chain.append(value.attr)
        value = value.value
      if isinstance(value, ast.Name) and value.id in modules:
        check(node.lineno, ".".join([modules[value.id], *reversed(chain)]))
  return sorted(found)


def _files() -> list[pathlib.Path]:
  return [p for d in WALKED for p in sorted((ROOT / d).rglob("*.py"))]


def test_the_walk_sees_every_study_directory():
  walked = {p.relative_to(ROOT).parts[0] for p in _files()}
  assert walked == set(WALKED)


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_across_the_boundary(path):
  rel = str(path.relative_to(ROOT))
  bad = violations(path)
  assert not bad, f"{rel} uses private names: {bad}; import public ones instead"


def test_the_check_sees_private_names(tmp_path):
  source = (
    "import rgft_jax\n"
    "import rgft_jax._budget\n"
    "from rgft_jax._sparse import compiled_cost\n"
    "from rgft_jax import _budget as b\n"
    "from rgft_jax.viz import _style\n"
    "from experiments import finetune\n"
    "from experiments.data import _cut\n"
    "rgft_jax._sparse.hold_masked\n"
    "finetune._batches\n"
    "rgft_jax.__version__, rgft_jax.compiled_cost, finetune.main\n"
    "from .sibling import _own_package\n"
  )
  (tmp_path / "notebooks").mkdir()
  path = tmp_path / "notebooks" / "n.py"
  path.write_text(source)
  assert [name for _, name in violations(path, tmp_path)] == [
    "rgft_jax._budget",
    "rgft_jax._sparse.compiled_cost",
    "rgft_jax._budget",
    "rgft_jax.viz._style",
    "experiments.data._cut",
    "rgft_jax._sparse",
    "experiments.finetune._batches",
  ]
  (tmp_path / "experiments" / "lm").mkdir(parents=True)
  path = tmp_path / "experiments" / "lm" / "study.py"
  path.write_text("from .methods import _hold\nfrom . import _x\n_y = 1\n")
  assert [name for _, name in violations(path, tmp_path)] == [
    "experiments.lm.methods._hold",
    "experiments.lm._x",
  ]


def _cost_analysis_reads(path: pathlib.Path) -> list[int]:
  """Lines of `path` that call XLA's `cost_analysis()` themselves."""
  tree = ast.parse(path.read_text(), filename=str(path))
  return sorted(
    node.lineno
    for node in ast.walk(tree)
    if isinstance(node, ast.Attribute) and node.attr == "cost_analysis"
  )


def test_xla_flops_are_read_in_one_place(tmp_path):
  """`rgft_jax._costs` reads XLA's cost analysis (`flops_of`, `compiled_cost`);
  everything else, the library included, goes through it."""
  readers = {
    str(p.relative_to(ROOT))
    for p in [*_files(), *sorted((ROOT / "rgft_jax").rglob("*.py"))]
    if _cost_analysis_reads(p)
  }
  assert readers == {"rgft_jax/_costs.py"}
  probe = tmp_path / "probe.py"
  probe.write_text("f = jax.jit(g).lower(x)\nf.cost_analysis()['flops']\n")
  assert _cost_analysis_reads(probe) == [2]
