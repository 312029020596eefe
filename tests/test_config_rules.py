"""Every config field has a rule (trainer.config.RULES) and every rule
refuses what it should with one line naming the field; each rule across
fields (CROSS_CHECKS) refuses its cases. Fast: no model is built."""

import glob
import importlib
import json
import os

import ml_collections
import pytest

from conftest import REPO
from configs import base
from data import tokenizers
from trainer import config as config_lib, saved_config
from trainer.errors import ConfigError


def _configs() -> dict:
  """name -> get_config() of every configs/*.py that has one: a new config
  is covered without being listed here."""
  found = {}
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.splitext(os.path.basename(path))[0]
    module = importlib.import_module(f"configs.{name}")
    if hasattr(module, "get_config"):
      found[name] = module.get_config()
  return found


CONFIGS = _configs()


def _leaves(tree: dict, prefix: str = ""):
  """Dotted names of the fields of a config's dict."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_the_configs_are_found():
  assert {"default", "gpt2_small", "gpt3_xl"} <= set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_has_a_rule_and_keeps_it(name):
  config = CONFIGS[name]
  without_rule = set(_leaves(config.to_dict())) - set(config_lib.RULES)
  assert not without_rule, f"add these to trainer.config.RULES: {without_rule}"
  config_lib.validate(config)


@pytest.mark.parametrize("flags", [
    dict(optimizer="adamw"),  # the recipe without Muon, a first ablation
    dict(optimizer="adamw", parametrization="mup")])
def test_the_default_takes_the_usual_ablations(flags):
  config = importlib.import_module("configs.default").get_config()
  config.train.optimizer = flags["optimizer"]
  config.model.parametrization = flags.get("parametrization", "standard")
  config_lib.validate(config)


def test_every_rule_is_for_a_field():
  fields = set().union(*(_leaves(c.to_dict()) for c in CONFIGS.values()))
  assert not set(config_lib.RULES) - fields


_WRONG_KIND = {int: 2.5, float: "0.1", str: 3, bool: 1, tuple: 3}


def _violations(rule: config_lib.Rule) -> list:
  """Values `rule` refuses: one of a wrong type, and one past each bound,
  outside the choices, empty, or with a bad item, as the rule has them."""
  bad = [_WRONG_KIND[rule.kind]]
  if rule.kind is int:
    bad.append(True)  # a bool is no integer
  if rule.kind is float:
    bad.append(float("nan"))
  if rule.low is not None:
    bad.append(rule.low if rule.low_open else rule.low - 1)
  if rule.high is not None:
    bad.append(rule.high if rule.high_open else rule.high + 1)
  if rule.choices:
    bad.append("bogus")
  if rule.nonempty:
    bad.append(rule.kind())
  if rule.items is not None:
    bad.append((_violations(rule.items)[0],))
  return bad


VIOLATIONS = [(field, value) for field, rule in config_lib.RULES.items()
              for value in _violations(rule)]


def _config(**fields) -> ml_collections.ConfigDict:
  """configs/base.py with `fields` ("section__name": value) set as
  config.json would give them: without ConfigDict's type conversions."""
  tree = base.get_config().to_dict()
  for key, value in fields.items():
    section, name = key.split("__")
    tree[section][name] = value
  return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize("field, value", VIOLATIONS,
                         ids=[f"{f}={v!r}" for f, v in VIOLATIONS])
def test_each_rule_refuses_in_one_line_naming_the_field(field, value):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(_config(**{field.replace(".", "__"): value}))
  message = str(e.value)
  assert message.startswith(f"{field}={value!r} must be "), message
  assert "\n" not in message


def test_a_missing_field_is_named():
  tree = base.get_config().to_dict()
  del tree["eval"]["max_batches"]
  with pytest.raises(ConfigError, match="the config has no field "
                     "eval.max_batches; build it from configs/base.py"):
    config_lib.validate(ml_collections.ConfigDict(tree))


CROSS_CASES = [
    ("batch_splits_into_microbatches",
     dict(train__batch_size=6, train__grad_accum_steps=4),
     "train.batch_size=6 is not divisible by train.grad_accum_steps=4"),
    ("keep_steps_inside_the_run",
     dict(train__steps=100, checkpoint__keep_steps=(50, 101)),
     "checkpoint.keep_steps=(50, 101) must be steps between 1 and "
     "train.steps=100"),
    ("cooldown_only_in_a_branch", dict(cooldown__steps=5),
     "cooldown.steps=5 makes a branch of a run: add --mode=cooldown"),
    ("cooldown_only_in_a_branch", dict(cooldown__parent="runs/x"),
     "cooldown.parent='runs/x' is set by --mode=cooldown alone"),
    ("cooldown_only_in_a_branch",
     dict(cooldown__steps=5, cooldown__from_step=10, cooldown__parent="/r"),
     "cooldown.from_step=10 + cooldown.steps=5 must equal "
     "train.steps=3600"),
    ("cosine_steps_after_the_warmup",
     dict(train__schedule="wsd", train__cosine_steps=80),
     "train.cosine_steps=80 shapes the cosine schedule, not "
     "train.schedule='wsd'"),
    ("cosine_steps_after_the_warmup",
     dict(train__schedule="cosine", train__cosine_steps=50),
     "train.cosine_steps=50 must exceed train.warmup_steps=50"),
    ("one_mesh_axis_free", dict(mesh__fsdp=-1),
     "mesh.data and mesh.fsdp are both -1"),
    ("mesh_rules_name_known_axes",
     dict(mesh__rules=(("heads", ("tensor", "model")),)),
     "mesh.rules entry ('heads', ('tensor', 'model')) must be (logical "
     "axis, mesh axes)"),
    ("mesh_rules_name_known_axes", dict(mesh__rules=(("head", "tensor"),)),
     "mesh.rules entry ('head', 'tensor') must be"),
    ("mesh_rules_name_known_axes", dict(mesh__rules=[["batch"]]),
     "mesh.rules entry ('batch',) must be"),
    ("model_is_consistent", dict(model__d_model=30, model__num_heads=4),
     "model.d_model=30 is not divisible by model.num_heads=4"),
    ("model_is_consistent", dict(model__attention_pattern="dense,glob"),
     "model.attention_pattern='dense,glob' must list layer kinds separated "
     "by commas, each one of ['dense', 'local']"),
    ("model_is_consistent",
     dict(model__attention_pattern="dense,local", model__scan_layers=True,
          model__num_layers=3),
     "model.num_layers=3 must be a multiple of the 2 layers of "
     "model.attention_pattern='dense,local' with model.scan_layers=True"),
    ("model_is_consistent",
     dict(model__position="rope", model__d_model=36, model__num_heads=4),
     "model.position='rope' rotates pairs of dimensions: head_dim = d_model "
     "/ num_heads = 9 must be even"),
    ("model_is_consistent", dict(model__attention="cudnn"),
     "model.attention='cudnn' needs model.dtype='bfloat16'"),
    ("top_k_within_vocabulary", dict(model__vocab_size=50, sample__top_k=51),
     "sample.top_k=51 exceeds the vocabulary of 50"),
    ("objective_fields_for_their_objective", dict(train__dpo_beta=0.5),
     "train.dpo_beta=0.5 applies to train.objective='dpo', not "
     "'next-token'; leave it at 0.1"),
    ("objective_fields_for_their_objective",
     dict(train__objective="dpo", data__pack=False),
     "data.pack=False applies to train.objective='sft', not 'dpo'"),
    ("dpo_without_dropout", dict(train__objective="dpo", model__dropout=0.1),
     "train.objective='dpo' scores the policy and its reference alike, "
     "without dropout: set model.dropout=0, not 0.1"),
    ("muon_fields", dict(train__optimizer="muon",
                         model__parametrization="mup"),
     "train.optimizer='muon' does not apply muP's per-layer Adam learning "
     "rates: use model.parametrization='standard' with it, or "
     "train.optimizer='adamw'"),
    ("muon_fields", dict(train__muon_learning_rate=0.03),
     "train.muon_learning_rate=0.03 applies to train.optimizer='muon', not "
     "'adamw'; leave it at "),
    ("model_is_consistent",
     dict(model__parametrization="mup", model__d_ff=100),
     "model.parametrization='mup' scales the MLP with d_model: set "
     "model.d_ff=0 (4 * d_model), not 100"),
    ("model_is_consistent",
     dict(model__parametrization="mup", model__mup_base_width=64),
     "model.mup_base_width=64 must be a positive multiple of "
     "model.num_heads=3"),
]


@pytest.mark.parametrize("check, fields, message", CROSS_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CROSS_CASES)])
def test_each_rule_across_fields_refuses(check, fields, message):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(_config(**fields))
  assert str(e.value).startswith(message), str(e.value)


def test_each_rule_across_fields_has_a_case():
  assert ({check.__name__ for check in config_lib.CROSS_CHECKS} ==
          {case[0] for case in CROSS_CASES})


def test_sample_settings_against_the_tokenizer():
  tokenizer = tokenizers.CharTokenizer.fit(["abc\nde"])  # 7 ids with EOT
  config = _config(sample__prompt="\nbad", sample__top_k=7)
  config_lib.check_with_tokenizer(config, tokenizer)
  with pytest.raises(ConfigError, match="sample.top_k=8 exceeds the "
                     "vocabulary of 7"):
    config_lib.check_with_tokenizer(_config(sample__top_k=8), tokenizer)
  with pytest.raises(ConfigError, match="sample.prompt='bad!': character '!' "
                     "is not in the vocabulary"):
    config_lib.check_with_tokenizer(_config(sample__prompt="bad!"), tokenizer)


def test_a_saved_config_from_before_a_field_keeps_its_behaviour(tmp_path):
  """load_saved gives a field missing from a run's config.json its default,
  or the value that keeps what the run computed where the default would
  not (model.vocab_multiple: 1, no padding; train.schedule: cosine, the
  only schedule before wsd became the default; data.order_version: 1, the
  epoch order the run started with); a saved value stays."""
  tree = base.get_config().to_dict()
  del tree["model"]["vocab_multiple"], tree["eval"]["max_batches"]
  del tree["train"]["schedule"], tree["data"]["order_version"]
  (tmp_path / "config.json").write_text(json.dumps(tree))
  saved = saved_config.load_saved(str(tmp_path))
  assert saved.model.vocab_multiple == 1
  assert saved.eval.max_batches == base.get_config().eval.max_batches
  assert saved.train.schedule == "cosine" and saved.data.order_version == 1
  assert base.get_config().data.order_version == 2
  config_lib.validate(saved)
  # A resume keeps the run's epoch order, whatever the command line says.
  kept = saved_config.as_the_run_keeps(base.get_config(), str(tmp_path))
  assert kept.data.order_version == 1 and kept.train.schedule == "wsd"
  saved_config.save(base.get_config(), str(tmp_path))
  assert saved_config.load_saved(str(tmp_path)).model.vocab_multiple == 128
