"""Building a run from its config, and training it: train.py's train and
cooldown modes. What the other modes do with a trained run is in
trainer/modes.py."""

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jax.experimental import multihost_utils

from data import examples, loader, prepare, tokenizers
from model import GPT, generate, resize_vocab
from trainer import audit, checkpoint, config as config_lib, metrics, optim
from trainer import objectives, sharding, workdir_lock
from trainer import state as state_lib
from trainer.errors import ConfigError, Diverged, Preempted, WorkdirInUse


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
  d = config.data
  if config.train.objective == "next-token":
    return prepare.prepare(d.source, d.tokenizer, tuple(d.holdout),
                           d.cache_dir, d.val_fraction)
  if tokenizer is None and config.checkpoint.init_from:
    tokenizer = tokenizers.load_dir(
        os.path.join(config.checkpoint.init_from, TOKENIZER))
  return examples.prepare_source(d.source, config.train.objective,
                                 tokenizer or d.tokenizer, tuple(d.holdout),
                                 d.cache_dir, d.val_fraction)


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
  tokenizer = tokenizers.load_dir(os.path.join(workdir, TOKENIZER))
  data = None
  if splits or tokenizer is None:
    data = _prepare(config, tokenizer)
    tokenizer = tokenizer or data.tokenizer
    _check_same_tokenizer(tokenizer, workdir, data.tokenizer, data.path)
  config_lib.check_with_tokenizer(config, tokenizer)
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


TOKENIZER = "tokenizer"  # <workdir>/tokenizer/: the model's, saved by train


def _check_same_tokenizer(model_tokenizer, model_dir: str, tokenizer,
                          corpus: str) -> None:
  if not tokenizers.same(model_tokenizer, tokenizer):
    hint = (f"--tokenizer gpt2 --tokenizer-files "
            f"{os.path.join(model_dir, TOKENIZER)}" if model_tokenizer.kind ==
            "bpe" else f"--tokenizer {model_tokenizer.kind}")
    raise ConfigError(
        f"the model of {model_dir} uses a "
        f"{tokenizers.describe(model_tokenizer)}, but {corpus} was prepared "
        f"with a {tokenizers.describe(tokenizer)}; use a corpus prepared with "
        f"the model's tokenizer (python -m data.prepare {hint})")


def log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def _describe(run: Run, rows: slice) -> str:
  """The model, mesh and data of a run, for the console and TensorBoard;
  `rows`: the rows of each batch that this process loads."""
  cfg, t = run.model.cfg, run.config.train
  row = (f"{cfg.seq_len} tokens" if run.objective != "dpo" else
         f"2 x {cfg.seq_len} tokens (a chosen and a rejected sequence)")
  if run.objective == "next-token":
    data = (f"{run.data.meta['train_tokens']:,} train / "
            f"{run.data.meta['val_tokens']:,} val tokens")
  else:
    data = f"{run.objective} examples; " + "; ".join(
        f"{split}: {source.describe()}" for split, source in
        run.sources.items())
  data_parallel = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
  vocab, padded = f"vocab {cfg.vocab_size}", ""
  if cfg.padded_vocab_size != cfg.vocab_size:
    vocab += f" (padded to {cfg.padded_vocab_size})"
    padded = f"{cfg.num_params(padded=True) / 1e6:.2f}M as padded, "
  return "\n".join((
      f"model: {cfg.num_layers} layers x {cfg.d_model} x {cfg.num_heads} "
      f"heads, context {cfg.seq_len}, {vocab}: "
      f"{cfg.num_params() / 1e6:.2f}M params ({padded}"
      f"{cfg.num_params(embeddings=False) / 1e6:.2f}M non-embedding), "
      f"{metrics.flops_per_token(cfg, run.objective) / 1e6:.1f} "
      "MFLOPs/token",
      f"mesh: {dict(run.mesh.shape)} over {jax.device_count()} "
      f"{jax.devices()[0].platform} devices in {jax.process_count()} "
      f"process(es); batch {t.batch_size} x {row}, "
      f"{t.batch_size // data_parallel} sequences per device "
      f"({jax.local_device_count()} devices and "
      f"{rows.stop - rows.start} sequences per process)",
      f"data: {run.data.path} ({data})"))


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
  extra = (ref_params,) if run.objective == "dpo" else ()
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


def train(config, workdir: str) -> dict:
  """Trains the run of `config` in `workdir` (train.py's train and cooldown
  modes), holding the workdir's lock (trainer.workdir_lock) from before its
  checkpoints are read until its last file is written: a second process
  stops with WorkdirInUse, having written nothing. SIGTERM, from the start
  on, ends it with Preempted: before the first step with nothing written,
  else once the step it arrived in is saved."""
  with contextlib.ExitStack() as stack:
    stop = _stop_on_sigterm(stack)
    check_workdir(workdir)
    lock = _lock_workdir(workdir)
    if lock is not None:  # last: once every file is written
      stack.callback(lock.release)
    run = build(config_lib.as_the_run_keeps(config, workdir), workdir)
    # Also when stopped before run.context(): the removal of a cut-short
    # save that the checkpointer started must end before the process does.
    stack.callback(run.checkpointer.close)
    _check_stop(stop)
    return _train(run, stop, lock)


def _train(run: Run, stop, lock) -> dict:
  config, t, workdir = run.config, run.config.train, run.workdir
  batch_sharding = sharding.batch_sharding(run.mesh)
  batch_shape = (t.batch_size, run.model.cfg.seq_len + 1)
  rows = sharding.process_rows(batch_sharding, batch_shape)
  description = _describe(run, rows)
  log(description)
  with run.context() as stack:
    _check_resumed_padding(run)
    start, state = run.restore_latest()
    _check_stop(stop)
    if start is not None and start >= t.steps:
      if os.path.exists(_sample_path(workdir, start)):  # nothing is written
        log(f"{workdir} is complete at step {start} (train.steps="
            f"{t.steps}); nothing written. To train it further, raise "
            "--config.train.steps; to use it, --mode=eval or --mode=sample")
        return {}
      log(f"{workdir} is complete at step {start} but has no final sample "
          "(it was stopped after its last checkpoint); writing it")
      writer = metrics.MetricsWriter(workdir, resume_step=start)
      stack.callback(writer.close)
      _write_sample(run, state.params, start, writer)
      return {}
    start_resumed = start is not None
    if start_resumed:
      config_lib.check_resumable(config, workdir)
      log(f"resuming from {run.checkpointer.directory} at step {start}")
    else:
      start, state = _first_state(run)
    if jax.process_index() == 0:  # only once the state is known to fit
      config_lib.save(config, workdir)
      metrics.write_run_summary(workdir, run.model.cfg, t)
      tokenizers.save_dir(run.tokenizer, os.path.join(workdir, TOKENIZER))
    ref_params = (_reference(run, state, resumed=start_resumed)
                  if run.objective == "dpo" else None)
    # The data continue at the step the state is at (data.loader).
    source = run.sources["train"]
    fingerprints = config.data.fingerprint and jax.process_index() == 0
    train_iter = loader.train_iterator(
        source, t.batch_size, t.seed, start, rows, config.data.num_workers,
        fingerprints, config.data.order_version)
    stack.callback(train_iter.close)
    data_order = audit.DataOrderLog(workdir, t.batch_size, len(source),
                                    fingerprints)
    stack.callback(data_order.close)
    train_step = state_lib.make_train_step(
        run.model, run.tx, run.shardings, grad_accum_steps=t.grad_accum_steps,
        seed=t.seed, objective=t.objective, dpo_beta=t.dpo_beta)
    extra = (ref_params,) if ref_params is not None else ()
    writer = metrics.MetricsWriter(workdir, resume_step=start)
    stack.callback(writer.close)
    writer.text("run", description, start)
    tokens_per_step = t.batch_size * objectives.tokens_per_row(
        t.objective, run.model.cfg.seq_len)
    logger = StepLogger(run, writer, start, tokens_per_step)
    stack.callback(logger.bar.close)  # before any error message

    last_eval = {}
    for step in range(start, t.steps):
      t0 = time.perf_counter()
      local, fingerprint = next(train_iter)
      batch = jax.tree.map(lambda x: sharding.to_global(
          x, batch_sharding, (t.batch_size, *x.shape[1:])), local)
      logger.data_wait += time.perf_counter() - t0
      state, step_metrics = train_step(state, batch, *extra)
      done_step = step + 1
      data_order.write(done_step, fingerprint)
      logger.finished(done_step, step_metrics)
      final = done_step == t.steps
      if lock is not None and lock.lost is not None:
        raise WorkdirInUse(f"{lock.taken_over()}; stopped after step "
                           f"{done_step} without saving it")
      preempted = stop() or run.checkpointer.reached_preemption(done_step)
      do_eval = done_step % config.eval.every_steps == 0 or final
      do_save = (done_step % config.checkpoint.every_steps == 0 or final or
                 preempted or done_step in config.checkpoint.keep_steps)
      if do_eval or do_save:  # these wait for the step anyway
        logger.flush()
      if do_eval:
        last_eval = evaluate_params(run, state.params,
                                    config.eval.max_batches, ref_params)
        writer.write(done_step, last_eval)
        log(f"step {done_step}: {eval_line(last_eval)}")
      if do_save:
        run.checkpointer.save(
            done_step, state,
            run_info(config, done_step,
                      tokens_seen=done_step * tokens_per_step),
            eval_loss=last_eval["eval_loss"] if do_eval else None)
      if preempted:
        run.checkpointer.close()  # committed before the process exits
        raise Preempted(
            f"stopped by SIGTERM after step {done_step}, saved in "
            f"{run.checkpointer.directory}/{done_step}; the same command "
            + ("writes its final sample" if final else "resumes the run"))
      if do_eval or do_save:  # keep them out of the step time
        logger.restart_window()
    logger.bar.close()
    run.checkpointer.close()  # the final checkpoint is committed before sampling

    _write_sample(run, state.params, t.steps, writer)
  return last_eval


def _lock_workdir(workdir: str):
  """The workdir's lock, taken by process 0 for every process of the run
  (None on the others, which learn the outcome from it); WorkdirInUse on
  every process while another run holds it."""
  lock, refusal = None, ""
  if jax.process_index() == 0:
    try:
      lock = workdir_lock.WorkdirLock.acquire(workdir)
    except WorkdirInUse as e:
      refusal = str(e)
  if jax.process_count() > 1:
    text = np.zeros(1024, np.uint8)
    encoded = refusal.encode()[:text.size]
    text[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    refusal = np.asarray(multihost_utils.broadcast_one_to_all(text)).tobytes(
        ).rstrip(b"\0").decode(errors="replace")
  if refusal:
    raise WorkdirInUse(refusal)
  return lock


def _sample_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "samples", f"step_{step}.txt")


def _write_sample(run: Run, params, step: int, writer) -> None:
  """The final sample: samples/step_<step>.txt, the last file a run writes
  (whole or not at all), and TensorBoard's text. A run whose final
  checkpoint has none was stopped before it: the same command writes it."""
  text = sample_text(run, params)
  if jax.process_index() == 0:
    path = _sample_path(run.workdir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
    writer.text("sample", text, step)
  log(f"--- sample (temperature {run.config.sample.temperature}) ---\n"
      f"{text}")


class StepLogger:
  """Writes finished steps' metrics (metrics.jsonl, TensorBoard, the progress
  bar). A step's metrics are fetched one step late, while the next step
  already runs, and timed from one fetched step to the next. A non-finite
  loss or gradient stops the run, unless its update was skipped
  (train.skip_nonfinite_updates)."""

  def __init__(self, run, writer, start: int, tokens_per_step: int):
    config, self.t = run.config, run.config.train
    self.run, self.writer, self.start = run, writer, start
    self.schedule = optim.lr_schedule(config)
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = metrics.flops_per_token(
        run.model.cfg, run.objective) * tokens_per_step
    self.peak = (metrics.peak_flops_per_device(config.perf.peak_flops) *
                 jax.device_count())
    self.bar = tqdm.tqdm(total=self.t.steps, initial=start, unit="step",
                         dynamic_ncols=True,
                         disable=jax.process_index() != 0)
    self.pending = None  # (step, its metrics still on the device)
    self.restart_window()

  def restart_window(self, now: float | None = None) -> None:
    """Times the steps from `now` on (evals and saves stay out of it)."""
    self.window_start = time.perf_counter() if now is None else now
    self.window_steps = 0
    self.data_wait = 0.0  # seconds waited for batches in this window

  def finished(self, step: int, step_metrics) -> None:
    """Logs the step before `step`, whose metrics are ready by now."""
    self.flush()
    self.pending = (step, step_metrics)

  def flush(self) -> None:
    if self.pending is not None:
      self._log(*self.pending)
      self.pending = None

  def _log(self, step: int, done) -> None:
    t = self.t
    done = jax.device_get(done)
    finite = all(map(math.isfinite, (done["loss"], done["grad_norm"])))
    if not finite and (done.get("nonfinite_streak", math.inf) >
                       t.skip_nonfinite_updates):
      last = self.run.checkpointer.latest_step()
      raise Diverged(
          f"step {step}: loss {done['loss']}, gradient norm "
          f"{done['grad_norm']}; nothing from this step on was saved, the "
          "last good checkpoint is "
          f"{f'{self.run.checkpointer.directory}/{last}' if last else 'none'}"
          "; lower train.learning_rate or raise train.warmup_steps")
    now = time.perf_counter()
    elapsed = now - self.window_start
    first = step == self.start + 1  # its time includes compilation
    self.window_steps += 0 if first else 1
    if first or step % t.log_every_steps == 0 or step == t.steps:
      record = {"loss": done["loss"], "grad_norm": done["grad_norm"],
                "learning_rate": float(self.schedule(step - 1)),
                "tokens_seen": step * self.tokens_per_step}
      if "skipped_updates" in done:
        record["skipped_updates"] = int(done["skipped_updates"])
      record.update({k: float(v) for k, v in done.items()
                     if k not in _LOGGED_APART})  # the objective's own
      if first:
        record["first_step_time_s"] = elapsed
      elif self.window_steps:
        step_time = elapsed / self.window_steps
        record.update({
            "tokens_per_sec": self.tokens_per_step / step_time,
            "tokens_per_sec_per_device":
                self.tokens_per_step / step_time / jax.device_count(),
            "step_time_ms": 1e3 * step_time,
            "data_wait_ms": 1e3 * self.data_wait / self.window_steps,
            "mfu": self.flops_per_step / step_time / self.peak})
        self.bar.set_postfix(loss=f"{record['loss']:.3f}",
                             tok_s=f"{record['tokens_per_sec']:,.0f}",
                             refresh=False)
      self.writer.write(step, record)
      self.restart_window(now)
    self.bar.update(step - self.bar.n)


_LOGGED_APART = ("loss", "grad_norm", "skipped_updates", "nonfinite_streak")


def run_info(config, step: int, **extra) -> dict:
  """What a checkpoint records beside the arrays: the config and counters."""
  return {"config": json.loads(config.to_json()), "step": step, **extra}


def _stop_on_sigterm(stack):
  """Returns stop() -> bool, true once SIGTERM arrived. Multi-process runs
  leave SIGTERM to JAX's preemption sync, which picks the same step on every
  process (Checkpointer.reached_preemption)."""
  received = []
  if jax.process_count() == 1:
    previous = signal.signal(signal.SIGTERM,
                             lambda signum, frame: received.append(signum))
    stack.callback(signal.signal, signal.SIGTERM, previous)
  return lambda: bool(received)


def _check_stop(stop) -> None:
  """Preempted if SIGTERM arrived before the first step."""
  if stop():
    raise Preempted("stopped by SIGTERM before the first step, nothing "
                    "written; the same command starts or resumes the run")


def _first_state(run: Run):
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
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    return None
  multiple = config_lib.load_saved(workdir).model.vocab_multiple
  saved = dataclasses.replace(run.model.cfg, vocab_multiple=multiple)
  return (None if saved.padded_vocab_size == run.model.cfg.padded_vocab_size
          else saved)


def _check_resumed_padding(run: Run) -> None:
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
  model_tokenizer = tokenizers.load_dir(os.path.join(workdir, TOKENIZER))
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


REFERENCE = "reference"  # <workdir>/reference/: a dpo run's frozen params


def _reference(run: Run, state, resumed: bool):
  """The frozen params a dpo run measures its policy against: its starting
  params (checkpoint.init_from's, or the fresh initialization; a cooldown
  branch: its parent's reference), sharded like the params. A run saves
  them once, before its first step, as a params-only checkpoint under
  <workdir>/reference/ (readable like an export), and a resumed run reads
  them from there, so that a resume does not depend on init_from staying
  as it was."""
  directory = os.path.join(run.workdir, REFERENCE)
  if resumed:
    return load_reference(run, run.workdir)
  if run.config.cooldown.steps > 0:
    params = load_reference(run, run.config.cooldown.parent)
  else:  # a copy: the state's own buffers are donated to the first step
    params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                     out_shardings=run.shardings.params)(state.params)
  if jax.process_index() == 0 and os.path.exists(directory):
    shutil.rmtree(directory)  # of a start that saved no checkpoint
  multihost_utils.sync_global_devices("dpo reference cleared")
  saver = checkpoint.Checkpointer(directory, keep=1)
  saver.save_params(0, params, run_info(run.config, 0))
  saver.close()  # committed before the first step
  return params


def load_reference(run: Run, workdir: str):
  """The dpo reference params saved in `workdir` (its reference/)."""
  source = checkpoint.Checkpointer(os.path.join(workdir, REFERENCE), keep=1,
                                   read_only=True)
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
