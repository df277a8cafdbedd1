"""Records of small ViT and LM studies, for checking that a harness change
leaves every figure as it was.

`python -m tools.harness_records --out before.json` runs a few methods of
each study on tiny settings (both ViT layouts, every kind of step: dense,
detached, runtime-gated, LISA, LoRA, adapters, masks, DropBP, GreenTrainer)
and writes their run records without the wall times. Run it before and after
a change and compare: `python -m tools.harness_records --compare before.json
after.json` prints every path whose value differs and exits 1 if one does.
A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
from typing import Any

VIT_METHODS = (
  "full,rgft_blocks,lisa,lora,adapters,random_sparse,rgft_budget@0.5,"
  "dropbp@0.5,greentrainer@0.5,full@0.5,static_budget@0.7"
)
VIT_SCAN_METHODS = "full,rgft_blocks,rgft_budget@0.5,dropbp@0.5"
LM_METHODS = (
  "full,full@0.5,rgft_blocks,rgft_heads,rgft_budget@0.5,dropbp@0.5,"
  "greentrainer@0.5,lisa,lora,static_budget@0.7"
)
# What varies from run to run of the same settings (times), or names a place.
_DROPPED = ("config", "workdir")


def strip(x: Any) -> Any:
  """`x` without wall times, configs and work directories, at any depth."""
  if isinstance(x, dict):
    return {
      k: strip(v)
      for k, v in x.items()
      if k not in _DROPPED and not k.endswith("wall_s")
    }
  if isinstance(x, list):
    return [strip(v) for v in x]
  return x


def records(workdir: str) -> dict[str, Any]:
  """The stripped run records of the small studies, by study."""
  from experiments import finetune
  from experiments.lm import study as lm_study

  out = {}
  for scan in (False, True):
    cfg = finetune.Config(
      size="mu",
      patch=7,
      pretrained="train",
      pretrain_steps=20,
      batch_size=8,
      eval_batch_size=64,
      steps=12,
      log_every=2,
      eval_every=4,
      ckpt_every=5,
      seeds=1,
      tasks="label_shift",
      methods=VIT_SCAN_METHODS if scan else VIT_METHODS,
      budget_every=4,
      lisa_period=4,
      scan=scan,
      workdir=f"{workdir}/vit{int(scan)}",
      progress=False,
    )
    cfg.validate()
    runs = finetune.study(cfg)["tasks"]["label_shift"]["runs"]
    out[f"vit_scan{int(scan)}"] = strip(runs)
  cfg = dataclasses.replace(
    lm_study.get_config("quick"), methods=LM_METHODS, workdir=f"{workdir}/lm"
  )
  out["lm"] = strip(lm_study.study(cfg, log=lambda *a: None)["runs"])
  return out


def differences(a: Any, b: Any, path: str = "") -> list[str]:
  """Every path where `a` and `b` differ (types, keys, lengths or values).

  >>> differences({"x": [1, 2], "y": 3}, {"x": [1, 5], "z": 3})
  ['/x[1]: 2 != 5', '/y: only in the first', '/z: only in the second']
  """
  if type(a) is not type(b):
    return [f"{path}: {type(a).__name__} != {type(b).__name__}"]
  if isinstance(a, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      if k not in b:
        out.append(f"{path}/{k}: only in the first")
      elif k not in a:
        out.append(f"{path}/{k}: only in the second")
      else:
        out += differences(a[k], b[k], f"{path}/{k}")
    return out
  if isinstance(a, list):
    if len(a) != len(b):
      return [f"{path}: {len(a)} != {len(b)} entries"]
    return [
      d
      for i, (u, v) in enumerate(zip(a, b, strict=True))
      for d in differences(u, v, f"{path}[{i}]")
    ]
  return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="Write the records here.")
  parser.add_argument("--compare", nargs=2, metavar=("FIRST", "SECOND"))
  args = parser.parse_args(argv)
  if args.compare:
    first, second = (json.loads(pathlib.Path(p).read_text()) for p in args.compare)
    found = differences(first, second)
    print("\n".join(found) or "no difference")
    return 1 if found else 0
  if not args.out:
    parser.error("give --out (run the studies) or --compare (two record files)")
  with tempfile.TemporaryDirectory() as workdir:
    out = records(workdir)
  pathlib.Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True))
  print(f"{sum(len(v) for v in out.values())} runs -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
