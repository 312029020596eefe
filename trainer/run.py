"""A run built from its config (build: a Run): its mesh, data, tokenizer,
model and optimizer, all checked before anything compiles; the state a run
without checkpoints of its own starts from (a cooldown branch's parent's,
checkpoint.init_from's params); and what every mode does with a run:
evaluate it, sample from it. Training it is trainer/loop.py; the other
modes are trainer/modes.py."""

import contextlib
import dataclasses
import functools
import json
import math
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import tqdm

import layout
from configs import base
from data import examples, loader, prepare, tokenizers
from model import GPT, generate, resize_vocab
from trainer import checkpoint, config as config_lib, objectives, optim
from trainer import saved_config, sharding
from trainer import state as state_lib
from trainer.errors import ConfigError


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step."""
  config: object
  workdir: str
  # None: a mode that reads no corpus; examples.Prepared for sft and dpo
  data: prepare.Prepared | examples.Prepared | None
  tokenizer: object
  model: GPT
  tx: object
  mesh: jax.sharding.Mesh
  rules: tuple
  shardings: state_lib.TrainState
  checkpointer: checkpoint.Checkpointer
  eval_step: object
  sources: dict = dataclasses.field(default_factory=dict)  # split -> items

  @property
  def objective(self) -> str:
    return self.config.train.objective

  @property
  def uses_reference(self) -> bool:
    """Whether its steps take frozen reference params (dpo)."""
    return objectives.OBJECTIVES[self.objective].uses_reference

  def context(self):
    """Mesh and logical-axis rules, active whenever a step is traced; on exit,
    even by an error, pending checkpoint writes are finished, and a write
    that failed for want of space or permission ends as one line
    (Checkpointer.explain)."""
    stack = contextlib.ExitStack()
    stack.push(lambda _, error, __: self.checkpointer.explain(error))
    stack.callback(self.checkpointer.close)
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def restore_latest(self, checkpointer=None, params_only=False):
    """(step, state) of the newest valid checkpoint, resharded onto this
    run's mesh, or (None, None)."""
    return (checkpointer or self.checkpointer).restore_latest_valid(
        self._target(), params_only)

  def restore_checkpoint(self, checkpointer, step: int, fix: str,
                         params_only=False):
    """The state of one given checkpoint, resharded onto this run's mesh; a
    damaged one is refused (a ConfigError that ends with `fix`)."""
    try:
      return checkpointer.restore(step, self._target(), params_only)
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001 - any damage, whatever raised it
      raise ConfigError(f"the checkpoint {checkpointer.directory}/{step} "
                        f"cannot be restored ({checkpoint.reason(e)}); {fix}"
                        ) from None

  def _target(self):
    return state_lib.abstract_state(self.model, self.tx, self.shardings)


def model_and_optimizer(config, vocab_size: int, mesh):
  """The model, optimizer, logical rules and train-state shardings of a
  config: what train.py, the benchmarks and the tests all start from. A
  layout the mesh cannot split is refused here, before anything compiles."""
  model = GPT(config_lib.model_config(config, vocab_size))
  sharding.check_layout(mesh.shape, model.cfg, config.train.batch_size,
                        config.train.grad_accum_steps)
  tx = optim.make_optimizer(config)
  rules = sharding.logical_rules(config.mesh)
  shardings = state_lib.state_shardings(model, tx, mesh, rules)
  sharding.check_even(state_lib.abstract_state(model, tx, shardings))
  return model, tx, rules, shardings


def check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; "
                      "choose another path")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:  # a file without a name: nothing is left behind
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable ({existing}: "
                      f"{e.strerror}); choose another path") from None


def _source(config, data, split: str, model_cfg, tokenizer):
  return loader.source_for(config, data, split, tokenizer.eot_id,
                           model_cfg.vocab_size)


def _prepare(config, tokenizer):
  """The data of config.data for the run's objective. sft and dpo examples
  in raw JSONL are tokenized with `tokenizer` (the workdir's), else
  checkpoint.init_from's, else one of data.tokenizer's kind fitted to
  them."""
  if tokenizer is None and config.checkpoint.init_from:
    tokenizer = saved_tokenizer(config.checkpoint.init_from)
  return prepare.of_config(config, tokenizer)




def saved_tokenizer(workdir: str):
  """The tokenizer of the model in `workdir` (its tokenizer/, saved by
  train or an import), or None where there is none."""
  return tokenizers.load_dir(os.path.join(workdir, layout.TOKENIZER))


def _tokenizer_and_data(config, workdir: str, splits):
  """(tokenizer, data) of a run: the tokenizer of the workdir's model, else
  that of the corpus; the data of config.data where `splits` are read or
  the workdir holds no tokenizer (else None). A corpus prepared with
  another tokenizer than the model's is refused; the sample settings are
  checked against the tokenizer."""
  tokenizer = saved_tokenizer(workdir)
  data = None
  if splits or tokenizer is None:
    data = _prepare(config, tokenizer)
    tokenizer = tokenizer or data.tokenizer
    _check_same_tokenizer(tokenizer, workdir, data.tokenizer, data.path)
  if _default_prompt_unspelled(config, tokenizer):
    prompt = _first_held_out_prompt(data or _prepare(config, tokenizer))
    log(f"sample.prompt: the default {config.sample.prompt!r} is not in the "
        f"vocabulary ({tokenizers.describe(tokenizer)}); sampling after the "
        f"first held-out prompt instead, {prompt!r}")
    config.sample.prompt = prompt
  config_lib.check_with_tokenizer(config, tokenizer)
  return tokenizer, data


def _default_prompt_unspelled(config, tokenizer) -> bool:
  """Examples' runs whose tokenizer cannot spell the default prompt, which
  the user never chose (a character tokenizer fitted to the examples)."""
  s = config.sample
  if (config.train.objective == "next-token" or s.prompt_file or
      s.prompt != base.get_config().sample.prompt):
    return False
  try:
    tokenizer.encode(s.prompt)
  except ValueError:
    return True
  return False


def _first_held_out_prompt(data: examples.Prepared) -> str:
  """The text of the first held-out example up to its first target token."""
  tokens, targets = data.sequences("val").get(0)
  return data.tokenizer.decode(tokens[:int(targets.argmax())])


def _check_same_tokenizer(model_tokenizer, model_dir: str, tokenizer,
                          corpus: str) -> None:
  """`tokenizer`, the one `corpus` was prepared with, must be that of the
  model in `model_dir`."""
  if not tokenizers.same(model_tokenizer, tokenizer):
    hint = (f"--tokenizer gpt2 --tokenizer-files "
            f"{os.path.join(model_dir, layout.TOKENIZER)}"
            if model_tokenizer.kind == "bpe" else
            f"--tokenizer {model_tokenizer.kind}")
    raise ConfigError(
        f"the model of {model_dir} uses a "
        f"{tokenizers.describe(model_tokenizer)}, but {corpus} was prepared "
        f"with a {tokenizers.describe(tokenizer)}; use a corpus prepared with "
        f"the model's tokenizer (python -m data.prepare {hint})")


def build(config, workdir: str, splits=("train", "val"),
          read_only: bool = False) -> Run:
  """Everything a run needs, with the data `splits` it reads (none: the
  corpus is read only for its tokenizer, and only when the workdir holds
  none). Every setting is checked first, those used late (eval, sample,
  checkpoint) included, so a bad one stops the run before anything is
  compiled or written. A workdir's model keeps its tokenizer: a corpus
  prepared with another one is refused. `read_only`: the modes that read a
  run, which write, delete and rename nothing in its workdir (a trainer may
  be writing there)."""
  config_lib.validate(config)
  config, notice = config_lib.capped_warmup(config)
  if notice:
    log(notice)
  if not read_only:
    check_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  # Before the data is prepared (model_and_optimizer checks it all again).
  sharding.check_layout(mesh.shape, config_lib.model_config(config, 1),
                        config.train.batch_size, config.train.grad_accum_steps)
  tokenizer, data = _tokenizer_and_data(config, workdir, splits)
  model, tx, rules, shardings = model_and_optimizer(
      config, tokenizer.vocab_size, mesh)
  sources = {}
  for split in splits:
    source = sources[split] = _source(config, data, split, model.cfg,
                                      tokenizer)
    loader.check_size(source, config.train.batch_size if split == "train"
                      else 1)
    source.check_all_ids()
  return Run(config, workdir, data, tokenizer, model, tx, mesh, rules,
             shardings,
             checkpoint.Checkpointer(workdir, config.checkpoint.keep,
                                     config.checkpoint.keep_best,
                                     read_only=read_only,
                                     keep_steps=config.checkpoint.keep_steps),
             state_lib.make_eval_step(model, config.train.objective,
                                      config.train.dpo_beta),
             sources)


def log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def evaluate_params(run: Run, params, max_batches: int,
                    ref_params=None) -> dict:
  """The objective's eval record over the validation split (all of it, or
  the fixed subset of `max_batches` batches of eval.batch_size items, the
  same on any mesh: loader.eval_ids): mean loss,
  perplexity and bits per byte of the target tokens (next-token: every
  token; sft: the response tokens); for dpo the preference loss, rewards,
  reward accuracy and KL to `ref_params` (objectives.summarize); and how
  many of the split's items (windows or pairs) it scored."""
  source = run.sources.get("val")
  if source is None:
    source = _source(run.config, run.data, "val", run.model.cfg,
                     run.tokenizer)
  token_bytes = run.tokenizer.token_bytes()
  batch_sharding = sharding.batch_sharding(run.mesh)
  data_parallel = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
  batch_size = math.ceil(run.config.eval.batch_size / data_parallel) * data_parallel
  extra = (ref_params,) if run.uses_reference else ()
  total = None
  max_items = max_batches * run.config.eval.batch_size  # any mesh alike
  for batch, mask in loader.eval_batches(source, batch_size, max_items):
    sums = run.eval_step(params, jax.device_put(batch, batch_sharding),
                         jax.device_put(mask, batch_sharding), token_bytes,
                         *extra)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return {**objectives.summarize(run.objective, jax.device_get(total)),
          "eval_items": len(loader.eval_ids(len(source), max_items)),
          "eval_split_items": len(source)}


def eval_line(record: dict) -> str:
  """An eval record for the console."""
  if "eval_reward_accuracy" in record:
    return (f"eval loss {record['eval_loss']:.4f}, reward accuracy "
            f"{record['eval_reward_accuracy']:.3f}, margin "
            f"{record['eval_reward_margin']:.4f}, KL to the reference "
            f"{record['eval_kl_ref']:.4f} per token")
  return (f"eval loss {record['eval_loss']:.4f}, "
          f"{record['eval_bits_per_byte']:.4f} bits/byte")


def sample_text(run: Run, params, index: int = 0, stream=None) -> str:
  """Sample `index` of the run's sample settings: the prompt and its
  continuation, which ends at end-of-text or after sample.max_new_tokens.
  `stream(piece)` gets the continuation's text piece by piece as tokens are
  made."""
  s, tokenizer = run.config.sample, run.tokenizer
  prompt = tokenizer.encode(config_lib.prompt_text(run.config))
  made, shown = [], 0

  def on_token(tokens_B, growing_B):
    nonlocal shown
    if growing_B[0]:
      made.append(int(tokens_B[0]))
      text = tokenizer.decode(made).rstrip("\ufffd")  # a character cut short
      if len(text) > shown:
        stream(text[shown:])
        shown = len(text)

  # One sequence is not split over the data-parallel devices.
  with nn.logical_axis_rules(_whole(run.rules, "batch")):
    out = generate(run.model, params, [prompt],
                   jax.random.fold_in(jax.random.key(s.seed), index),
                   max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                   top_k=s.top_k, top_p=s.top_p, stop_token=tokenizer.eot_id,
                   on_token=on_token if stream else None)
  return tokenizer.decode(out[0])


def _whole(rules, logical_axis: str) -> tuple:
  """Logical-axis rules that leave `logical_axis` unsplit."""
  return tuple((name, None if name == logical_axis else axes)
               for name, axes in rules)


def run_info(config, step: int, **extra) -> dict:
  """What a checkpoint records beside the arrays: the config and counters."""
  return {"config": json.loads(config.to_json()), "step": step, **extra}


def first_state(run: Run):
  """(step, state) where a run without checkpoints of its own starts: a
  cooldown branch at its parent's checkpoint (its data go on from that step,
  as the parent's did), any other run freshly initialized (with the params
  of checkpoint.init_from, if set)."""
  config = run.config
  if config.cooldown.steps > 0:
    return config.cooldown.from_step, _branch_state(run)
  state = state_lib.init_state(run.model, run.tx, run.shardings,
                               config.train.seed)
  if config.checkpoint.init_from:
    state = _init_from(run, state, config.checkpoint.init_from)
  return 0, state


def _branch_state(run: Run):
  """The state of the parent's checkpoint at cooldown.from_step; the parent
  is only read."""
  cooldown = run.config.cooldown
  parent = checkpoint.Checkpointer(cooldown.parent, keep=1, read_only=True)
  step = cooldown.from_step
  try:
    if step not in parent.steps():
      raise ConfigError(
          f"{parent.directory} has no checkpoint at step {step} (it has "
          f"{parent.steps() or 'none'}); train the run with "
          f"--config.checkpoint.keep_steps='({step},)' to keep one there")
    state = run.restore_checkpoint(
        parent, step, "branch from another step of the run, or restore this "
        "one from a copy")
  finally:
    parent.close()
  log(f"cooldown branch from {parent.directory}/{step}: "
       f"{run.config.cooldown.steps} steps of decay")
  return state


def _padded_as_saved(run: Run, workdir: str):
  """This run's model config with the vocabulary padding of the run saved
  in `workdir` (a config.json from before model.vocab_multiple means 1),
  or None where that pads the vocabulary to the same size."""
  if not os.path.isfile(os.path.join(workdir, layout.CONFIG)):
    return None
  multiple = saved_config.load_saved(workdir).model.vocab_multiple
  saved = dataclasses.replace(run.model.cfg, vocab_multiple=multiple)
  return (None if saved.padded_vocab_size == run.model.cfg.padded_vocab_size
          else saved)


def check_resumed_padding(run: Run) -> None:
  """A run resumes with the vocabulary padding its checkpoints have."""
  saved = _padded_as_saved(run, run.workdir)
  if saved is None or run.checkpointer.latest_step() is None:
    return
  raise ConfigError(
      f"{run.workdir} was trained with model.vocab_multiple="
      f"{saved.vocab_multiple} ({saved.padded_vocab_size} vocabulary rows; "
      "1 for runs from before the field), this config pads the vocabulary "
      f"to {run.model.cfg.padded_vocab_size}; pass "
      f"--config.model.vocab_multiple={saved.vocab_multiple} to resume it")


def _init_from(run: Run, state, workdir: str):
  """`state` with the params of another run's newest checkpoint, whose
  tokenizer, if it saved one, must be this run's; if that checkpoint is
  damaged, the run stops rather than start from an older one unasked. A
  vocabulary padded to another size there (a run from before
  model.vocab_multiple: unpadded) is restored unsplit, as saved, then cut or
  padded to this run's."""
  model_tokenizer = saved_tokenizer(workdir)
  if model_tokenizer is not None:
    _check_same_tokenizer(model_tokenizer, workdir, run.tokenizer,
                          run.config.data.source)
  saved = _padded_as_saved(run, workdir)
  as_saved = run
  if saved is not None:
    model, rules = GPT(saved), _whole(run.rules, "vocab")
    as_saved = dataclasses.replace(run, model=model, rules=rules, shardings=(
        state_lib.state_shardings(model, run.tx, run.mesh, rules)))
  source = checkpoint.Checkpointer(workdir, keep=1, read_only=True)
  try:
    step = source.latest_step()
    if step is None:
      raise ConfigError(f"checkpoint.init_from={workdir!r} holds no "
                        f"checkpoint (nothing under {source.directory})")
    params = as_saved.restore_checkpoint(
        source, step, "restore it from a copy, or move it aside to start "
        "from the run's previous checkpoint", params_only=True).params
  finally:
    source.close()
  if saved is not None:
    resize = functools.partial(resize_vocab,
                               size=run.model.cfg.padded_vocab_size)
    params = jax.jit(resize, out_shardings=run.shardings.params)(params)
  log(f"starting from the parameters of {source.directory}/{step}")
  return state.replace(params=params)




def load_reference(run: Run, workdir: str):
  """The dpo reference params saved in `workdir` (its reference/)."""
  source = checkpoint.Checkpointer(os.path.join(workdir, layout.REFERENCE),
                                   keep=1, read_only=True)
  try:
    if 0 not in source.steps():
      raise ConfigError(
          f"the dpo reference params of {workdir} are missing (no "
          f"{source.directory}/0); a dpo run saves them before its first "
          "step: restore them from a copy, or start the run afresh in a new "
          "--workdir")
    return run.restore_checkpoint(
        source, 0, "restore it from a copy, or start the run afresh in a "
        "new --workdir", params_only=True).params
  finally:
    source.close()
