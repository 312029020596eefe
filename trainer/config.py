"""Checks a run's config before anything is compiled or written, and turns
its `model` section into a GPTConfig."""

import json
import os

import ml_collections

from model import GPTConfig
from trainer.errors import ConfigError


def validate(config) -> None:
  t = config.train
  for name in ("steps", "batch_size", "learning_rate", "grad_accum_steps"):
    if t[name] <= 0:
      raise ConfigError(f"train.{name} must be positive, got {t[name]}")
  if not 0 <= t.warmup_steps <= t.steps:
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be between 0 "
                      f"and train.steps={t.steps}")
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
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{workdir!r} holds no trained run (no config.json); "
                      "train one there first with --mode=train")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
