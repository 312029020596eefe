"""Checks a run's config before anything is compiled or written, and turns
its `model` section into a GPTConfig."""

import json
import os

import ml_collections

from configs import default
from model import GPTConfig
from trainer import optim
from trainer.errors import ConfigError


def validate(config) -> None:
  t = config.train
  for name in ("steps", "batch_size", "learning_rate", "grad_accum_steps"):
    if t[name] <= 0:
      raise ConfigError(f"train.{name} must be positive, got {t[name]}")
  if not 0 <= t.warmup_steps <= t.steps:
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be between 0 "
                      f"and train.steps={t.steps}")
  _check_schedule(config)
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                      f"train.grad_accum_steps={t.grad_accum_steps}")
  for section in ("eval", "checkpoint"):
    if config[section].every_steps <= 0:
      raise ConfigError(f"{section}.every_steps must be positive, got "
                        f"{config[section].every_steps}")
  if config.sample.temperature < 0 or not 0 < config.sample.top_p <= 1:
    raise ConfigError("sample.temperature must be >= 0 and sample.top_p in "
                      "(0, 1]")
  model_config(config, vocab_size=max(config.model.vocab_size, 1))


def _check_schedule(config) -> None:
  t, c = config.train, config.cooldown
  for name, value, allowed in (
      ("train.schedule", t.schedule, optim.SCHEDULES),
      ("train.decay_shape", t.decay_shape, tuple(optim.DECAY_SHAPES)),
      ("cooldown.shape", c.shape, ("",) + tuple(optim.DECAY_SHAPES))):
    if value not in allowed:
      raise ConfigError(f"{name}={value!r}; choose one of {list(allowed)}")
  if not 0 < t.decay_fraction <= 1:
    raise ConfigError(f"train.decay_fraction={t.decay_fraction} must be in "
                      "(0, 1]")
  if not 0 <= t.min_lr_ratio <= 1:
    raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
  decay_start, decay_steps, _ = optim.decay_phase(config)
  if t.schedule == "wsd" and decay_start < t.warmup_steps:
    raise ConfigError(
        f"the wsd decay starts at step {decay_start}, before "
        f"train.warmup_steps={t.warmup_steps} ends; shorten the warmup or "
        "train.decay_fraction")
  if any(not 0 < s <= t.steps for s in config.checkpoint.keep_steps):
    raise ConfigError(
        f"checkpoint.keep_steps={tuple(config.checkpoint.keep_steps)} must "
        f"be steps between 1 and train.steps={t.steps}")
  if c.steps < 0 or c.from_step < 0:
    raise ConfigError("cooldown.from_step and cooldown.steps must be >= 0")


def model_config(config, vocab_size: int) -> GPTConfig:
  """GPTConfig from config.model; vocab_size 0 there means the tokenizer's."""
  fields = dict(config.model)
  if fields["vocab_size"] and fields["vocab_size"] < vocab_size:
    raise ConfigError(
        f"model.vocab_size={fields['vocab_size']} is smaller than the "
        f"tokenizer's {vocab_size}; raise it or set it to 0 (automatic)")
  fields["vocab_size"] = fields["vocab_size"] or vocab_size
  try:
    return GPTConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None


def save(config, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=1))


def load_saved(workdir: str) -> ml_collections.ConfigDict:
  """A run's config.json; fields added to the code since it was written take
  their defaults, which keep its behaviour."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{workdir!r} holds no trained run (no config.json); "
                      "train one there first with --mode=train")
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(
      _merged(default.get_config().to_dict(), saved))


def _merged(defaults: dict, saved: dict) -> dict:
  merged = dict(defaults)
  for key, value in saved.items():
    merged[key] = (_merged(defaults[key], value)
                   if isinstance(defaults.get(key), dict) else value)
  return merged


def cooldown_branch(parent, cooldown, parent_workdir: str
                    ) -> tuple[ml_collections.ConfigDict, str]:
  """The config and workdir of a cooldown branch of the run in
  `parent_workdir` (config `parent`): its checkpoint at cooldown.from_step,
  then cooldown.steps steps of decay. The branch is a run of its own;
  nothing of the parent's changes."""
  t, start, steps = parent.train, cooldown.from_step, cooldown.steps
  if steps <= 0:
    raise ConfigError("--mode=cooldown needs --config.cooldown.steps=K > 0 "
                      "(the decay steps) and --config.cooldown.from_step=S")
  if parent.cooldown.steps > 0:
    raise ConfigError(f"{parent_workdir} is itself a cooldown branch; branch "
                      f"from its run, {parent.cooldown.parent}")
  if t.schedule == "cosine":
    raise ConfigError(
        f"{parent_workdir} was trained with train.schedule=cosine, which has "
        "no stable phase to branch from; train it with "
        "--config.train.schedule=wsd (or constant)")
  stable_end = optim.decay_phase(parent)[0]
  if not t.warmup_steps <= start <= stable_end:
    raise ConfigError(
        f"cooldown.from_step={start} is outside the stable phase of "
        f"{parent_workdir}: steps {t.warmup_steps} to {stable_end}")
  config = ml_collections.ConfigDict(parent.to_dict())
  config.train.steps = start + steps
  config.checkpoint.keep_steps = ()
  workdir = cooldown.workdir or os.path.join(
      parent_workdir, "cooldowns", f"{start}+{steps}")
  config.cooldown.update(from_step=start, steps=steps, shape=cooldown.shape,
                         workdir=workdir,
                         parent=os.path.abspath(parent_workdir))
  return config, workdir
