"""One configuration source per study: `get_config(arg)`, the shared sub-configs
and `--config` on every command line."""

import dataclasses
import hashlib
import inspect
import itertools
import json
import re

import pytest

from experiments import ablate
from experiments import cli
from experiments import configs
from experiments import finetune
from experiments import vit_plateau
from experiments.lm import plateau
from experiments.lm import study

STUDIES = {
  "finetune": finetune,
  "ablate": ablate,
  "lm": study,
  "lm_plateau": plateau,
  "vit_plateau": vit_plateau,
}
SHARED = (
  configs.RgftConfig,
  configs.BudgetConfig,
  configs.BaselineConfig,
  configs.RunConfig,
)
# What each study's quick settings were before `get_config` (ablate.QUICK,
# lm.study.Config.quick(), lm.plateau.Config.tiny()), over its defaults.
OLD_QUICK = {
  "ablate": {
    "tasks": "label_shift",
    "seeds": 1,
    "size": "mu",
    "pretrained": "train",
    "steps": 6,
    "pretrain_steps": 6,
    "batch_size": 16,
    "pretrain_batch_size": 16,
    "log_every": 3,
    "thresholds": "0.1:0.3,0.5:1.0",
    "warmups": "3,6",
    "batch_sizes": "8,16",
    "lr_values": "1e-3,3e-3",
    "levers": "default,hard,full,full@b",
    "lever_budget": 0.7,
    "progress": False,
  },
  "lm": {
    "seeds": 2,
    "pretrained": "train",
    "learning_rates": "1e-3,1e-2",
    "steps": 12,
    "batch_size": 4,
    "context": 16,
    "pretrain_steps": 30,
    "pretrain_batch_size": 8,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 256,
    "budget_every": 4,
    "lora_rank": 2,
    "lisa_period": 12,
    "greentrainer_period": 1.0,
    "eval_windows": 24,
    "eval_every": 4,
    "log_every": 2,
    "progress": False,
  },
  "lm_plateau": {
    "corpus": "pydoc",
    "context": 16,
    "d_model": 16,
    "n_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 1,
    "d_ff": 32,
    "batch_size": 4,
    "learning_rate": 1e-2,
    "warmup_steps": 4,
    "eval_every": 5,
    "eval_windows": 16,
    "window": 2,
    "threshold": 0.05,
    "max_steps": 40,
    "export": "",
    "checkpoint_every_s": 1e9,
    "progress": False,
  },
}


def _flags(module, argv=()) -> dict:
  """Each flag of `module`'s command line: its default and help."""
  parsers = []
  real = cli.parser

  def keep(*args, **kwargs):
    parsers.append(real(*args, **kwargs))
    return parsers[-1]

  with pytest.MonkeyPatch.context() as m:
    m.setattr(cli, "parser", keep)
    module.parse(list(argv))
  return {
    a.option_strings[0]: (a.default, a.help)
    for a in parsers[-1]._actions
    if a.option_strings and a.dest != "help"
  }


@pytest.mark.parametrize("name", STUDIES)
def test_no_flags_give_the_default_config(name):
  module = STUDIES[name]
  cfg = module.get_config()
  assert module.parse([]) == cfg == module.get_config("") == type(cfg)()


@pytest.mark.parametrize("name", STUDIES)
def test_every_flag_has_help_and_parses_back(name):
  """Every field is a flag with help text; the quick config spelled out as
  flags (no --config) parses back to itself."""
  module = STUDIES[name]
  flags = _flags(module)
  assert all(text for _, text in flags.values()), flags
  quick = module.get_config("quick")
  argv = []
  for flag in flags:
    if flag == "--config":
      continue
    value = getattr(quick, flag[2:])
    if isinstance(value, bool):
      argv.append(flag if value else f"--no-{flag[2:]}")
    else:
      argv.append(f"{flag}={value}")
  assert module.parse(argv) == quick


@pytest.mark.parametrize("name", OLD_QUICK)
def test_quick_is_the_old_quick_settings(name):
  module = STUDIES[name]
  want = dataclasses.replace(module.get_config(), **OLD_QUICK[name])
  assert module.get_config("quick") == want
  assert module.parse(["--config", "quick"]) == want
  assert module.parse(["--config=quick"]) == want


@pytest.mark.parametrize("name", STUDIES)
def test_given_flags_win_over_the_config_in_either_order(name):
  module = STUDIES[name]
  quick = module.get_config("quick")
  for argv in (
    ["--config=quick", "--eval_every=7"],
    ["--eval_every=7", "--config=quick"],
  ):
    assert module.parse(argv) == dataclasses.replace(quick, eval_every=7)
  # The parser's defaults are the chosen config's values.
  assert _flags(module, ["--config=quick"])["--eval_every"][0] == quick.eval_every


@pytest.mark.parametrize("name", STUDIES)
def test_an_unknown_config_is_refused_naming_the_allowed_ones(name):
  module = STUDIES[name]
  for call in (
    lambda: module.get_config("tiny"),
    lambda: module.parse(["--config=tiny"]),
  ):
    with pytest.raises(ValueError, match=r"Unknown config 'tiny'.*'', 'quick'"):
      call()


@pytest.mark.parametrize("name", STUDIES)
def test_every_config_passes_its_checks(name):
  STUDIES[name].get_config().validate()
  STUDIES[name].get_config("quick").validate()


def test_configs_are_frozen():
  for module in STUDIES.values():
    cfg = module.get_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
      cfg.workdir = "elsewhere"


def _own_declarations(klass) -> dict[str, tuple[str, str]]:
  """Each field declared in `klass`'s own body: (the line above, the line)."""
  lines = inspect.getsource(klass).splitlines()
  out = {}
  for above, line in itertools.pairwise(lines):
    m = re.match(r"  (\w+): [\w\[\] |.,]+ = ", line)
    if m:
      out[m.group(1)] = (above, line)
  return out


def test_each_shared_field_is_declared_once_with_one_help_text():
  """A study that changes a shared default redeclares the field without a
  comment, so every study's --help says the same of it."""
  classes = [type(m.get_config()) for m in STUDIES.values()]
  for part in SHARED:
    names = [f.name for f in dataclasses.fields(part)]
    helps = cli.field_help(part)
    users = [c for c in classes if issubclass(c, part)]
    assert users, part
    for cls in users:
      assert {n: cli.field_help(cls)[n] for n in names} == helps, (cls, part)
      for klass in cls.__mro__:
        if klass in SHARED or not dataclasses.is_dataclass(klass):
          continue
        for name, (above, line) in _own_declarations(klass).items():
          if name in names:
            assert "#" not in line and not above.strip().startswith("#"), line
  # The flags say the same in every study that has them.
  seen: dict[str, str] = {}
  for module in (finetune, ablate, study):
    for flag, (_, text) in _flags(module).items():
      if flag[2:] in {f.name for p in SHARED for f in dataclasses.fields(p)}:
        assert seen.setdefault(flag, text) == text, flag


def test_studies_keep_their_own_defaults_of_shared_fields():
  """The defaults each study had before the shared sub-configs."""
  lm = study.get_config()
  assert (lm.budget_every, lm.lisa_period, lm.lora_rank) == (25, 25, 8)
  assert (lm.seeds, lm.eval_every, lm.workdir) == (4, 25, "workdir/lm")
  vit = finetune.get_config()
  assert (vit.budget_every, vit.lisa_period, vit.lora_rank) == (20, 20, 4)
  assert (vit.seeds, vit.eval_every, vit.workdir) == (5, 20, "workdir/finetune")
  abl = ablate.get_config()
  assert (abl.seeds, abl.eval_every, abl.workdir) == (5, 0, "workdir/ablate")


def test_shared_checks_name_the_flag():
  bad = {
    "beta": 1.5,
    "adam_count": "nope",
    "budget_every": 0,
    "budget_hysteresis": -1.0,
    "greentrainer_period": 0.0,
    "lora_rank": 0,
    "lisa_period": 0,
    "seeds": 0,
    "log_every": 0,
    "eval_every": -1,
    "workdir": " ",
    "tune_budget": 1.5,
  }
  for module in (finetune, study):
    for name, value in bad.items():
      cfg = dataclasses.replace(module.get_config("quick"), **{name: value})
      with pytest.raises(ValueError, match=name):
        cfg.validate()


def _sha(settings) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def test_vit_signatures_are_the_recorded_ones():
  """Regression pin: the run settings (signatures) of the ViT default and the
  ablations' quick config, recorded from the code before `get_config` and the
  shared sub-configs; cached runs and committed results are keyed by them."""
  assert finetune.get_config().run_settings() == {
    "adam_count": "global",
    "adapter_width": 8,
    "augment": False,
    "batch_size": 64,
    "beta": 0.9,
    "budget_every": 20,
    "budget_exact": False,
    "budget_hysteresis": 0.1,
    "budget_ramp": 0,
    "budget_refresh": False,
    "dataset": "embedded",
    "error_method": "norm_product",
    "eval_batch_size": 250,
    "eval_every": 20,
    "gate_recompute": True,
    "greentrainer_period": 0.4,
    "image_size": 0,
    "init": "",
    "learning_rate": 0.001,
    "lisa_layers": 1,
    "lisa_period": 20,
    "log_every": 10,
    "lora_rank": 4,
    "min_scale": 0.01,
    "patch": 7,
    "pretrain_batch_size": 64,
    "pretrain_learning_rate": 0.001,
    "pretrain_steps": 400,
    "pretrained": {
      "input_shift": "40b849b59c219ac87eca0deeaaf6a2f9e8195754f45eae3332c41523e3b6dce7",
      "label_shift": "dbdde1045efe009eff1ee224bd145aafacdbc6141102e61a73399aecb5c28652",
    },
    "scan": False,
    "size": "xs",
    "sparse_fraction": 0.926,
    "steps": 200,
    "thresh_final": 0.3,
    "thresh_init": 0.1,
    "val_fraction": 0.1,
    "warmup_steps": 0,
  }
  assert _sha(ablate.get_config().run_settings()) == (
    "ab672e882f06dcb4e0446a4204ceddb56821a2911d478a56412e18848cbead38"
  )
  assert _sha(ablate.get_config("quick").run_settings()) == (
    "c9871d34c533b0949a8d83205ce52242b633745915e432fe47b1369983bbe4ff"
  )


def test_lm_signatures_are_the_recorded_ones(monkeypatch):
  """Regression pin: the LM study's run signatures of its default (resolved
  from the shipped decoder) and quick configs, recorded from the code before
  `get_config` and the shared sub-configs, with the corpora's fingerprint (this
  machine's) held fixed; cached runs are kept under them."""
  monkeypatch.setattr(study.data, "fingerprint", lambda corpora: "fingerprint")
  assert study.signature(study.get_config().resolved()) == (
    "7c03f7eafbd1693a035e97044df82d8c8bd07d220eed5549e4d8d31cebdc2bfc"
  )
  assert study.signature(study.get_config("quick")) == (
    "77e6b27dcb976d751962db548dff41519374c12c4d54e7016f281809a027fb25"
  )
