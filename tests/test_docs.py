"""The README and docs/: tables equal the committed JSON, links resolve."""

from __future__ import annotations

import pathlib
import re

import pytest

from tools import doc_tables

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = doc_tables.documents(ROOT)
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_tables_equal_what_the_json_gives():
  assert doc_tables.differences(ROOT) == [], "run `python -m tools.doc_tables`"
  assert doc_tables.main(["--check"]) == 0


def test_every_table_is_shown_and_the_readme_has_its_table():
  shown = doc_tables.used(ROOT)
  assert set(shown) == set(doc_tables.TABLES)
  assert "README.md" in shown["vit_summary_shipped"]


def test_a_changed_figure_is_found_and_put_back():
  text = (ROOT / "docs" / "vit_study.md").read_text()
  row = re.search(r"^\| rgft_budget@0\.5 \| 200 \| (\d\.\d{3}) ± .*$", text, re.M)
  assert row is not None
  wrong = row.group(0).replace(f"| {row.group(1)} ± ", "| 0.123 ± ", 1)
  changed = text.replace(row.group(0), wrong)
  assert changed != text
  assert doc_tables.render(changed) == text
  with pytest.raises(KeyError, match="no table 'nope'"):
    doc_tables.render("<!-- table:nope -->\n| a |\n<!-- /table -->")


def _slug(heading: str) -> str:
  """The anchor GitHub gives a heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  text = _FENCE.sub("", path.read_text())
  return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def _links(path: pathlib.Path) -> list[str]:
  return _LINK.findall(_FENCE.sub("", path.read_text()))


def test_the_slug_is_githubs():
  assert _slug("What detaching saves at ViT-B/16 scale") == (
    "what-detaching-saves-at-vit-b16-scale"
  )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
  links = [t for t in _links(doc) if not re.match(r"[a-z]+:", t)]
  for target in links:
    file, _, anchor = target.partition("#")
    where = (doc.parent / file).resolve() if file else doc
    assert where.is_file(), f"{doc.name}: {target} is no file"
    assert ROOT in where.parents, f"{doc.name}: {target} leaves the repository"
    if anchor:
      assert where.suffix == ".md", f"{doc.name}: {target}"
      assert anchor in _anchors(where), f"{doc.name}: no heading #{anchor} in {file}"


def test_every_doc_is_linked_from_the_readme():
  linked = {(ROOT / t).resolve() for t in _links(ROOT / "README.md")}
  docs = set((ROOT / "docs").glob("*.md"))
  assert docs and docs <= linked, sorted(str(d) for d in docs - linked)


def test_the_peers_table_puts_each_task_s_figures_in_its_own_columns():
  """Each cell of `vit_peers_both`, recomputed by hand from the run records:
  the mean over seeds of rgft_budget@b's test accuracy minus the other's."""
  import json

  import numpy as np

  results = json.loads(pathlib.Path(doc_tables.VIT_PEERS).read_text())
  table = doc_tables.vit_peers_both(doc_tables.VIT_PEERS).splitlines()
  head = [c.strip() for c in table[0].strip("|").split("|")]
  body = {
    cells[0]: dict(zip(head[1:], cells[1:], strict=True))
    for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])
  }
  checked = 0
  for task, label in doc_tables.TASKS.items():
    acc = {}
    for r in results["tasks"][task]["runs"]:
      acc.setdefault(r["method"], {})[r["seed"]] = r["test_accuracy"]
    for b in (0.4, 0.5, 0.7):
      column = f"{label} @{b:g}"
      mine = acc[f"rgft_budget@{b:g}"]
      assert body["its accuracy"][column] == f"{np.mean(list(mine.values())):.3f}"
      for row, other in (("`dropbp`", f"dropbp@{b:g}"), ("`full` (all steps)", "full")):
        diff = np.mean([mine[s] - acc[other][s] for s in mine]) * 100
        assert body[row][column].strip("*").startswith(f"{diff:+.1f} ±"), (row, column)
        checked += 1
  assert checked == 12


def test_the_lm_peers_table_is_rgft_minus_each_in_bits_per_byte():
  """Each checked cell of `lm_peers_both`, recomputed by hand from the run
  records: the mean over seeds of rgft_budget@b's test bits/byte minus the
  other's, bold exactly where the t interval excludes zero."""
  import json

  import numpy as np
  from scipy import stats

  table = doc_tables.lm_peers_both(doc_tables.LM_PEERS).splitlines()
  head = [c.strip() for c in table[0].strip("|").split("|")]
  body = {
    cells[0]: dict(zip(head[1:], cells[1:], strict=True))
    for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])
  }
  checked = 0
  for label, path in doc_tables.LM_PEERS.items():
    bpb = {}
    for r in json.loads(pathlib.Path(path).read_text())["runs"]:
      bpb.setdefault(r["method"], {})[r["seed"]] = r["test_bpb"]
    for b in (0.4, 0.5, 0.7):
      column = f"{label} @{b:g}"
      mine = bpb[f"rgft_budget@{b:g}"]
      assert body["its bits/byte"][column] == f"{np.mean(list(mine.values())):.4f}"
      for row, other in (
        ("`dropbp`", f"dropbp@{b:g}"),
        ("`full@b` (fewer steps)", f"full@{b:g}"),
        ("`full` (all steps)", "full"),
      ):
        d = np.array([mine[s] - bpb[other][s] for s in sorted(mine)])
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        cell = body[row][column]
        assert cell.strip("*") == f"{d.mean():+.4f} ± {half:.4f}", (row, column)
        assert cell.startswith("**") == (abs(d.mean()) > half), (row, column)
        checked += 1
  assert checked == 9 * len(doc_tables.LM_PEERS)


def _body(table: str) -> dict[str, dict[str, str]]:
  lines = table.splitlines()
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  return {
    cells[0]: dict(zip(head[1:], cells[1:], strict=True))
    for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
  }


def test_the_adam_count_tables_pair_the_two_studies_by_hand():
  """`lm_adam_count`'s per-entry-minus-optax cells, and the curves' last
  column, recomputed from the two studies' run records."""
  import json

  import numpy as np
  from scipy import stats

  def runs(path):
    return json.loads(pathlib.Path(path).read_text())["runs"]

  optax_runs = runs(doc_tables.LM_PEERS["pydoc"])
  mine_runs = runs(doc_tables.LM_ADAM_COUNT)
  body = _body(doc_tables.TABLES["lm_adam_count"]())
  assert set(body) == {r["method"] for r in mine_runs}
  for method, row in body.items():
    a = {r["seed"]: r["test_bpb"] for r in mine_runs if r["method"] == method}
    b = {r["seed"]: r["test_bpb"] for r in optax_runs if r["method"] == method}
    d = np.array([a[s] - b[s] for s in sorted(a)])
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    if not d.any():  # Full fine-tuning: the same runs under both counts.
      assert row["per entry minus optax's"] == "+0.0000 ± 0.0000"
      continue
    cell = row["per entry minus optax's"]
    assert cell.strip("*") == f"{d.mean():+.4f} ± {half:.4f}", method
    assert cell.startswith("**") == (abs(d.mean()) > half), method
  curves = _body(doc_tables.TABLES["lm_adam_count_curves"]())
  last = [
    r["curve"]["value"][-1] for r in mine_runs if r["method"] == "rgft_budget@0.5"
  ]
  assert curves["rgft_budget@0.5 (per entry)"]["150"] == f"{np.mean(last):.3f}"


def test_the_lever_tables_read_each_lever_s_own_runs():
  """`lm_levers`: a lever minus a method of the default study, recomputed from
  both studies' records; its changed setting read from the configs by hand.
  `lm_levers_decisions`: seed 0's recorded decisions."""
  import json

  import numpy as np
  from scipy import stats

  def study(path):
    return json.loads(pathlib.Path(path).read_text())

  default = study(doc_tables.LM_ADAM_COUNT)
  body = _body(doc_tables.TABLES["lm_levers"]())
  for label, path in doc_tables.LM_LEVERS.items():
    lever = study(path)
    mine = {r["seed"]: r["test_bpb"] for r in lever["runs"]}
    for other in ("dropbp@0.5", "full"):
      theirs = {
        r["seed"]: r["test_bpb"] for r in default["runs"] if r["method"] == other
      }
      d = np.array([mine[s] - theirs[s] for s in sorted(mine)])
      half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
      assert body[label][f"minus {other}"].strip("*") == f"{d.mean():+.4f} ± {half:.4f}"
    key = "budget_hysteresis" if label.startswith("hyst") else "budget_every"
    assert body[label]["changed"] == f"{key} {lever['config'][key]}"
  decisions = _body(doc_tables.TABLES["lm_levers_decisions"]())
  seed0 = next(
    r for r in study(doc_tables.LM_LEVERS["hyst05"])["runs"] if r["seed"] == 0
  )
  for step, names in seed0["budget"]["decisions"]:
    assert decisions[str(step)]["trained (hyst05)"] == ", ".join(sorted(names))


def test_the_runtime_targets_table_reads_the_right_rows():
  """Each cell of `bench_runtime_targets`, looked up by hand in the JSON."""
  import json

  r = json.loads((ROOT / "benchmarks/results/runtime.json").read_text())
  lines = doc_tables.bench_runtime_targets().splitlines()[2:]
  assert len(lines) == len(r["cases"])
  for line, case in zip(lines, r["cases"], strict=True):
    cells = [c.strip() for c in line.strip("|").split("|")]

    def cell(mode, f, key, rows=case["rows"]):
      (row,) = [x for x in rows if x["mode"] == mode and x["fraction_detached"] == f]
      return f"{row[key]:.2f}"

    assert cells == [
      case["case"],
      cell("runtime", 0.0, "time_vs_plain"),
      cell("runtime", 0.75, "predicted_flops_vs_full"),
      cell("runtime", 0.75, "time_vs_plain"),
      cell("compiled", 0.75, "time_vs_plain"),
      cell("recompute", 0.75, "peak_vs_plain"),
    ]


def test_the_methods_table_says_where_each_name_parses():
  """Each row's tasks and budgets, checked by parsing the names in each study."""
  from experiments import methods as vit
  from experiments.lm import methods as lm

  rows = doc_tables.methods().splitlines()[2:]
  studies = {"ViT digits": vit.REGISTRY, "byte-level LM": lm.METHODS}
  assert len(rows) == len(set(vit.REGISTRY) | set(lm.METHODS))
  for row in rows:
    name, _, where = (c.strip() for c in row.strip("|").split("|"))
    name = name.strip("`")
    for label, methods in studies.items():
      cell = re.search(re.escape(label) + r"( \((also )?@b\))?", where)
      plain = _parses(methods, name)
      budgeted = _parses(methods, f"{name}@0.5")
      assert (cell is not None) == (plain or budgeted), (name, label)
      if cell is not None:
        want = "" if not budgeted else " (also @b)" if plain else " (@b)"
        assert (cell[1] or "") == want, (name, label)


def _parses(methods, name):
  try:
    methods.parse(name)
  except ValueError:
    return False
  return True
