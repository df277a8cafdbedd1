"""Every notebook runs top to bottom on the quick config, as a script (jupytext
percent format)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def test_every_notebook_is_a_documented_percent_script():
  listed = re.findall(
    r"\(\.\./notebooks/(\w+\.py)\)", (ROOT / "docs/notebooks.md").read_text()
  )
  assert sorted(listed) == [p.name for p in NOTEBOOKS]
  for path in NOTEBOOKS:
    text = path.read_text()
    assert "formats: ipynb,py:percent" in text, path.name
    assert text.count("\n# %%") >= 2, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_quick(path, tmp_path_factory):
  shared = tmp_path_factory.getbasetemp() / "notebooks"  # Pretraining cached across.
  env = {
    **os.environ,
    "RGFT_CONFIG": "quick",
    "MPLBACKEND": "Agg",
    "WORKDIR": str(shared / "work"),
    "FIGURES": str(shared / "figures"),
    # The repository's own packages, whatever the environment has installed.
    "PYTHONPATH": os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  }
  done = subprocess.run(
    [sys.executable, str(path)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
