"""Training a run: train.py's train and cooldown modes. The run is built
in trainer/run.py; what the other modes do with a trained run is in
trainer/modes.py."""

import contextlib
import math
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jax.experimental import multihost_utils

import layout
from data import disk, loader, tokenizers
from trainer import audit, checkpoint, metrics, objectives, optim
from trainer import saved_config, sharding, workdir_lock
from trainer import state as state_lib
from trainer.errors import Diverged, Preempted, WorkdirInUse
from trainer.run import (Run, build, check_resumed_padding, check_workdir,
                         eval_line, evaluate_params, first_state,
                         load_reference, log, run_info, sample_text)


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
    run = build(saved_config.as_the_run_keeps(config, workdir), workdir)
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
    check_resumed_padding(run)
    start, state = run.restore_latest()
    _check_stop(stop)
    if start is not None and start >= t.steps:
      _finish_complete(run, start, state, stack)
      return {}
    start_resumed = start is not None
    if start_resumed:
      saved_config.check_resumable(config, workdir)
      log(f"resuming from {run.checkpointer.directory} at step {start}")
    else:
      start, state = first_state(run)
    if jax.process_index() == 0:  # only once the state is known to fit
      saved_config.save(config, workdir)
      metrics.write_run_summary(workdir, run.model.cfg, t)
      tokenizers.save_dir(run.tokenizer,
                          os.path.join(workdir, layout.TOKENIZER))
    ref_params = (_reference(run, state, resumed=start_resumed)
                  if run.uses_reference else None)
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
      last_eval = _after_step(run, state, done_step, logger, ref_params,
                              stop, lock) or last_eval
    logger.bar.close()
    run.checkpointer.close()  # the final checkpoint is committed before sampling

    _write_sample(run, state.params, t.steps, writer)
  return last_eval


def _finish_complete(run: Run, start: int, state, stack) -> None:
  """A run whose checkpoint `start` is its last: its final sample, where it
  was stopped before writing it; else nothing is written."""
  t, workdir = run.config.train, run.workdir
  if os.path.exists(layout.sample(workdir, start)):  # nothing is written
    log(f"{workdir} is complete at step {start} (train.steps="
        f"{t.steps}); nothing written. To train it further, raise "
        "--config.train.steps; to use it, --mode=eval or --mode=sample")
    return
  log(f"{workdir} is complete at step {start} but has no final sample "
      "(it was stopped after its last checkpoint); writing it")
  writer = metrics.MetricsWriter(workdir, resume_step=start)
  stack.callback(writer.close)
  _write_sample(run, state.params, start, writer)


def _after_step(run: Run, state, done_step: int, logger, ref_params, stop,
                lock) -> dict | None:
  """What follows step `done_step`, in this order: a stop if another process
  took the workdir over, the eval and the save the config asks for (and the
  save of a run preempted), then the stop of a preempted run. The eval
  record, if there was an eval."""
  config, t = run.config, run.config.train
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
  last_eval = None
  if do_eval:
    t0 = time.perf_counter()
    last_eval = evaluate_params(run, state.params,
                                config.eval.max_batches, ref_params)
    logger.writer.write(done_step, {
        **last_eval, "eval_time_s": time.perf_counter() - t0})
    log(f"step {done_step}: {eval_line(last_eval)}")
  if do_save:
    run.checkpointer.save(
        done_step, state,
        run_info(config, done_step,
                 tokens_seen=done_step * logger.tokens_per_step),
        eval_loss=last_eval["eval_loss"] if do_eval else None)
  if preempted:
    run.checkpointer.close()  # committed before the process exits
    raise Preempted(
        f"stopped by SIGTERM after step {done_step}, saved in "
        f"{run.checkpointer.directory}/{done_step}; the same command "
        + ("writes its final sample" if final else "resumes the run"))
  if do_eval or do_save:  # keep them out of the step time
    logger.restart_window()
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


def _write_sample(run: Run, params, step: int, writer) -> None:
  """The final sample: samples/step_<step>.txt, the last file a run writes
  (whole or not at all), and TensorBoard's text. A run whose final
  checkpoint has none was stopped before it: the same command writes it."""
  text = sample_text(run, params)
  if jax.process_index() == 0:
    path = layout.sample(run.workdir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with disk.replacing(path) as f:
      f.write(text)
    writer.text("sample", text, step)
  log(f"--- sample (temperature {run.config.sample.temperature}) ---\n"
      f"{text}")


class StepLogger:
  """Writes finished steps' metrics (metrics.jsonl, TensorBoard, the progress
  bar). A step's metrics are fetched one step late, while the next step
  already runs, and timed from one fetched step to the next; train_time_s
  and train_cpu_time_s add up those times (wall and this process's CPU) since
  the process's first step, which compiles and is left out, as evals and
  saves are (benchmarks.speedrun reads them). A non-finite
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
    self.train_s = self.train_cpu_s = 0.0
    self.restart_window()

  def restart_window(self, now: float | None = None) -> None:
    """Times the steps from `now` on (evals and saves stay out of it)."""
    self.window_start = time.perf_counter() if now is None else now
    self.mark = (self.window_start, time.process_time())
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
    now, cpu = time.perf_counter(), time.process_time()
    elapsed = now - self.window_start
    first = step == self.start + 1  # its time includes compilation
    self.window_steps += 0 if first else 1
    if not first:
      self.train_s += now - self.mark[0]
      self.train_cpu_s += cpu - self.mark[1]
    self.mark = (now, cpu)
    if first or step % t.log_every_steps == 0 or step == t.steps:
      record = {"loss": done["loss"], "grad_norm": done["grad_norm"],
                "learning_rate": float(self.schedule(step - 1)),
                "tokens_seen": step * self.tokens_per_step,
                "train_time_s": self.train_s,
                "train_cpu_time_s": self.train_cpu_s}
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


def _reference(run: Run, state, resumed: bool):
  """The frozen params a dpo run measures its policy against: its starting
  params (checkpoint.init_from's, or the fresh initialization; a cooldown
  branch: its parent's reference), sharded like the params. A run saves
  them once, before its first step, as a params-only checkpoint under
  <workdir>/reference/ (readable like an export), and a resumed run reads
  them from there, so that a resume does not depend on init_from staying
  as it was."""
  directory = os.path.join(run.workdir, layout.REFERENCE)
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
