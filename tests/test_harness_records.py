"""The record comparison that checks a harness change (`tools.harness_records`)."""

import json

from tools import harness_records


def test_wall_times_configs_and_workdirs_are_dropped_at_any_depth():
  record = {
    "method": "full",
    "wall_s": 1.0,
    "runs": [{"pretrain_wall_s": 2.0, "config": {}, "loss": [0.5]}],
    "workdir": "/tmp/x",
  }
  assert harness_records.strip(record) == {"method": "full", "runs": [{"loss": [0.5]}]}


def test_every_difference_is_named_and_fails_the_comparison(tmp_path, capsys):
  first = {"vit": [{"flops": 1.0, "loss": [0.5, 0.4]}], "lm": [{"a": 1}]}
  second = {"vit": [{"flops": 1.0, "loss": [0.5, 0.3]}], "lm": [{"a": 1}, {"b": 2}]}
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(first))
  b.write_text(json.dumps(second))
  assert harness_records.main(["--compare", str(a), str(b)]) == 1
  assert capsys.readouterr().out.splitlines() == [
    "/lm: 1 != 2 entries",
    "/vit[0]/loss[1]: 0.4 != 0.3",
  ]
  assert harness_records.main(["--compare", str(a), str(a)]) == 0
  assert capsys.readouterr().out.strip() == "no difference"
  assert harness_records.differences(1, 1.0) == [": int != float"]
