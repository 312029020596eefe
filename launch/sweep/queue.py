"""The local queue: a sweep's train.py processes on this machine."""

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time

import layout
from data import disk
from launch.local import REPO, exit_status
from launch.sweep.spec import Sweep, Task
from launch.sweep.status import Lock, Metrics, _state
from launch.sweep.table import _duration, _number
from trainer.workdir_lock import HEARTBEAT_S, HOST

PREEMPTED = 75       # train.py saved and stopped; the same command resumes
DETERMINISTIC = {2: "bad input", 3: "diverged"}  # retrying cannot help


def _die_with_parent():
  """A preexec_fn (Linux) that has the kernel send the child SIGTERM when
  the sweep dies, even by SIGKILL: the child then saves its step like any
  preempted run. None elsewhere."""
  if not sys.platform.startswith("linux"):
    return None
  prctl = ctypes.CDLL(None, use_errno=True).prctl
  parent = os.getpid()

  def preexec():
    prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the sweep died before prctl took effect
      os.kill(os.getpid(), signal.SIGTERM)
  return preexec


class Attempt:
  """A train.py process of the queue, its output appended to
  <workdir>/sweep.log, and its entry in the task's state file."""

  def __init__(self, task: Task, lock: Lock):
    self.task, self.lock, self.stopped = task, lock, False
    self.state = {"attempts": 0, "wall_s": 0.0, **_state(task.workdir)}
    self.state["attempts"] += 1
    self.wall_before = self.state["wall_s"]
    self.started = time.monotonic()
    argv = [sys.executable, "train.py", *task.args]
    self.log = os.path.join(task.workdir, layout.SWEEP_LOG)
    with open(self.log, "a") as log:
      log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt "
                f"{self.state['attempts']} on {HOST}: {shlex.join(argv)}\n")
      log.flush()
      self.log_start = log.tell()
      self.proc = subprocess.Popen(
          argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
          start_new_session=True,  # a terminal's Ctrl-C reaches the sweep only
          preexec_fn=_die_with_parent(),
          env={**os.environ, "TQDM_MININTERVAL": "10"})  # a readable log
    self.renew()

  def renew(self) -> bool:
    """Heartbeat and state; False if the lock was lost."""
    if not self.lock.renew(child_pid=self.proc.pid):
      return False
    self.save("running")
    return True

  def save(self, status: str, **exit_info) -> None:
    """The state file, unless the task has passed to another owner."""
    if not self.lock.ours():
      return
    self.state.update(status=status, **exit_info, wall_s=round(
        self.wall_before + time.monotonic() - self.started, 1))
    disk.write_json(os.path.join(self.task.workdir, layout.SWEEP_STATE),
                    self.state)

  def stop(self) -> None:
    if not self.stopped and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)  # train.py saves and exits 75
    self.stopped = True

  def error_line(self) -> str | None:
    """This attempt's `error: ...` line, else its last line of output."""
    with open(self.log, "rb") as f:
      f.seek(max(self.log_start, os.path.getsize(self.log) - 65536))
      text = f.read().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [None])[-1]


class Queue:
  """Runs a sweep's tasks on this machine, `parallel` at a time, until each
  is done or has failed for this invocation."""

  def __init__(self, sweep: Sweep, parallel: int, retries: int, display):
    self.tasks, self.parallel, self.retries = sweep.tasks, parallel, retries
    self.display = display
    self.running = {}      # name -> Attempt
    self.failures = {}     # name -> failed attempts in this invocation
    self.finished = {}     # name -> "done" or "failed", for this invocation
    self.waiting_for = {}  # name -> the lock it waits on (said once)
    self.signals = []

  def run(self) -> int:
    """0 when every task is done, 1 if some failed, 75 when stopped by
    SIGINT / SIGTERM (the children saved; the same command continues)."""
    handler = lambda signum, frame: self.signals.append(signum)
    previous = {s: signal.signal(s, handler)
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      renewed = time.monotonic()
      while True:
        if self.signals:
          for attempt in self.running.values():
            attempt.stop()
        self._reap()
        if not self.signals:
          self._start()
        if time.monotonic() - renewed > HEARTBEAT_S:
          self._renew()
          renewed = time.monotonic()
        self.display.update()
        if not self.running and (self.signals or
                                 len(self.finished) == len(self.tasks)):
          break
        time.sleep(0.5)
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
    self.display.update(force=True)
    if self.signals:
      return PREEMPTED
    return 1 if "failed" in self.finished.values() else 0

  def _start(self) -> None:
    """Starts the costliest ready tasks first: a study's longest runs do not
    wait for the end while short branches fill the slots around them."""
    for task in sorted(self.tasks, key=lambda t: -t.cost):
      if len(self.running) >= self.parallel:
        return
      if task.name in self.running or task.name in self.finished:
        continue
      if task.done():
        self.finished[task.name] = "done"
      elif not task.ready():
        if self.finished.get(task.parent.name) == "failed":
          self.finished[task.name] = "failed"
          self.display.event(f"failed {task.name}: its run failed before "
                             f"step {task.from_step}")
      else:
        self._try_start(task)

  def _try_start(self, task: Task) -> None:
    os.makedirs(task.workdir, exist_ok=True)
    lock, found = Lock.acquire(task.workdir)
    if lock is None:
      if found and self.waiting_for.get(task.name) != found.get("started"):
        self.waiting_for[task.name] = found.get("started")
        self.display.event(f"waiting {task.name}: locked by {_owner(found)}")
      return
    if found:
      self.display.event(f"took over {task.name}: the lock of "
                         f"{_owner(found)} was stale")
    attempt = Attempt(task, lock)
    self.running[task.name] = attempt
    self.display.event(f"start {task.name} (attempt "
                       f"{attempt.state['attempts']})")

  def _reap(self) -> None:
    for name, attempt in list(self.running.items()):
      code = attempt.proc.poll()
      if code is not None:
        del self.running[name]
        self._end(attempt, exit_status(code))
        attempt.lock.release()

  def _end(self, attempt: Attempt, code: int) -> None:
    task, error = attempt.task, attempt.error_line()
    took = _duration(time.monotonic() - attempt.started)
    if task.done():
      attempt.save("done", last_exit=code, last_error=None)
      self.finished[task.name] = "done"
      m = Metrics(task.workdir).update()
      self.display.event(
          f"done {task.name} in {took}: loss {_number(m.loss)}, eval loss "
          f"{_number(m.last_eval.get('eval_loss'))}")
    elif attempt.stopped or code == PREEMPTED:
      attempt.save("interrupted", last_exit=code, last_error=error)
      self.display.event(
          f"{'stopped' if attempt.stopped else 'preempted'} {task.name} "
          f"(exit {code}) after {took}"
          f"{'' if attempt.stopped else '; requeued'}")
    else:
      self.failures[task.name] = self.failures.get(task.name, 0) + 1
      final = code in DETERMINISTIC or self.failures[task.name] > self.retries
      attempt.save("failed", last_exit=code, last_error=error)
      if final:
        self.finished[task.name] = "failed"
      reason = f": {DETERMINISTIC[code]}" if code in DETERMINISTIC else ""
      self.display.event(f"failed {task.name} (exit {code}{reason}) after "
                         f"{took}: {error}{'' if final else '; retrying'}")

  def _renew(self) -> None:
    for attempt in self.running.values():
      if not attempt.renew():
        attempt.stop()
        self.display.event(f"lost the lock of {attempt.task.name} (taken "
                           "over as stale); stopping it")


def _owner(lock: dict) -> str:
  return (f"{lock.get('host')} pid {lock.get('sweep_pid')} (train.py pid "
          f"{lock.get('child_pid')})")
