"""What a workdir holds: the sweep's lock, its state file, the run's
metrics, and the status they give."""

import json
import os
import time

import layout
from launch.sweep.spec import Task
from trainer import workdir_lock
from trainer.workdir_lock import HOST
from trainer.workdir_lock import read_json as _read_json



class Lock(workdir_lock.LockFile):
  """A sweep process's claim on a workdir: <workdir>/sweep.lock, JSON naming
  the owner (host, sweep_pid, child_pid, started) and a heartbeat (unix
  time) that the owner renews every HEARTBEAT_S. It is stale when its host is
  this one and neither pid is alive, or when its heartbeat is older than
  STALE_S (the only test for other hosts' locks)."""

  PIDS = ("sweep_pid", "child_pid")
  IDENTITY = ("host", "sweep_pid", "started")

  @classmethod
  def acquire(cls, workdir: str):
    """(lock or None, the lock found there, if any): None while a live
    owner holds it."""
    now = time.time()
    return cls.take(os.path.join(workdir, layout.SWEEP_LOCK), {
        "host": HOST, "sweep_pid": os.getpid(), "child_pid": None,
        "started": now, "heartbeat": now})


def _held(workdir: str) -> bool:
  return Lock.holder(os.path.join(workdir, layout.SWEEP_LOCK)) is not None


def _state(workdir: str) -> dict:
  """<workdir>/sweep_state.json: attempts, status, last_exit, last_error,
  wall_s (over all attempts)."""
  return _read_json(os.path.join(workdir, layout.SWEEP_STATE)) or {}


STATUSES = ("queued", "running", "interrupted", "done", "failed")


def _status(task: Task, state: dict) -> str:
  """What the workdir says, whichever sweep process (or SLURM) ran it."""
  if task.done():
    return "done"
  if _held(task.workdir):
    return "running"
  if state.get("status") == "failed":
    return "failed"
  if state or os.path.isdir(os.path.join(task.workdir, layout.CHECKPOINTS)):
    return "interrupted"
  return "queued"


class Metrics:
  """The newest numbers and the evals of a run's metrics.jsonl, read
  incrementally; a resumed run rewrites the file (a new inode), which is then
  read afresh."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, layout.METRICS)
    self._reset(None)

  def _reset(self, inode) -> None:
    self._inode, self._offset = inode, 0
    self.step, self.loss, self.last_eval, self.evals = 0, None, {}, []
    self.speeds = []  # the logged tokens_per_sec

  def update(self) -> "Metrics":
    try:
      stat = os.stat(self.path)
    except FileNotFoundError:
      self._reset(None)
      return self
    if stat.st_ino != self._inode or stat.st_size < self._offset:
      self._reset(stat.st_ino)
    with open(self.path, "rb") as f:
      f.seek(self._offset)
      data = f.read(stat.st_size - self._offset)
    data = data[:data.rfind(b"\n") + 1]  # whole lines only
    self._offset += len(data)
    for line in data.splitlines():
      try:
        record = json.loads(line)
      except ValueError:  # cut short by a killed run
        continue
      self.step = max(self.step, record.get("step", 0))
      if "loss" in record:
        self.loss = record["loss"]
      if "tokens_per_sec" in record:
        self.speeds.append(record["tokens_per_sec"])
      if "eval_loss" in record:
        self.last_eval = record
        self.evals.append(record)
    return self
