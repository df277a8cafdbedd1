"""Every notebook runs top to bottom in QUICK mode, as a script (jupytext percent format)."""

import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.py"))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_quick(path, tmp_path_factory):
  shared = tmp_path_factory.getbasetemp() / "notebooks"  # Pretraining cached across.
  env = {
    **os.environ,
    "QUICK": "1",
    "MPLBACKEND": "Agg",
    "WORKDIR": str(shared / "work"),
    "FIGURES": str(shared / "figures"),
  }
  done = subprocess.run(
    [sys.executable, str(path)],
    cwd=path.parent.parent,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
