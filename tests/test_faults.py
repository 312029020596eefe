"""Faults a cluster produces: a second writer on a workdir, a lock holder
killed with SIGKILL or lost with its host, SIGTERM before the first step and
during the last one. Each checks the one line, the exit status, and that
nothing saved before is changed or lost."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import layout
from conftest import (PROCESSES, REPO, TINY_FLAGS, dead_pid, file_snapshot,
                      last_logged_step, metrics_records, run_train_py,
                      tiny_run_config)
from data import disk
from trainer import checkpoint, loop, workdir_lock
from trainer import state as state_lib
from trainer.errors import Preempted, WorkdirInUse

TIMEOUT = 300
IN_USE = re.compile(
    r"error: workdir (\S+) is in use by pid (\d+) on host (\S+) since "
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC) \(heartbeat (\d+) s ago\); wait "
    r"for it to finish or stop it")


def _write_lock(workdir, pid, host=workdir_lock.HOST, age_s=0.0,
                pid_start=None) -> dict:
  """A lock as a train.py process writes it, started at 2026-12-07 05:10:03
  UTC, its heartbeat age_s old."""
  lock = {"host": host, "pid": pid, "pid_start": pid_start,
          "started": 1796620203.0, "heartbeat": time.time() - age_s}
  disk.write_json(_lock_path(workdir), lock)  # whole, as a holder's
  return lock


def _lock_path(workdir) -> str:
  return os.path.join(workdir, layout.LOCK)


# --- the lock alone -----------------------------------------------------------

def test_live_holders_refuse_and_dead_or_silent_ones_are_taken_over(
    tmp_path, sleeper):
  live, dead, me = sleeper.pid, dead_pid(), os.getpid()
  stale = workdir_lock.STALE_S + 1
  cases = [  # (lock fields, taken over)
      (dict(pid=live, pid_start=workdir_lock.start_ticks(live)), False),
      (dict(pid=live, age_s=stale), False),  # suspended, not dead
      (dict(pid=dead), True),                # SIGKILL
      # A pid reused by another process (here: this one) after a restart.
      (dict(pid=me, pid_start=workdir_lock.start_ticks(me) - 1), True),
      (dict(pid=dead, host="node7"), False),  # pids unknowable there
      (dict(pid=dead, host="node7", age_s=stale), True)]  # a lost node
  for i, (fields, taken) in enumerate(cases):
    workdir = str(tmp_path / str(i))
    os.makedirs(workdir)
    found = _write_lock(workdir, **fields)
    if not taken:
      with pytest.raises(WorkdirInUse) as e:
        workdir_lock.WorkdirLock.acquire(workdir)
      age = time.time() - found["heartbeat"]
      assert str(e.value) == (
          f"workdir {workdir} is in use by pid {fields['pid']} on host "
          f"{fields.get('host', workdir_lock.HOST)} since 2026-12-07 05:10:03 "
          f"UTC (heartbeat {age:.0f} s ago); wait for it to finish or stop "
          "it"), fields
      with open(_lock_path(workdir)) as f:
        assert json.load(f) == found  # untouched
      continue
    lock = workdir_lock.WorkdirLock.acquire(workdir)
    with open(_lock_path(workdir)) as f:
      assert json.load(f)["pid"] == me, fields
    with pytest.raises(WorkdirInUse, match=f"in use by pid {me} "):
      workdir_lock.WorkdirLock.acquire(workdir)  # held now
    lock.release()
    assert os.listdir(workdir) == [], fields  # nothing left behind


def test_heartbeat_renews_and_a_lost_lock_stays_the_new_holders(
    tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.02)
  workdir = str(tmp_path / "new" / "run")
  lock = workdir_lock.WorkdirLock.acquire(workdir)
  first = lock.owner["heartbeat"]
  deadline = time.time() + 10
  read = lambda: workdir_lock.read_json(_lock_path(workdir))
  while read()["heartbeat"] == first and time.time() < deadline:
    time.sleep(0.01)
  assert read()["heartbeat"] > first
  os.unlink(_lock_path(workdir))  # by hand: claimed again
  while not os.path.exists(_lock_path(workdir)) and time.time() < deadline:
    time.sleep(0.01)
  assert lock.ours() and lock.lost is None
  # Taken over (this process looked dead to another host); again until a
  # heartbeat finds it lost (a beat that read the lock as its own just
  # before may write over a takeover).
  while lock.lost is None and time.time() < deadline:
    other = _write_lock(workdir, pid=1, host="node7")
    time.sleep(0.1)
  assert lock.lost == other
  lock.release()
  with open(_lock_path(workdir)) as f:
    assert json.load(f) == other
  # A workdir the lock created is removed again when left empty.
  os.unlink(_lock_path(workdir))
  workdir_lock.WorkdirLock.acquire(workdir).release()
  assert os.listdir(tmp_path / "new") == ["run"]  # created by the test
  os.rmdir(workdir)
  os.rmdir(tmp_path / "new")
  workdir_lock.WorkdirLock.acquire(workdir).release()
  assert os.listdir(tmp_path) == []


# --- train.py -----------------------------------------------------------------

def _flags(corpus_dir, workdir, *extra):
  return [*TINY_FLAGS, f"--config.data.source={corpus_dir}",
          f"--config.data.cache_dir={os.path.dirname(workdir)}/cache",
          f"--workdir={workdir}", *extra]


def _one_error_line(result_or_text) -> str:
  text = getattr(result_or_text, "stderr", result_or_text)
  lines = text.strip().splitlines()
  assert "Traceback" not in text, text[-3000:]
  assert [l for l in lines if "error" in l.lower()] == lines[-1:], text[-3000:]
  return lines[-1]


@PROCESSES
def test_a_second_writer_stops_before_writing_anything(corpus_dir, tmp_path,
                                                       sleeper):
  """A live holder (here a process that writes nothing, so that every file
  can be compared) keeps train.py, alone or in 2 processes, off the
  workdir: exit 2, one line, no file changed. A cooldown branch trains
  beside it (in a workdir of its own)."""
  workdir = str(tmp_path / "run")
  flags = _flags(corpus_dir, workdir, "--config.train.schedule=wsd",
                 "--config.checkpoint.keep_steps=(3,)")
  result = run_train_py(*flags, "--config.train.steps=6", timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  _write_lock(workdir, sleeper.pid,
              pid_start=workdir_lock.start_ticks(sleeper.pid))
  files = file_snapshot(workdir)
  logs = tmp_path / "logs"
  runs = {  # at once
      "one": run_train_py(*flags, "--config.train.steps=9", wait=False),
      "two": subprocess.Popen(
          [sys.executable, "launch/local.py", "--num_processes=2",
           f"--log_dir={logs}", "--", *flags, "--config.train.steps=9"],
          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True),
      "branch": run_train_py("--mode=cooldown", f"--workdir={workdir}",
                             "--config.cooldown.from_step=3",
                             "--config.cooldown.steps=2", wait=False)}
  out = {name: proc.communicate(timeout=TIMEOUT)[1]
         for name, proc in runs.items()}
  codes = {name: proc.returncode for name, proc in runs.items()}
  assert codes == {"one": 2, "two": 2, "branch": 0}, out
  want = (f"error: workdir {workdir} is in use by pid {sleeper.pid} on host "
          f"{workdir_lock.HOST} since 2026-12-07 05:10:03 UTC (heartbeat ")
  for text in (out["one"], out["two"], (logs / "process_1.log").read_text()):
    line = _one_error_line(text)
    assert line.startswith(want) and IN_USE.fullmatch(line), line
  branch = os.path.join(workdir, "cooldowns", "3+2")
  assert os.path.exists(os.path.join(branch, "samples", "step_5.txt"))
  assert not os.path.exists(_lock_path(branch))
  assert {k: v for k, v in file_snapshot(workdir).items()
          if not k.startswith(branch)} == files


def test_two_runs_on_one_workdir_then_the_holder_killed(corpus_dir, tmp_path):
  """The same command twice: the second stops with the first's pid. Once the
  first is killed with SIGKILL, the command again takes its lock over; a
  SIGTERM then (the run not yet at its first step) exits 75 with nothing
  written; the command again resumes from the last checkpoint, which it
  finds as saved, and the series has each step once. A save the kill cut
  short is removed, and the removal ends before the SIGTERM'd process."""
  workdir, log = str(tmp_path / "run"), str(tmp_path / "log.txt")
  flags = _flags(corpus_dir, workdir, "--config.train.steps=100000",
                 "--config.checkpoint.every_steps=20",
                 "--config.eval.every_steps=1000",
                 "--config.train.schedule=constant")
  first = run_train_py(*flags, wait=False, log=log)
  try:
    deadline = time.time() + TIMEOUT
    while (first.poll() is None and last_logged_step(workdir) < 25 and
           time.time() < deadline):
      time.sleep(0.01)
    assert first.poll() is None, open(log).read()[-3000:]
    second = run_train_py(*flags, timeout=TIMEOUT)
    assert second.returncode == 2, second.stderr[-3000:]
    line = _one_error_line(second)
    match = IN_USE.fullmatch(line)
    assert match and match.groups()[:3] == (workdir, str(first.pid),
                                            workdir_lock.HOST), line
    assert int(match.group(5)) <= 3 * workdir_lock.HEARTBEAT_S, line
    assert "resuming" not in second.stdout + second.stderr
  finally:
    first.kill()
    first.wait()
  with open(_lock_path(workdir)) as f:
    assert json.load(f)["pid"] == first.pid  # left behind by the kill
  # Not compared: a save the kill cut short, removed by the next holder.
  snapshot = lambda: {k: v for k, v in file_snapshot(workdir).items()
                      if "orbax-checkpoint-tmp" not in k}
  files = snapshot()
  del files[_lock_path(workdir)]
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = max(int(d) for d in os.listdir(checkpoints) if d.isdigit()) + 3
  # A save cut short, as the kill may leave one: the next holder's
  # checkpointer removes it in a thread, which must end before its process.
  cut_short = os.path.join(checkpoints, "99999.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(cut_short, "state"), exist_ok=True)
  for i in range(200):
    with open(os.path.join(cut_short, "state", str(i)), "w") as f:
      f.write("x" * 1000)
  flags.append(f"--config.train.steps={steps}")

  third_log = str(tmp_path / "third.log")
  third = run_train_py(*flags, wait=False, log=third_log)
  while (third.poll() is None and time.time() < deadline and
         (workdir_lock.read_json(_lock_path(workdir)) or {}).get("pid") !=
         third.pid):
    time.sleep(0.002)
  third.send_signal(signal.SIGTERM)
  assert third.wait(timeout=TIMEOUT) == 75, open(third_log).read()[-3000:]
  assert open(third_log).read().strip().splitlines()[-1] == (
      "preempted: stopped by SIGTERM before the first step, nothing written; "
      "the same command starts or resumes the run")
  assert snapshot() == files  # and the lock released
  assert not os.path.exists(cut_short)

  resumed = run_train_py(*flags, timeout=TIMEOUT)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"at step {steps - 3}" in resumed.stdout
  assert not os.path.exists(_lock_path(workdir))
  train_steps = [r["step"] for r in metrics_records(workdir) if "loss" in r]
  assert train_steps == list(range(1, steps + 1))
  for out in (open(log).read(), open(third_log).read(), resumed.stderr,
              second.stderr):
    assert "Unable to find the step" not in out


def _before_call(fn, call: int, action=lambda: os.kill(os.getpid(),
                                                        signal.SIGTERM)):
  """fn, doing `action` (by default: sending this process SIGTERM) as its
  `call`-th call starts."""
  calls = []
  def wrapper(*args, **kwargs):
    calls.append(1)
    if len(calls) == call:
      action()
    return fn(*args, **kwargs)
  return wrapper


def test_sigterm_during_the_restore(corpus_dir, data_cache, tmp_path,
                                    monkeypatch):
  config = tiny_run_config(corpus_dir, data_cache, steps=3)
  workdir = str(tmp_path / "run")
  loop.train(config, workdir)
  files = file_snapshot(workdir)
  config.train.steps = 6
  monkeypatch.setattr(checkpoint.Checkpointer, "restore_latest_valid",
                      _before_call(
                          checkpoint.Checkpointer.restore_latest_valid, 1))
  with pytest.raises(Preempted, match="^stopped by SIGTERM before the first "
                     "step, nothing written;"):
    loop.train(config, workdir)
  assert file_snapshot(workdir) == files  # the lock gone again


def test_sigterm_during_the_last_step(corpus_dir, data_cache, tmp_path,
                                      monkeypatch):
  """Preempted at the last step: its eval and checkpoint are saved, and the
  same command then writes the final sample (the one a run that never
  stopped writes) and nothing else; after that it is complete."""
  config = tiny_run_config(corpus_dir, data_cache, steps=6)
  ref, workdir = str(tmp_path / "ref"), str(tmp_path / "run")
  loop.train(config, ref)
  real = state_lib.make_train_step
  monkeypatch.setattr(state_lib, "make_train_step",
                      lambda *a, **k: _before_call(real(*a, **k), 6))
  with pytest.raises(Preempted) as e:
    loop.train(config, workdir)
  assert str(e.value) == (
      f"stopped by SIGTERM after step 6, saved in {workdir}/checkpoints/6; "
      "the same command writes its final sample")
  assert not os.path.exists(os.path.join(workdir, "samples"))
  monkeypatch.undo()
  records = metrics_records(workdir)
  loop.train(config, workdir)
  assert metrics_records(workdir) == records  # no eval twice
  assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
  sample = os.path.join("samples", "step_6.txt")
  with open(os.path.join(ref, sample)) as a, \
       open(os.path.join(workdir, sample)) as b:
    assert a.read() == b.read()
  files = file_snapshot(workdir)
  assert loop.train(config, workdir) == {}  # complete: nothing written
  assert file_snapshot(workdir) == files



def test_a_run_whose_lock_was_taken_over_stops_without_saving(
    corpus_dir, data_cache, tmp_path, monkeypatch):
  """Its heartbeat judged stale elsewhere (a hung file system, a stopped
  process), the lock taken over: the run stops at the next step, saves
  nothing more, and leaves the new holder's lock alone."""
  config = tiny_run_config(corpus_dir, data_cache, steps=6)
  workdir = str(tmp_path / "run")
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.01)
  holder = {}
  def take_over():
    # Until a heartbeat finds it lost and ends (a beat that read the lock as
    # its own just before may write over the first takeover).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      holder.update(_write_lock(workdir, pid=1, host="node7"))
      time.sleep(0.1)
      if not any(t.name == "workdir-lock-heartbeat"
                 for t in threading.enumerate()):
        break
  real = state_lib.make_train_step
  monkeypatch.setattr(state_lib, "make_train_step",
                      lambda *a, **k: _before_call(real(*a, **k), 5,
                                                   take_over))
  with pytest.raises(WorkdirInUse) as e:
    loop.train(config, workdir)
  assert str(e.value) == (
      f"pid 1 on host node7 took over the lock of {workdir}, not renewed by "
      f"this run for {workdir_lock.STALE_S} s; stopped after step 5 without "
      "saving it")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  with open(_lock_path(workdir)) as f:
    assert json.load(f) == holder
