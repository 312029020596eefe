"""A run's config as train.py builds it from --config=BASE and the same
--config.* flags, checked; the digest that names a run; a step's FLOPs."""

import hashlib
import json
import os
import warnings

from absl import flags
from ml_collections import config_flags

from launch.local import REPO
from errors import BadInput


def _step_flops(config) -> float:
  """A train step's FLOPs as run.json counts them (6 N per token, N the
  non-embedding parameters: the vocabulary, unknown before the data is
  read, does not count)."""
  from trainer import config as config_lib, metrics, objectives
  model = config_lib.model_config(config, 1)
  objective = config.train.objective
  return (metrics.flops_per_token(model, objective) *
          config.train.batch_size *
          objectives.tokens_per_row(objective, model.seq_len))


def _budget_steps(config, flops: float) -> int:
  """The steps that spend `flops` (at least 1)."""
  return max(1, round(flops / _step_flops(config)))


def _check_branch(config, cooldown: dict, run_workdir: str,
                  where: str) -> None:
  """Builds a branch's config as train.py --mode=cooldown does from the
  run's saved config (its warmup capped as the run caps it), and checks it:
  e.g. that it starts after the warmup."""
  from trainer import config as config_lib, saved_config
  from trainer.errors import ConfigError
  saved = config_lib.capped_warmup(config)[0]
  fields = config.cooldown.copy_and_resolve_references()
  fields.update(cooldown)
  try:
    config_lib.validate(saved_config.cooldown_branch(saved, fields,
                                                     run_workdir)[0])
  except ConfigError as e:
    raise BadInput(f"{where}: {e}") from None


def _tuples(value):
  """Lists in a spec are tuples in a config (config_flags has no lists)."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _flag_text(value) -> str:
  """The text config_flags parses back to `value`: tuples as quoted reprs,
  booleans in absl's spelling."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, tuple):
    return repr(value)
  return str(value)


def _flags(values: dict) -> list:
  return [f"--config.{field}={_flag_text(value)}"
          for field, value in values.items()]


def _config(base: str, values: dict, where: str):
  """The config train.py builds from --config=BASE and these overrides: the
  same flags through the same config_flags parsing, then checked."""
  from trainer import config as config_lib  # jax: only once a spec is read
  from trainer.errors import ConfigError
  argv = ["train.py", f"--config={os.path.join(REPO, base)}", *_flags(values)]
  flag_values = flags.FlagValues()
  try:
    with warnings.catch_warnings():  # config_flags' load_module()
      warnings.simplefilter("ignore", DeprecationWarning)
      holder = config_flags.DEFINE_config_file(
          "config", flag_values=flag_values, sys_argv=argv, lock_config=True)
      flag_values(argv)
    config = holder.value
  except (AttributeError, KeyError) as e:
    raise BadInput(
        f"{where}: unknown config field ({_first_line(e)})") from None
  except (flags.Error, TypeError, ValueError) as e:
    raise BadInput(f"{where}: {_first_line(e)}") from None
  try:
    config_lib.validate(config)
  except ConfigError as e:
    raise BadInput(f"{where}: {e}") from None
  return config


def _first_line(error: Exception) -> str:
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]  # the KeyError inside ml_collections' AttributeError
  return next((line.strip() for line in str(error).splitlines()
               if line.strip()), type(error).__name__)


def _canonical(base: str, values: dict, where: str):
  """(values, config): the values as train.py reads them (1 -> 1.0 in a
  float field), and its config. A value that does not read back as itself
  has the wrong type."""
  values = {field: _tuples(value) for field, value in values.items()}
  config = _config(base, values, where)
  canonical = {}
  for field, value in values.items():
    parsed = config
    for key in field.split("."):
      parsed = parsed[key]
    if parsed != value or (type(parsed) is bool) != (type(value) is bool):
      raise BadInput(f"{where}: {field}={value!r} reads back as {parsed!r}; "
                      "give a value of the field's type "
                      f"({type(parsed).__name__})")
    canonical[field] = parsed
  return canonical, config


def config_digest(config) -> str:
  """The sha256 of a run's config as the run uses it (its config.json),
  checkpoint.keep_steps left out: cooldown budgets add checkpoints to a run,
  not another run."""
  from trainer import config as config_lib
  fields = config_lib.capped_warmup(config)[0].to_dict()
  fields["checkpoint"].pop("keep_steps", None)
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()
                        ).hexdigest()
