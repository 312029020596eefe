"""The data-order record (<workdir>/data_order.jsonl) and its audit,
python -m trainer.audit, on real train.py runs: clean, resumed, tampered
with, and seeded differently."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import layout
from conftest import REPO, TINY_FLAGS, run_train_py
from trainer import audit

STEPS = 12
TIMEOUT = 300


def _flags(corpus_dir, cache, workdir, *extra):
  return [*TINY_FLAGS, f"--config.data.source={corpus_dir}",
          f"--config.data.cache_dir={cache}", f"--workdir={workdir}",
          f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=5",
          "--config.eval.every_steps=100", "--config.eval.max_batches=1",
          *extra]


@pytest.fixture(scope="module")
def clean(corpus_dir, tmp_path_factory):
  """A run that never stopped, and its data cache."""
  root = tmp_path_factory.mktemp("audit")
  workdir, cache = str(root / "run"), str(root / "cache")
  result = run_train_py(*_flags(corpus_dir, cache, workdir), timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, cache


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, layout.DATA_ORDER)) as f:
    return [json.loads(line) for line in f]


def _audit(capsys, *args) -> tuple[int, list[str]]:
  code = audit.main(list(args))
  return code, capsys.readouterr().out.splitlines()


def test_clean_run(clean, capsys):
  workdir, _ = clean
  records = _records(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert {r["epoch"] for r in records} == {0}
  assert all(len(r["fingerprint"]) == 16 for r in records)
  assert len({r["fingerprint"] for r in records}) == STEPS
  code, out = _audit(capsys, workdir, "--recompute")
  assert code == 0 and out == [
      f"ok: {workdir}: steps 1-{STEPS} in {STEPS} records (0 replays); "
      "batches recomputed from the config and data; none skipped or repeated"]
  # The command line, as documented.
  proc = subprocess.run([sys.executable, "-m", "trainer.audit", workdir],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith(f"ok: {workdir}: steps 1-{STEPS} ")


def test_resumed_run_replays_the_same_batches(clean, corpus_dir, tmp_path,
                                              capsys):
  """Checkpoints 10 and 12 lost (as in a crash before they were written):
  the run resumes at 5 and records steps 6-12 again, with the batches they
  had the first time."""
  workdir = str(tmp_path / "run")
  shutil.copytree(clean[0], workdir)
  for step in (10, 12):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  result = run_train_py(*_flags(corpus_dir, clean[1], workdir),
                        timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "at step 5" in result.stdout
  records = _records(workdir)
  assert [r["step"] for r in records] == [*range(1, 13), *range(6, 13)]
  assert records[12:] == records[5:12]
  code, out = _audit(capsys, workdir, clean[0])
  assert code == 0 and out == [
      f"ok: {workdir}: steps 1-12 in 19 records (7 replays); {clean[0]}: "
      "steps 1-12 in 12 records (0 replays); none skipped or repeated; the "
      "same batches at every common step"]


def _tampered(clean, tmp_path, edit) -> str:
  """A copy of the clean run whose record went through edit(lines)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(clean[0], workdir)
  path = os.path.join(workdir, layout.DATA_ORDER)
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.writelines(edit(lines))
  return workdir


def test_skipped_steps_are_found(clean, tmp_path, capsys):
  workdir = _tampered(clean, tmp_path, lambda lines: lines[:3] + lines[5:])
  code, out = _audit(capsys, workdir)
  assert code == 1
  assert out == [f"{workdir}/{layout.DATA_ORDER}: steps 4-5 are missing"]


def test_a_batch_seen_twice_in_an_epoch_is_found(clean, tmp_path, capsys):
  records = _records(clean[0])
  def edit(lines):
    lines[2] = json.dumps({**records[2],
                           "fingerprint": records[1]["fingerprint"]}) + "\n"
    return lines
  workdir = _tampered(clean, tmp_path, edit)
  path = f"{workdir}/{layout.DATA_ORDER}"
  code, out = _audit(capsys, workdir, "--recompute")
  assert code == 1
  assert out == [
      f"{path}:3: steps 2, 3 of epoch 0 saw the same batch "
      f"{records[1]['fingerprint']}",
      f"{path}:3: step 3 recorded batch {records[1]['fingerprint']} of epoch "
      f"0; the config and data give {records[2]['fingerprint']} of epoch 0"]


def test_a_replay_with_another_batch_and_a_bad_line_are_found(clean, tmp_path,
                                                              capsys):
  records = _records(clean[0])
  replay = {**records[6], "fingerprint": records[0]["fingerprint"][::-1]}
  workdir = _tampered(clean, tmp_path, lambda lines: lines + [
      json.dumps(replay) + "\n", '{"step": 8, "epoch": 0}\n'])
  path = f"{workdir}/{layout.DATA_ORDER}"
  code, out = _audit(capsys, workdir)
  assert code == 1
  assert out == [
      f"{path}:14: not a data-order record: '{{\"step\": 8, \"epoch\": 0}}'",
      f"{path}:13: step 7 replayed with batch {replay['fingerprint']}; line 7 "
      f"has {records[6]['fingerprint']}"]


def test_runs_with_other_seeds_differ_from_step_one(clean, corpus_dir,
                                                    tmp_path, capsys):
  workdir = str(tmp_path / "seed1")
  result = run_train_py(*_flags(corpus_dir, clean[1], workdir,
                                "--config.train.seed=1",
                                "--config.train.steps=3"), timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  first = _records(workdir)[0]["fingerprint"]
  code, out = _audit(capsys, clean[0], workdir)
  assert code == 1
  assert out == [f"{clean[0]} and {workdir}: the data order first differs at "
                 f"step 1 ({_records(clean[0])[0]['fingerprint']} vs {first})"]


def test_bad_input_is_one_line_and_status_2(clean, tmp_path, capsys):
  workdir = _tampered(clean, tmp_path, lambda lines: lines)
  os.remove(os.path.join(workdir, layout.DATA_ORDER))
  for where, message in ((str(tmp_path / "none"), "holds no trained run"),
                         (workdir, f"holds no {layout.DATA_ORDER}")):
    assert audit.main([where]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in (
        err[0]), err


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
  """Whole records stay; the next one starts its own line."""
  path = tmp_path / layout.DATA_ORDER
  path.write_text('{"step": 1, "epoch": 0, "fingerprint": "ab"}\n'
                  '{"step": 2, "ep')
  log = audit.DataOrderLog(str(tmp_path), global_batch=4, num_windows=10,
                           enabled=True)
  log.write(2, "cd")
  log.close()
  assert path.read_text().splitlines() == [
      '{"step": 1, "epoch": 0, "fingerprint": "ab"}',
      '{"step": 2, "epoch": 0, "fingerprint": "cd"}']
