"""Two processes restore one step, agreed, even when only one of them sees
a checkpoint damaged (tests/damaged_view.py stands in for a bad copy on one
host): both resume from the same step, process 0 alone sets the damaged
one aside, and when no step restores everywhere both stop with one line;
none hangs. Real train.py processes on 127.0.0.1."""

import os
import shutil
import subprocess

import pytest

from conftest import PROCESSES, REPO, TINY_FLAGS, file_snapshot, run_train_py
from launch import local

pytestmark = PROCESSES

TIMEOUT = 240


def _flags(corpus_dir, cache, workdir, steps):
  return [*TINY_FLAGS, f"--config.data.source={corpus_dir}",
          f"--config.data.cache_dir={cache}", f"--workdir={workdir}",
          f"--config.train.steps={steps}", "--config.checkpoint.every_steps=10",
          "--config.eval.every_steps=10", "--config.eval.max_batches=2"]


@pytest.fixture(scope="module")
def saved(corpus_dir, tmp_path_factory):
  """A run of 20 steps on one process: checkpoints 10 and 20."""
  root = tmp_path_factory.mktemp("agreement")
  workdir, cache = str(root / "run"), str(root / "cache")
  result = run_train_py(*_flags(corpus_dir, cache, workdir, 20),
                        timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, cache


def _two_processes(flags, damaged_in: int, kind: str, steps: str, log_dir):
  """train.py FLAGS on 2 processes, process `damaged_in` seeing the
  checkpoints of `steps` damaged (tests/damaged_view.py's `kind`); each
  one's (exit status, output)."""
  procs = []
  for i, (env, argv, _) in enumerate(local.commands(
      2, 1, local.free_port(), flags, str(log_dir))):
    if i == damaged_in:
      argv = [argv[0], "tests/damaged_view.py", kind, steps, "--", *argv[2:]]
    with open(log_dir / f"process_{i}.log", "w") as out:
      procs.append(subprocess.Popen(
          argv, cwd=REPO, env={**os.environ, **env}, stdout=out,
          stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(code, (log_dir / f"process_{i}.log").read_text())
          for i, code in enumerate(codes)]


def _steps(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.parametrize("damaged_in, kind", [(0, "digest"),
                                              (1, "checksums")])
def test_damage_one_process_sees_resumes_both_at_the_same_step(
    saved, corpus_dir, tmp_path, damaged_in, kind):
  """Step 20 looks damaged to one process only (a file differs, or its
  checksums file is missing): both resume at 10, step 20 is renamed once
  (its files unchanged), and the run finishes."""
  source, cache = saved
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  step_20 = os.path.join(workdir, "checkpoints", "20")
  before = {os.path.relpath(k, step_20): v
            for k, v in file_snapshot(step_20).items()}
  results = _two_processes(_flags(corpus_dir, cache, workdir, 30),
                           damaged_in, kind, "20", tmp_path)
  for code, out in results:
    assert code == 0, out[-3000:]
  out = results[0][1]
  assert f"resuming from {workdir}/checkpoints at step 10" in out
  assert _steps(workdir) == ["10", "20", "20.damaged", "30"]
  aside = os.path.join(workdir, "checkpoints", "20.damaged")
  assert {os.path.relpath(k, aside): v
          for k, v in file_snapshot(aside).items()} == before
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [line for line in f if '"loss"' in line]
  assert len(logged) == 30  # 1-10, then 11-30 again after the resume


def test_no_step_every_process_restores_stops_both(saved, corpus_dir,
                                                   tmp_path):
  """Every step looks damaged to process 1 (no checksums files): both
  processes stop with the same one line and status 2, and nothing is
  renamed or changed."""
  source, cache = saved
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  before = file_snapshot(workdir)
  results = _two_processes(_flags(corpus_dir, cache, workdir, 30), 1,
                           "checksums", "10,20", tmp_path)
  want = (f"error: no checkpoint under {workdir}/checkpoints can be "
          "restored; the newest, 20, fails with DamagedCheckpoint: ")
  for code, out in results:
    assert code == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(want), out[-3000:]
    assert "Traceback" not in out
  assert "process(es) 1 found it damaged" in results[0][1]
  assert "checksums.sha256 is missing" in results[1][1]
  assert file_snapshot(workdir) == before
