"""A run's config: a rule for every field, checked before anything is
compiled or written; the config a run uses (a short run's warmup capped);
its model section as a GPTConfig. Its config.json is trainer/saved_config.py.

Every field of configs/base.py has one entry in RULES (tests/
test_config_rules.py fails for a field without one), and every rule across
fields is one function in CROSS_CHECKS. Two checks need what a config alone
does not say: the mesh against the device count (sharding.make_mesh) and
the sample settings against the tokenizer (check_with_tokenizer).
"""

import dataclasses
import math

import ml_collections

from configs import base
from data import loader, prepare
from model import GPTConfig
from model.config import (ACTIVATIONS, ATTENTIONS, DTYPES, LOGICAL_AXES,
                          NORMS, PARAMETRIZATIONS, POSITIONS, REMAT_POLICIES)
from trainer import objectives, optim, sharding
from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
  """The values one field accepts: of type `kind` (a float field takes an
  int too, a tuple field a list, as config.json holds one; a bool is no
  number); numbers finite and within `low` and `high` (None: unbounded;
  exclusive where `low_open` or `high_open`), or one of `also`; strings one
  of `choices` if given; strings and tuples not empty if `nonempty`; tuple
  items each by `items`. `means` explains the special values."""
  kind: type
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  also: tuple = ()
  choices: tuple = ()
  nonempty: bool = False
  items: "Rule | None" = None
  means: str = ""

  def accepts(self, value) -> bool:
    if not _has_kind(value, self.kind):
      return False
    if self.kind in (int, float):
      return value in self.also or (math.isfinite(value) and
                                    self._in_range(value))
    if self.choices:
      return value in self.choices
    if self.nonempty and not value:
      return False
    return self.items is None or all(map(self.items.accepts, value))

  def _in_range(self, value) -> bool:
    above = self.low is None or (value > self.low if self.low_open else
                                 value >= self.low)
    below = self.high is None or (value < self.high if self.high_open else
                                  value <= self.high)
    return above and below

  def describe(self) -> str:
    if self.choices:
      return f"one of {list(self.choices)}"
    if self.kind in (int, float):
      what = "an integer" if self.kind is int else "a finite number"
      if self.low is not None and self.high is not None:
        what += (f" in {'(' if self.low_open else '['}{self.low}, "
                 f"{self.high}{')' if self.high_open else ']'}")
      elif self.low is not None:
        what += f" {'>' if self.low_open else '>='} {self.low}"
      elif self.high is not None:
        what += f" {'<' if self.high_open else '<='} {self.high}"
      return what + "".join(f" or {value}" for value in self.also)
    what = {bool: "True or False", str: "a string", tuple: "a tuple"}[
        self.kind]
    if self.nonempty:
      what = what.replace("a ", "a non-empty ", 1)
    if self.items is not None:
      what += f" whose items are each {self.items.describe()}"
    return what


def _has_kind(value, kind: type) -> bool:
  if isinstance(value, bool) or kind is bool:
    return type(value) is kind
  if kind is float:
    return isinstance(value, (int, float))
  return isinstance(value, (tuple, list) if kind is tuple else kind)


def one_of(*choices: str) -> Rule:
  return Rule(str, choices=choices)


COUNT = Rule(int, 1)
FLAG = Rule(bool)
TEXT = Rule(str)
MESH_SIZE = Rule(int, 1, also=(-1,), means="-1: all remaining devices")

# Every field's rule, by its dotted name, in configs/base.py's order.
RULES = {
    "model.vocab_size": Rule(int, 0, means="0: the tokenizer's"),
    "model.vocab_multiple": Rule(int, 1, means="1: no padding"),
    "model.num_layers": COUNT,
    "model.d_model": COUNT,
    "model.num_heads": COUNT,
    "model.d_ff": Rule(int, 0, means="0: 4 * d_model"),
    "model.seq_len": COUNT,
    "model.position": one_of(*POSITIONS),
    "model.rope_base": Rule(float, 1, low_open=True),
    "model.tie_embeddings": FLAG,
    "model.use_bias": FLAG,
    "model.dropout": Rule(float, 0, 1, high_open=True),
    "model.scan_layers": FLAG,
    "model.remat": one_of(*REMAT_POLICIES),
    "model.dtype": one_of(*DTYPES),
    "model.param_dtype": one_of(*DTYPES),
    "model.attention": one_of(*ATTENTIONS),
    "model.attention_chunks": COUNT,
    # Its kinds and its length against scan_layers: model_is_consistent.
    "model.attention_pattern": Rule(
        str, nonempty=True, means="layer kinds, comma-separated, e.g. "
        "'dense,local'"),
    "model.local_window": COUNT,
    "model.parametrization": one_of(*PARAMETRIZATIONS),
    "model.mup_base_width": Rule(int, 1, means="muP's base d_model; a "
                                 "multiple of model.num_heads"),
    "model.mup_base_heads": Rule(int, 0, means="muP's base model's heads; "
                                 "0: model.num_heads"),
    "model.norm": one_of(*NORMS),
    "model.qk_norm": FLAG,
    "model.activation": one_of(*ACTIVATIONS),
    "model.zero_init_proj": FLAG,
    "model.logit_softcap": Rule(float, 0, means="0: off"),
    "model.value_embeds": Rule(int, 0, means="0: none; at most half the "
                               "layers"),
    "data.source": TEXT,
    "data.tokenizer": one_of(*prepare.KINDS),
    "data.bpe_vocab_size": Rule(int, 257, means="the 256 bytes, EOT and "
                                "the merges"),
    "data.holdout": Rule(tuple, items=Rule(str, nonempty=True)),
    "data.val_fraction": Rule(float, 0, 1, low_open=True, high_open=True),
    "data.cache_dir": Rule(str, means="'': $GPT_JAX_CACHE or ~/.cache/gpt_jax"),
    "data.num_workers": Rule(int, 0, means="0: none, this process"),
    "data.fingerprint": FLAG,
    "data.pack": FLAG,
    "data.order_version": Rule(int, choices=loader.ORDER_VERSIONS),
    "train.objective": one_of(*objectives.OBJECTIVES),
    "train.sft_loss_on": one_of("response", "all"),
    "train.dpo_beta": Rule(float, 0, low_open=True),
    "train.steps": COUNT,
    "train.batch_size": COUNT,
    "train.grad_accum_steps": COUNT,
    "train.learning_rate": Rule(float, 0, low_open=True),
    "train.warmup_steps": Rule(int, 0),  # and see capped_warmup
    "train.schedule": one_of(*optim.SCHEDULES),
    "train.cosine_steps": Rule(int, 0, means="0: train.steps"),
    "train.decay_fraction": Rule(float, 0, 1, low_open=True),
    "train.decay_shape": one_of(*optim.DECAY_SHAPES),
    "train.min_lr_ratio": Rule(float, 0, 1),
    "train.b1": Rule(float, 0, 1, high_open=True),
    "train.b2": Rule(float, 0, 1, high_open=True),
    "train.eps": Rule(float, 0, low_open=True),
    "train.weight_decay": Rule(float, 0),
    "train.optimizer": one_of(*optim.OPTIMIZERS),  # and see muon_fields
    "train.muon_learning_rate": Rule(float, 0, low_open=True),
    "train.muon_momentum": Rule(float, 0, 1, high_open=True),
    "train.grad_clip": Rule(float, 0, low_open=True),
    "train.skip_nonfinite_updates": Rule(
        int, 0, means="0: stop at a non-finite loss"),
    "train.seed": Rule(int, 0),
    "train.log_every_steps": COUNT,
    "eval.every_steps": COUNT,
    "eval.batch_size": COUNT,
    "eval.max_batches": Rule(int, 0, means="0: all"),
    "checkpoint.every_steps": COUNT,
    "checkpoint.keep": COUNT,
    "checkpoint.keep_best": FLAG,
    "checkpoint.init_from": TEXT,
    "checkpoint.keep_steps": Rule(tuple, items=COUNT),
    "cooldown.from_step": Rule(int, 0),
    "cooldown.steps": Rule(int, 0),
    "cooldown.shape": Rule(str, choices=("", *optim.DECAY_SHAPES),
                           means="'': the run's train.decay_shape"),
    "cooldown.workdir": TEXT,
    "cooldown.parent": TEXT,
    "mesh.data": MESH_SIZE,
    "mesh.fsdp": MESH_SIZE,
    "mesh.tensor": MESH_SIZE,
    "mesh.rules": Rule(tuple, items=Rule(tuple)),
    "sample.prompt": Rule(str, nonempty=True),
    "sample.prompt_file": Rule(str, means="'': sample.prompt"),
    "sample.num_samples": COUNT,
    "sample.temperature": Rule(float, 0, means="0: greedy"),
    "sample.top_k": Rule(int, 0, means="0: no top-k filter"),
    "sample.top_p": Rule(float, 0, 1, low_open=True),
    "sample.max_new_tokens": COUNT,
    "sample.seed": Rule(int, 0),
    "sample.top": COUNT,
    "perf.peak_flops": Rule(float, 0, means="0: look up or measure"),
}


def validate(config) -> None:
  """Every field by its rule, then the rules across fields; raises a
  ConfigError naming the first field that breaks one. A warmup too long
  for the run is no error: the run caps it (capped_warmup)."""
  for field in RULES:
    check_field(config, field)
  for check in CROSS_CHECKS:
    check(config)


def check_field(config, field: str) -> None:
  section, name = field.split(".")
  if section not in config or name not in config[section]:
    raise ConfigError(f"the config has no field {field}; build it from "
                      "configs/base.py")
  rule, value = RULES[field], config[section][name]
  if not rule.accepts(value):
    raise ConfigError(f"{field}={value!r} must be {rule.describe()}" +
                      (f" ({rule.means})" if rule.means else ""))


# ---------------------------------------------------------------- across fields

def batch_splits_into_microbatches(config) -> None:
  t = config.train
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                      f"train.grad_accum_steps={t.grad_accum_steps}")


def keep_steps_inside_the_run(config) -> None:
  steps = config.train.steps
  if any(s > steps for s in config.checkpoint.keep_steps):
    raise ConfigError(
        f"checkpoint.keep_steps={tuple(config.checkpoint.keep_steps)} must "
        f"be steps between 1 and train.steps={steps}")


def cooldown_only_in_a_branch(config) -> None:
  """cooldown.steps and cooldown.parent describe a branch, which
  --mode=cooldown makes; a run with one and not the other would be
  neither."""
  c = config.cooldown
  if c.steps > 0 and not c.parent:
    raise ConfigError(f"cooldown.steps={c.steps} makes a branch of a run: "
                      "add --mode=cooldown (with --config.cooldown.from_step)"
                      ", or leave cooldown.steps at 0 to train")
  if c.parent and c.steps <= 0:
    raise ConfigError(f"cooldown.parent={c.parent!r} is set by --mode=cooldown"
                      " alone, with cooldown.steps > 0; leave it empty")
  if c.steps > 0 and c.from_step + c.steps != config.train.steps:
    raise ConfigError(
        f"cooldown.from_step={c.from_step} + cooldown.steps={c.steps} must "
        f"equal train.steps={config.train.steps} in a cooldown branch")


def cosine_steps_after_the_warmup(config) -> None:
  """train.cosine_steps ends cosine's decay, which starts after the warmup;
  the other schedules place their decay by other fields."""
  t = config.train
  if t.cosine_steps and t.schedule != "cosine":
    raise ConfigError(f"train.cosine_steps={t.cosine_steps} shapes the cosine "
                      f"schedule, not train.schedule={t.schedule!r}; leave it "
                      "at 0")
  if 0 < t.cosine_steps <= t.warmup_steps:
    raise ConfigError(f"train.cosine_steps={t.cosine_steps} must exceed "
                      f"train.warmup_steps={t.warmup_steps}: the decay "
                      "follows the warmup (0: decay until train.steps)")


def one_mesh_axis_free(config) -> None:
  free = [a for a in sharding.MESH_AXES if config.mesh[a] == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh.{' and mesh.'.join(free)} are both -1; at most "
                      "one axis may take the remaining devices")


def mesh_rules_name_known_axes(config) -> None:
  for entry in config.mesh.rules:
    axes = entry[1] if len(entry) == 2 else ()
    axes = (axes,) if isinstance(axes, str) or axes is None else axes
    if (len(entry) != 2 or entry[0] not in LOGICAL_AXES or not all(
        a is None or a in sharding.MESH_AXES for a in axes)):
      raise ConfigError(
          f"mesh.rules entry {tuple(entry)!r} must be (logical axis, mesh "
          f"axes): a logical axis of {list(LOGICAL_AXES)}, mapped to "
          f"one or a tuple of {list(sharding.MESH_AXES)} (or None)")


def model_is_consistent(config) -> None:
  """GPTConfig's own checks (heads that divide d_model, the attention
  pattern's kinds and its length under scan_layers, rope's even head_dim,
  attention dropout only where it is applied, muP's fixed heads and MLP
  width), and the dtypes against what training keeps safe: no float16
  compute without loss scaling (this trainer has none), float32 params (the
  optimizer's moments follow them; in bfloat16 small updates round away),
  and a compute dtype cuDNN's attention has."""
  model_config(config, vocab_size=max(config.model.vocab_size, 1))
  m = config.model
  if m.dtype == "float16":
    raise ConfigError(
        "model.dtype='float16' needs loss scaling, which this trainer does "
        "not have (small gradients would flush to 0): use model.dtype="
        "'bfloat16', float32's range at float16's speed")
  if m.param_dtype != "float32":
    raise ConfigError(
        f"model.param_dtype={m.param_dtype!r} would keep the weights and "
        "Adam's moments in 16 bits, where small updates round away: train "
        "with model.param_dtype='float32' (model.dtype='bfloat16' computes "
        "in bfloat16)")
  if m.attention == "cudnn" and m.dtype == "float32":
    raise ConfigError("model.attention='cudnn' needs model.dtype='bfloat16' "
                      "(cuDNN's attention has no float32)")


def top_k_within_vocabulary(config, vocab_size: int = 0) -> None:
  """When the vocabulary is known: model.vocab_size, else the tokenizer's."""
  vocab = config.model.vocab_size or vocab_size
  if vocab and config.sample.top_k > vocab:
    raise ConfigError(f"sample.top_k={config.sample.top_k} exceeds the "
                      f"vocabulary of {vocab}; lower it (0: no top-k filter)")


def objective_fields_for_their_objective(config) -> None:
  """train.sft_loss_on and data.pack shape sft batches, train.dpo_beta the
  dpo loss; set for another objective they would do nothing."""
  t, default_config = config.train, base.get_config()
  for field, objective in (("train.sft_loss_on", "sft"), ("data.pack", "sft"),
                           ("train.dpo_beta", "dpo")):
    section, name = field.split(".")
    value, usual = config[section][name], default_config[section][name]
    if t.objective != objective and value != usual:
      raise ConfigError(f"{field}={value!r} applies to train.objective="
                        f"{objective!r}, not {t.objective!r}; leave it at "
                        f"{usual!r}")


def dpo_without_dropout(config) -> None:
  """DPO compares the policy's log-probabilities with its reference's: with
  dropout in the policy's pass alone the two would differ at step 0 (the
  loss no longer ln 2) and the rewards would carry the dropout's noise."""
  if config.train.objective == "dpo" and config.model.dropout > 0:
    raise ConfigError(f"train.objective='dpo' scores the policy and its "
                      f"reference alike, without dropout: set "
                      f"model.dropout=0, not {config.model.dropout}")


def muon_fields(config) -> None:
  """Muon's fields apply to train.optimizer='muon' alone; and muP's
  per-layer multipliers are for Adam's steps, not Muon's."""
  t, default_train = config.train, base.get_config().train
  if t.optimizer == "muon" and config.model.parametrization == "mup":
    raise ConfigError("train.optimizer='muon' does not apply muP's per-layer "
                      "Adam learning rates: use model.parametrization="
                      "'standard' with it, or train.optimizer='adamw'")
  for name in ("muon_learning_rate", "muon_momentum"):
    if t.optimizer != "muon" and t[name] != default_train[name]:
      raise ConfigError(f"train.{name}={t[name]!r} applies to train.optimizer"
                        f"='muon', not {t.optimizer!r}; leave it at "
                        f"{default_train[name]!r}")


CROSS_CHECKS = (batch_splits_into_microbatches, keep_steps_inside_the_run,
                cooldown_only_in_a_branch, cosine_steps_after_the_warmup,
                objective_fields_for_their_objective, dpo_without_dropout,
                muon_fields,
                one_mesh_axis_free, mesh_rules_name_known_axes,
                model_is_consistent, top_k_within_vocabulary)


def check_with_tokenizer(config, tokenizer) -> None:
  """The sample settings against the run's tokenizer, once it is known:
  before training, not after it."""
  top_k_within_vocabulary(config, tokenizer.vocab_size)
  if config.sample.top > tokenizer.vocab_size:
    raise ConfigError(f"sample.top={config.sample.top} exceeds the "
                      f"vocabulary of {tokenizer.vocab_size}; lower it")
  s = config.sample
  try:
    tokenizer.encode(prompt_text(config))
  except ValueError as e:
    field = (f"sample.prompt_file={s.prompt_file!r}" if s.prompt_file else
             f"sample.prompt={s.prompt!r}")
    raise ConfigError(f"{field}: {e}") from None


def prompt_text(config) -> str:
  """sample.prompt, or the text of sample.prompt_file if set."""
  path = config.sample.prompt_file
  if not path:
    return config.sample.prompt
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"sample.prompt_file={path!r} cannot be read as UTF-8 "
                      f"text ({getattr(e, 'strerror', None) or e})") from None
  if not text:
    raise ConfigError(f"sample.prompt_file={path!r} is empty; give at least "
                      "one character")
  return text


def capped_warmup(config) -> tuple[ml_collections.ConfigDict, str]:
  """The config a run uses, and a notice if it differs from `config`: a
  warmup must end by the time the decay starts (cosine's starts when the
  warmup ends, so: by the last step). A longer one, as a config made for
  long runs gives a short one (the default's 50 steps with
  --config.train.steps=25), is cut to a fifth of the steps, or to where the
  decay starts if that is sooner. The run saves the value it uses in its
  config.json, so a resume uses it too."""
  t = config.train
  limit = optim.warmup_limit(config)
  if t.warmup_steps <= limit:
    return config, ""
  capped = config.copy_and_resolve_references()
  capped.train.warmup_steps = min(t.steps // 5, limit)
  where = (f"is longer than this {t.steps}-step run" if limit == t.steps else
           f"does not end before the decay starts at step {limit}")
  how = ("a fifth of the run" if capped.train.warmup_steps == t.steps // 5
         else "until the decay starts")
  return capped, (f"note: train.warmup_steps={t.warmup_steps} {where}; "
                  f"warming up for {capped.train.warmup_steps} steps ({how}) "
                  "instead, as the run's config.json records")


def model_config(config, vocab_size: int) -> GPTConfig:
  """GPTConfig from config.model; vocab_size 0 there means the tokenizer's."""
  for field in RULES:
    if field.startswith("model."):
      check_field(config, field)
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
