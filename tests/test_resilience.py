"""Runs that stop and start: SIGKILL and SIGTERM at random steps, damaged
checkpoints, restores onto another mesh or another number of processes,
checkpoints of older versions, divergence, and starting from another run's
parameters. Every run is a real train.py process."""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import layout
from conftest import (PROCESSES, REPO, TINY_FLAGS, file_snapshot,
                      last_logged_step, metrics_records, run_train_py)
from trainer import audit

STEPS = 120
TIMEOUT = 300


def _flags(corpus_dir, cache_dir, workdir, *extra):
  return [*TINY_FLAGS, f"--config.data.source={corpus_dir}",
          f"--config.data.cache_dir={cache_dir}", f"--workdir={workdir}",
          f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=10",
          "--config.eval.every_steps=40", "--config.eval.max_batches=2",
          *extra]


def _series(workdir) -> dict:
  """(step, metric) -> value for the losses, norms, rates and eval losses."""
  return {(r["step"], k): r[k] for r in metrics_records(workdir)
          for k in ("loss", "grad_norm", "learning_rate", "eval_loss") if k in r}


def _state(workdir, step) -> dict:
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))


def _params(workdir, step) -> dict:
  import jax
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path(_state(workdir, step)["params"])}


def _data_order(workdir) -> list[tuple]:
  """(step, fingerprint) of each record of data_order.jsonl."""
  with open(os.path.join(workdir, layout.DATA_ORDER)) as f:
    return [(r["step"], r["fingerprint"]) for r in map(json.loads, f)]


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit())


def _finish(proc, log=None):
  try:
    out = proc.communicate(timeout=TIMEOUT)[0]
  except Exception:
    proc.kill()
    raise
  if log:
    with open(log) as f:
      out = f.read()
  return proc.returncode, out


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory):
  """An uninterrupted run."""
  root = tmp_path_factory.mktemp("reference")
  workdir, cache = str(root / "run"), str(root / "cache")
  result = run_train_py(*_flags(corpus_dir, cache, workdir), timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, cache


def test_sigkill_at_random_steps_resumes_bitwise(corpus_dir, reference,
                                                 tmp_path):
  """Killed twice at random steps (mid-step or mid-save: SIGKILL gives no
  warning), restarted each time: every logged value and the final
  parameters equal the uninterrupted run's bit for bit."""
  ref_dir, cache = reference
  workdir, log = str(tmp_path / "run"), str(tmp_path / "log.txt")
  seed = random.randrange(10**6)
  rng = random.Random(seed)
  kills = []
  for low, high in ((5, 50), (60, 110)):
    target = rng.randint(low, high)
    proc = run_train_py(*_flags(corpus_dir, cache, workdir), wait=False,
                        log=log)
    deadline = time.time() + TIMEOUT
    while (proc.poll() is None and last_logged_step(workdir) < target and
           time.time() < deadline):
      time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.02))
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (seed, open(log).read()[-2000:])
    kills.append(last_logged_step(workdir))
  code, out = _finish(run_train_py(*_flags(corpus_dir, cache, workdir),
                                   wait=False, log=log), log)
  assert code == 0, (seed, out[-3000:])
  assert out.count("resuming from") >= 1, (seed, kills)
  records = metrics_records(workdir)
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps == list(range(1, STEPS + 1)), (seed, kills)
  assert _series(workdir) == _series(ref_dir), (seed, kills)
  # Replayed steps saw their first batches, and the batches of the run that
  # never stopped.
  assert audit.main([workdir, ref_dir]) == 0, (seed, kills)
  want, got = _params(ref_dir, STEPS), _params(workdir, STEPS)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} {seed}")


def test_sigterm_saves_the_current_step_and_exits_75(corpus_dir, reference,
                                                     tmp_path):
  ref_dir, cache = reference
  workdir, log = str(tmp_path / "run"), str(tmp_path / "log.txt")
  proc = run_train_py(*_flags(corpus_dir, cache, workdir), wait=False, log=log)
  deadline = time.time() + TIMEOUT
  while proc.poll() is None and last_logged_step(workdir) < 25 and (
      time.time() < deadline):
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  code, out = _finish(proc, log)
  assert code == 75, out[-3000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith("preempted: stopped by SIGTERM after step "), last
  stopped = int(last.split("after step ")[1].split(",")[0])
  assert 25 <= stopped < STEPS
  assert stopped in _steps(workdir)  # committed, not a temporary directory
  assert last_logged_step(workdir) <= stopped
  # The same command resumes there and finishes as if never stopped.
  code, out = _finish(run_train_py(*_flags(corpus_dir, cache, workdir),
                                   wait=False, log=log), log)
  assert code == 0, out[-3000:]
  assert f"at step {stopped}" in out
  assert _series(workdir) == _series(ref_dir)


def test_damaged_newest_checkpoint_falls_back(corpus_dir, reference,
                                              tmp_path):
  ref_dir, cache = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  newest = os.path.join(workdir, "checkpoints", str(STEPS))
  # One bit of every OCDBT data file changed: the checksums find it,
  # whatever the restore reads. (Cutting the process's files in half left
  # every array eval reads intact in ~7% of saves: where each value lands
  # in the files varies from save to save, and the small arrays live in
  # the tree nodes of state/d.)
  data_files = glob.glob(os.path.join(newest, "state", "**", "d", "*"),
                         recursive=True)
  assert len(data_files) > 1
  for path in data_files:
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      data[len(data) // 2] ^= 1
      f.seek(0)
      f.write(data)
  before = _steps(workdir)

  result = run_train_py(f"--workdir={workdir}", "--mode=eval",
                        timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"checkpoints/{STEPS} cannot be restored (DamagedCheckpoint: "
          "state/") in result.stderr
  assert f"step={STEPS - 10}" in result.stdout  # evaluated the previous one
  assert _steps(workdir) == before  # eval only reads: nothing moved
  assert not os.path.exists(newest + ".damaged")

  # Training resumes from the previous checkpoint and redoes the last steps
  # exactly; the damaged step is set aside (not deleted) and saved afresh.
  result = run_train_py(*_flags(corpus_dir, cache, workdir), timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"at step {STEPS - 10}" in result.stdout
  assert os.path.isdir(newest + ".damaged")
  assert _steps(workdir) == before
  assert _series(workdir) == _series(ref_dir)

  # With every checkpoint damaged: one line, exit 2, nothing moved.
  for step in _steps(workdir):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state"))
  listing = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  result = run_train_py(f"--workdir={workdir}", "--mode=eval",
                        timeout=TIMEOUT)
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: no checkpoint under") and (
      "can be restored" in last), last
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == listing


def test_restore_onto_another_mesh(corpus_dir, reference, tmp_path):
  """A 1-device run continues on 4 devices (data 2 x fsdp 2) and is
  evaluated on 4 (fsdp 4): the same numbers to float32 round-off."""
  ref_dir, cache = reference
  runs = {}
  for name, devices, mesh in (("one", 0, []),
                              ("four", 4, ["--config.mesh.data=2",
                                           "--config.mesh.fsdp=2"])):
    workdir = str(tmp_path / name)
    shutil.copytree(ref_dir, workdir)
    runs[name] = (workdir, run_train_py(
        *_flags(corpus_dir, cache, workdir, *mesh), "--config.train.steps=130",
        wait=False, devices=devices))
  for name, (workdir, proc) in runs.items():
    code, out = _finish(proc)
    assert code == 0, (name, out)
  assert _data_order(runs["one"][0]) == _data_order(runs["four"][0])
  one, four = (_series(runs[n][0]) for n in ("one", "four"))
  assert one.keys() == four.keys()
  assert max(k[0] for k in one) == 130
  for k in one:
    assert four[k] == pytest.approx(one[k], rel=1e-5), k

  evals = {}
  for name, devices, mesh in (("one", 0, []),
                              ("four", 4, ["--config.mesh.data=1",
                                           "--config.mesh.fsdp=4"])):
    result = run_train_py(f"--workdir={runs[name][0]}", "--mode=eval", *mesh,
                          devices=devices, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    evals[name] = float(result.stdout.split("eval_loss=")[1].split()[0])
  assert evals["four"] == pytest.approx(evals["one"], rel=1e-5)


def test_checkpoint_with_a_grain_iterator_resumes(corpus_dir, reference,
                                                   tmp_path):
  """A checkpoint as older versions wrote it, with each process's Grain
  iterator beside the state (item `data`) and no checksums, restores with
  no warning but that it is unverified, and the run goes on with the
  batches and losses of the run that never stopped."""
  import grain
  import orbax.checkpoint as ocp
  ref_dir, cache = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir,
                  ignore=shutil.ignore_patterns("checkpoints"))
  step = STEPS - 10
  with open(os.path.join(ref_dir, "checkpoints", str(step), "run",
                         "metadata")) as f:
    run_info = json.load(f)
  del run_info["checksums"]  # which those versions did not record
  iterator = iter(grain.MapDataset.range(8).to_iter_dataset())
  next(iterator)  # any position: it is never read
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler(),
                     "run": ocp.JsonCheckpointHandler()})
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(_state(ref_dir, step)),
      data=grain.checkpoint.CheckpointSave(iterator),
      run=ocp.args.JsonSave(run_info)))
  manager.wait_until_finished()
  manager.close()

  result = run_train_py(*_flags(corpus_dir, cache, workdir), timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"at step {step}" in result.stdout
  assert 'Item "data"' not in result.stderr
  assert f"checkpoints/{step} has no checksums" in result.stderr
  assert _series(workdir) == _series(ref_dir)
  assert audit.main([workdir, ref_dir]) == 0


def _launch(num_processes, devices_per_process, flags, log):
  """train.py in num_processes processes of launch/local.py, process 0's
  output to `log`."""
  with open(log, "a") as out:
    return subprocess.Popen(
        [sys.executable, "launch/local.py", f"--num_processes={num_processes}",
         f"--devices_per_process={devices_per_process}",
         f"--log_dir={os.path.dirname(log)}", "--", *flags],
        cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


def _sigterm_after(proc, workdir, step) -> int:
  """SIGTERM once `step` is logged; the step the run stopped and saved at."""
  deadline = time.time() + TIMEOUT
  while (proc.poll() is None and last_logged_step(workdir) < step and
         time.time() < deadline):
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  try:
    assert proc.wait(timeout=TIMEOUT) == 75  # preempted, saved
  finally:
    proc.kill()
  return max(_steps(workdir))


@PROCESSES
def test_resume_on_other_process_and_worker_counts(corpus_dir, tmp_path):
  """Stopped on 1 process x 1 device with 2 data workers, resumed and
  stopped on 2 processes x 2 devices, finished on 1 process x 4 devices: the
  losses of a run that never stopped, to float32 round-off, and the same
  batch at every step. The run with workers leaves no shared memory
  behind."""
  cache, steps = str(tmp_path / "cache"), 30
  flags = lambda workdir, *extra: _flags(
      corpus_dir, cache, workdir, "--config.train.batch_size=8",
      f"--config.train.steps={steps}", *extra)
  ref = str(tmp_path / "ref")
  result = run_train_py(*flags(ref), timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]

  workdir, log = str(tmp_path / "run"), str(tmp_path / "logs" / "run.log")
  os.makedirs(os.path.dirname(log))
  first = _sigterm_after(
      run_train_py(*flags(workdir, "--config.data.num_workers=2"), wait=False,
                   log=log), workdir, 3)
  with open(log) as f:
    assert "leaked shared_memory" not in f.read()
  second = _sigterm_after(_launch(2, 2, flags(workdir), log), workdir,
                          first + 3)
  assert first < second < steps
  last = run_train_py(*flags(workdir), devices=4, timeout=TIMEOUT)
  assert last.returncode == 0, last.stderr[-3000:]

  with open(log) as f:
    out = f.read() + last.stdout
  assert f"at step {first}" in out and f"at step {second}" in out
  for devices, processes in ((1, 1), (4, 2), (4, 1)):
    assert f"over {devices} cpu devices in {processes} process(es)" in out
  want, got = _series(ref), _series(workdir)
  assert want.keys() == got.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-5), key
  assert dict(_data_order(workdir)) == dict(_data_order(ref))
  assert audit.main([workdir, ref]) == 0


def test_divergence_stops_without_saving_the_bad_state(corpus_dir, tmp_path):
  workdir = str(tmp_path / "run")
  result = run_train_py(
      *_flags(corpus_dir, str(tmp_path / "cache"), workdir,
              "--config.train.learning_rate=1e30",
              "--config.checkpoint.every_steps=1"), timeout=TIMEOUT)
  assert result.returncode == 3, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: step ") and "nan" in last, last
  bad = int(last.split("step ")[1].split(":")[0])
  assert f"the last good checkpoint is {workdir}/checkpoints/{bad - 1}" in last
  assert max(_steps(workdir)) == bad - 1
  assert all(np.isfinite(r["loss"]) for r in metrics_records(workdir)
             if "loss" in r)


def test_export_params_then_sample_and_init_from(corpus_dir, reference,
                                                 tmp_path):
  """An export holds the params without the optimizer state; sampling from
  it writes the run's text, and fine-tuning starts from it with a fresh
  optimizer; a different model is refused with one line."""
  ref_dir, cache = reference
  export = str(tmp_path / "export")
  result = run_train_py(f"--workdir={ref_dir}", "--mode=export",
                        f"--export_dir={export}", timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"exported the parameters of step {STEPS} to {export}" in (
      result.stdout)
  assert list(_state(export, STEPS)) == ["params"]  # no optimizer state
  want, got = _params(ref_dir, STEPS), _params(export, STEPS)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  samples = [run_train_py(f"--workdir={w}", "--mode=sample",
                          "--config.sample.temperature=0", timeout=TIMEOUT)
             for w in (ref_dir, export)]
  assert samples[0].returncode == samples[1].returncode == 0
  assert samples[0].stdout == samples[1].stdout and len(samples[0].stdout) > 20

  workdir = str(tmp_path / "tuned")
  result = run_train_py(
      *_flags(corpus_dir, cache, workdir, f"--config.checkpoint.init_from={export}",
              "--config.train.steps=3", "--config.train.warmup_steps=1"),
      timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"starting from the parameters of {export}/checkpoints/{STEPS}" in (
      result.stdout)
  tuned, ref = metrics_records(workdir), metrics_records(ref_dir)
  assert tuned[0]["step"] == 1
  assert tuned[0]["loss"] < ref[0]["loss"] - 0.5  # not a fresh model

  # A longer context than the run's position table, or another width.
  procs = {change: run_train_py(
      *_flags(corpus_dir, cache, str(tmp_path / change.split("=")[0]),
              f"--config.checkpoint.init_from={ref_dir}",
              f"--config.model.{change}"), wait=False)
           for change in ("seq_len=32", "d_model=64")}
  messages = {"seq_len=32": "(params.wpe: (16, 32) saved, (32, 32) wanted)",
              "d_model=64": "(params.Embed_0.embedding: "}
  for change, proc in procs.items():
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: the checkpoint") and (
        "does not match" in last and messages[change] in last), last
    assert not os.path.exists(tmp_path / change.split("=")[0] / "config.json")


def test_token_ids_outside_the_vocabulary_stop_the_run(corpus_dir, tmp_path):
  """Damaged prepared data: one line and exit 2 before the workdir is
  touched, the data left as it was."""
  data = str(tmp_path / "data")
  prepared = subprocess.run(
      [sys.executable, "-m", "data.prepare", f"--input={corpus_dir}",
       f"--output={data}", "--tokenizer=char", "--holdout", "hamlet",
       "--seq-len=16", "--workers=1"], cwd=REPO, capture_output=True,
      text=True, timeout=TIMEOUT)
  assert prepared.returncode == 0, prepared.stderr
  shard = glob.glob(os.path.join(data, "shards", "*-train-*.bin"))[0]
  tokens = np.fromfile(shard, np.uint16)
  tokens[::50] = 60000
  tokens.tofile(shard)
  damaged = open(shard, "rb").read()
  workdir = str(tmp_path / "run")
  result = run_train_py(*_flags(corpus_dir, "", workdir),
                        f"--config.data.source={data}", timeout=TIMEOUT)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the train split holds token id 60000") and (
      "outside the model's vocabulary of 34" in last), last
  assert not os.path.exists(workdir)
  assert open(shard, "rb").read() == damaged


def test_a_run_from_before_vocabulary_padding(corpus_dir, tmp_path):
  """A run as written before model.vocab_multiple (its 34 characters
  unpadded, no such field in config.json): eval, sample and export read it
  as it was, a padded run starts from its params (init_from), and resuming
  it with the default padding is refused in one line that names the flag,
  which then resumes it."""
  cache, old = str(tmp_path / "cache"), str(tmp_path / "old")
  flags = lambda workdir, *extra: _flags(
      corpus_dir, cache, workdir, "--config.train.steps=40", *extra)
  result = run_train_py(*flags(old, "--config.model.vocab_multiple=1"),
                        timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "vocab 34: " in result.stdout  # no "(padded to ...)"
  with open(os.path.join(old, "config.json")) as f:
    config = json.load(f)
  del config["model"]["vocab_multiple"]
  with open(os.path.join(old, "config.json"), "w") as f:
    json.dump(config, f)
  before = file_snapshot(old)

  tuned = str(tmp_path / "tuned")
  procs = {
      "eval": run_train_py(f"--workdir={old}", "--mode=eval", wait=False),
      "sample": run_train_py(f"--workdir={old}", "--mode=sample",
                             "--config.sample.max_new_tokens=8", wait=False),
      "export": run_train_py(f"--workdir={old}", "--mode=export",
                             f"--export_dir={tmp_path / 'export'}",
                             wait=False),
      "resume": run_train_py(*flags(old, "--config.train.steps=50"),
                             wait=False),
      "init_from": run_train_py(
          *flags(tuned, f"--config.checkpoint.init_from={old}",
                 "--config.train.steps=3"), wait=False)}
  done = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=TIMEOUT)
    done[name] = (proc.returncode, out, err)
  for name in ("eval", "sample", "export", "init_from"):
    assert done[name][0] == 0, (name, done[name][2][-3000:])
  last_eval = [r for r in metrics_records(old) if "eval_loss" in r][-1]
  evaluated = float(done["eval"][1].split("eval_loss=")[1].split()[0])
  assert evaluated == pytest.approx(last_eval["eval_loss"], abs=1e-4)
  assert "vocab 34 (padded to 128)" in done["init_from"][1]
  assert f"starting from the parameters of {old}/checkpoints/40" in (
      done["init_from"][1])
  first = metrics_records(tuned)[0]["loss"]
  assert first < metrics_records(old)[0]["loss"] - 0.5  # not a fresh model

  code, _, stderr = done["resume"]
  assert code == 2 and stderr.strip().splitlines()[-1] == (
      f"error: {old} was trained with model.vocab_multiple=1 (34 vocabulary "
      "rows; 1 for runs from before the field), this config pads the "
      "vocabulary to 128; pass --config.model.vocab_multiple=1 to resume it")
  assert file_snapshot(old) == before  # eval, sample: read only
  result = run_train_py(*flags(old, "--config.train.steps=50",
                               "--config.model.vocab_multiple=1"),
                        timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "at step 40" in result.stdout
  assert [r["step"] for r in metrics_records(old) if "loss" in r] == list(
      range(1, 51))
