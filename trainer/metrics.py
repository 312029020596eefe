"""Where numbers go: <workdir>/metrics.jsonl, TensorBoard events (tensorboardX)
under <workdir>/tensorboard, and FLOP / MFU accounting."""

import contextlib
import json
import os
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import RecordWriter

import layout
from data import disk
from trainer import objectives

# Dense peak FLOP/s per device (bf16 for accelerators), by jax device_kind.
_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12,
}


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """Median FLOP/s of an [n, n] @ [n, n] float32 matmul on device 0."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / float(np.median(times))


def known_peak_flops(device_kind: str) -> float | None:
  """A known accelerator's datasheet peak (dense bf16 FLOP/s), else None."""
  return _PEAK_FLOPS.get(device_kind)


def peak_flops_per_device(configured: float = 0.0) -> float:
  """The configured peak, else a known accelerator's, else measured (CPU)."""
  if configured > 0:
    return configured
  return (known_peak_flops(jax.devices()[0].device_kind)
          or measure_matmul_flops())


_PERF_KEYS = ("tokens_per_sec", "tokens_per_sec_per_device", "step_time_ms",
              "data_wait_ms", "mfu", "first_step_time_s", "train_time_s",
              "train_cpu_time_s")


def _tensorboard_tag(key: str) -> str:
  """Groups TensorBoard charts: train/, eval/ and perf/."""
  if key in _PERF_KEYS:
    return f"perf/{key}"
  return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def flops_per_token(model_cfg, objective: str) -> float:
  """Training FLOPs per input token, the one count of MFU, run.json, sweeps
  and scaling fits: model.GPTConfig.flops_per_token(), 6 N, and for dpo
  2 N more, the frozen reference model's forward pass over the same
  tokens."""
  flops = model_cfg.flops_per_token()
  return (flops * 4 / 3 if objectives.OBJECTIVES[objective].uses_reference
          else flops)


def code_version() -> dict:
  """The commit of the code's git checkout and whether its tree was clean
  (no change to a tracked file, no untracked file); nulls without git."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args) -> str:
    return subprocess.run(["git", "-C", root, *args], capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip()
  try:
    return {"commit": git("rev-parse", "HEAD"),
            "clean": not git("status", "--porcelain")}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "clean": None}


def write_run_summary(workdir: str, model_cfg, train_cfg) -> None:
  """<workdir>/run.json: the sizes a sweep or scaling study reads without
  rebuilding the model (parameters, FLOPs per token, tokens per step), and
  the code_version() that wrote it (a resumed run: the latest). The counts
  are the real vocabulary's; `*_padded`, the padded one's (model.
  GPTConfig.padded_vocab_size), as the parameters are stored."""
  objective = train_cfg.get("objective", "next-token")
  summary = {"params": model_cfg.num_params(),
             "params_padded": model_cfg.num_params(padded=True),
             "params_non_embedding": model_cfg.num_params(embeddings=False),
             "flops_per_token": flops_per_token(model_cfg, objective),
             "tokens_per_step": train_cfg.batch_size *
                                objectives.tokens_per_row(
                                    objective, model_cfg.seq_len),
             "vocab_size": model_cfg.vocab_size,
             "vocab_size_padded": model_cfg.padded_vocab_size,
             "steps": train_cfg.steps,
             "code": code_version()}
  disk.write_json(os.path.join(workdir, layout.RUN), summary)


class MetricsWriter:
  """Appends one JSON object per record; mirrors scalars to TensorBoard.
  Only process 0 writes. TensorBoard's events are written here, not in a
  thread of tensorboardX's (whose failure would leave it blocked), and
  flushed every FLUSH_S seconds and at the end. A write that fails for want
  of space or permission raises disk.WriteFailed."""

  FLUSH_S = 10.0

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, layout.METRICS)
    self.tensorboard = os.path.join(workdir, layout.TENSORBOARD)
    if not self.enabled:
      return
    with _writing("writing the metrics", self.path):
      self._drop_records_after(resume_step)
      self._file = open(self.path, "a")
    with _writing("writing TensorBoard events", self.tensorboard):
      os.makedirs(self.tensorboard, exist_ok=True)
      self._tb = RecordWriter(os.path.join(
          self.tensorboard, f"events.out.tfevents.{time.time():.0f}."
          f"{socket.gethostname()}"))
      self._tb.write(event_pb2.Event(
          wall_time=time.time(), file_version="brain.Event:2"
      ).SerializeToString())
    self._flushed = time.monotonic()

  def _drop_records_after(self, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: forget them so
    the series has no duplicates."""
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= step:
            kept.append(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
          pass
    with disk.replacing(self.path) as f:
      f.writelines(kept)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: (float(v) if isinstance(v, (np.generic, np.ndarray,
                                                  jax.Array)) else v)
                   for k, v in metrics.items()})
    line = json.dumps(record) + "\n"
    with _writing("writing the metrics", self.path, len(line)):
      self._file.write(line)
      self._file.flush()
    self._events(step, [tb_summary.scalar(_tensorboard_tag(k), v)
                        for k, v in record.items()
                        if k != "step" and isinstance(v, (int, float))])

  def text(self, tag: str, text: str, step: int) -> None:
    if self.enabled:
      self._events(step, [tb_summary.text(tag, text)], flush=True)

  def _events(self, step: int, summaries: list, flush: bool = False) -> None:
    with _writing("writing TensorBoard events", self.tensorboard):
      for summary in summaries:
        self._tb.write(event_pb2.Event(
            summary=summary, step=int(step), wall_time=time.time()
        ).SerializeToString())
      if flush or time.monotonic() - self._flushed > self.FLUSH_S:
        self._tb.flush()
        self._flushed = time.monotonic()

  def close(self) -> None:
    """Safe to call after a failed write (the files are closed, what could
    not be written is dropped) and twice."""
    if not self.enabled or self._file.closed:
      return
    with contextlib.suppress(OSError):
      self._file.close()
    with contextlib.suppress(OSError):
      self._tb.close()  # the file is closed even when its flush fails


@contextlib.contextmanager
def _writing(what: str, path: str, needed: int | None = None):
  """Turns a write's failure for want of space or permission into
  disk.WriteFailed."""
  try:
    yield
  except OSError as e:
    code = disk.write_errno(e)
    if code is None:
      raise
    raise disk.WriteFailed(disk.failure(what, path, code, needed)) from None
