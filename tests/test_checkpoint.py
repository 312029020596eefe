"""Checkpoints: which steps are kept, and damage that is never silent.

One real 12-step run (in this process) whose evals get worse as its
learning rate grows, so the best eval is an old step; the damage tests
change copies of its checkpoints."""

import asyncio
import glob
import hashlib
import json
import logging
import os
import shutil

import orbax.checkpoint as ocp
import pytest

from conftest import file_snapshot, metrics_records, tiny_run_config
from configs import base
from trainer import checkpoint, loop, modes, saved_config
from trainer.errors import ConfigError

STEPS = 12


@pytest.fixture(scope="module")
def run_dir(corpus_dir, data_cache, tmp_path_factory):
  """Saves at 2, 4, 5 (a kept step), 6, ..., 12 and evals at every even
  step, under a learning rate rising to 1.0: the first eval is the best."""
  config = tiny_run_config(corpus_dir, data_cache, steps=STEPS)
  config.train.update(learning_rate=1.0, warmup_steps=STEPS,
                      schedule="constant")
  config.eval.update(every_steps=2, max_batches=2)
  config.checkpoint.update(every_steps=2, keep=2, keep_best=True,
                           keep_steps=(5,))
  workdir = str(tmp_path_factory.mktemp("checkpoint") / "run")
  loop.train(config, workdir)
  return workdir


def test_every_eval_scores_the_same_text(run_dir):
  """The periodic evals and the final one score the same fixed subset
  (eval.max_batches=2 batches), and each record says how much of the split
  that is."""
  evals = [r for r in metrics_records(run_dir) if "eval_loss" in r]
  assert [r["step"] for r in evals] == list(range(2, STEPS + 1, 2))
  assert {(r["eval_items"], r["eval_tokens"]) for r in evals} == {
      (evals[0]["eval_items"], evals[0]["eval_tokens"])}
  assert evals[0]["eval_items"] < evals[0]["eval_split_items"]


def _steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir,
                                                        "checkpoints"))
                if d.isdigit())


def _copy(run_dir, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(run_dir, workdir)
  return workdir


def _step_dir(workdir, step) -> str:
  return os.path.join(workdir, "checkpoints", str(step))


def _flip(path, offset=None) -> None:
  """Flips the lowest bit of one byte of a file (the middle one unless
  told): the damage a bad disk or copy does without changing sizes."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2 if offset is None else offset] ^= 1
    f.seek(0)
    f.write(data)


def _data_files(step_dir) -> list[str]:
  """The files OCDBT keeps array bytes and tree nodes in."""
  return sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                          recursive=True))


def _damage(step_dir, how: str) -> None:
  if how == "a byte of every data file":
    for path in _data_files(step_dir):
      _flip(path)
  elif how == "one byte of the largest file":
    _flip(max(_data_files(step_dir), key=os.path.getsize))
  else:  # every data file cut in half
    for path in _data_files(step_dir):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_close_waits_for_the_removal_of_unfinished_saves(tmp_path,
                                                         monkeypatch):
  """The manager removes an interrupted save's temporary directory in a
  thread of its own; close() waits for it (made slow here), so that a
  process exiting right after (a refused resume) leaves no thread to fail
  at interpreter shutdown with a traceback after its one-line error."""
  from orbax.checkpoint._src.path import temporary_paths
  cleanup = temporary_paths.cleanup_temporary_paths

  async def slow_cleanup(*args, **kwargs):
    await asyncio.sleep(1.0)
    return await cleanup(*args, **kwargs)

  monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths",
                      slow_cleanup)
  unfinished = tmp_path / "checkpoints" / "10.orbax-checkpoint-tmp-1"
  unfinished.mkdir(parents=True)
  checkpoint.Checkpointer(str(tmp_path), keep=2).close()
  assert not unfinished.exists()


def test_newest_best_and_kept_steps_remain(run_dir):
  """keep=2 leaves 10 and 12, keep_best the best eval (step 2, long
  before them), keep_steps step 5 (saved though not a multiple of
  checkpoint.every_steps); every other save is gone."""
  evals = {r["step"]: r["eval_loss"] for r in metrics_records(run_dir)
           if "eval_loss" in r}
  assert sorted(evals) == [2, 4, 6, 8, 10, 12]
  assert min(evals, key=evals.get) == 2  # the run this test needs
  assert _steps(run_dir) == [2, 5, 10, 12]
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
      "10", "12", "2", "5"]  # nothing else: no temporary or damaged ones


def test_every_file_of_a_step_has_its_checksum(run_dir):
  """checksums.sha256 (sha256sum's format) lists every file of the step
  but the one Orbax rewrites at the commit and the commit marker, with
  their digests."""
  for step in _steps(run_dir):
    path = _step_dir(run_dir, step)
    with open(os.path.join(path, checkpoint.CHECKSUMS)) as f:
      listed = dict(line.split("  ")[::-1] for line in f.read().splitlines())
    files = {os.path.relpath(os.path.join(d, f), path)
             for d, _, names in os.walk(path) for f in names}
    assert set(listed) == files - {checkpoint.CHECKSUMS,
                                   "_CHECKPOINT_METADATA",
                                   "commit_success.txt"}
    assert any("/d/" in name for name in listed)  # the array bytes
    for name, digest in listed.items():
      with open(os.path.join(path, name), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest, (step, name)


def test_one_changed_byte_in_any_file_is_found(run_dir, tmp_path):
  workdir = _copy(run_dir, tmp_path)
  path = _step_dir(workdir, STEPS)
  checker = checkpoint.Checkpointer(workdir, keep=2, read_only=True)
  checker.verify(STEPS)
  with open(os.path.join(path, checkpoint.CHECKSUMS)) as f:
    names = [line.split("  ")[1] for line in f.read().splitlines()]
  for name in names:
    _flip(os.path.join(path, name), offset=0)
    with pytest.raises(checkpoint.DamagedCheckpoint,
                       match=f"^{name} differs from its checksum"):
      checker.verify(STEPS)
    _flip(os.path.join(path, name), offset=0)
  os.remove(os.path.join(path, names[-1]))
  with pytest.raises(checkpoint.DamagedCheckpoint,
                     match=f"^{names[-1]} is missing"):
    checker.verify(STEPS)
  os.remove(os.path.join(path, checkpoint.CHECKSUMS))
  with pytest.raises(checkpoint.DamagedCheckpoint,
                     match="checksums.sha256 is missing"):
    checker.verify(STEPS)  # run/ says it had them: not an old checkpoint
  checker.close()


@pytest.mark.parametrize("how", ["a byte of every data file",
                                 "one byte of the largest file",
                                 "every data file cut in half"])
def test_damaged_newest_falls_back_and_is_left_alone(run_dir, tmp_path,
                                                     caplog, how):
  """Eval reads only the params, yet damage anywhere in the newest step
  makes it fall back to the previous step, with a warning; it only reads
  the run, so the damaged step stays where it is (a resume sets it
  aside)."""
  workdir = _copy(run_dir, tmp_path)
  _damage(_step_dir(workdir, STEPS), how)
  before = file_snapshot(workdir)
  with caplog.at_level(logging.WARNING):
    result = modes.evaluate(saved_config.load_saved(workdir), workdir)
  assert result["step"] == 10
  warned = [r.getMessage() for r in caplog.records]
  assert any(f"checkpoints/{STEPS} cannot be restored (DamagedCheckpoint: "
             f"state/" in m and "trying the previous one" in m
             for m in warned), warned
  assert file_snapshot(workdir) == before


def test_init_from_a_damaged_checkpoint_is_refused(run_dir, corpus_dir,
                                                   data_cache, tmp_path):
  """Not silently the previous one either: the user named this run."""
  source = _copy(run_dir, tmp_path)
  _damage(_step_dir(source, STEPS), "one byte of the largest file")
  before = file_snapshot(source)
  config = tiny_run_config(corpus_dir, data_cache, steps=3)
  config.checkpoint.init_from = source
  workdir = tmp_path / "tuned"
  with pytest.raises(ConfigError) as error:
    loop.train(config, str(workdir))
  message = str(error.value)
  assert message.startswith(f"the checkpoint {source}/checkpoints/{STEPS} "
                            "cannot be restored (DamagedCheckpoint: state/")
  assert message.endswith("move it aside to start from the run's previous "
                          "checkpoint") and "\n" not in message
  assert file_snapshot(source) == before  # another run's: nothing moved
  assert not (workdir / "config.json").exists()


def test_cooldown_from_a_damaged_step_is_refused(run_dir, tmp_path):
  parent = _copy(run_dir, tmp_path)
  _damage(_step_dir(parent, STEPS), "one byte of the largest file")
  before = file_snapshot(parent)
  cooldown = base.get_config().cooldown
  cooldown.update(from_step=STEPS, steps=2)
  config, workdir = saved_config.cooldown_branch(
      saved_config.load_saved(parent), cooldown, parent)
  with pytest.raises(ConfigError) as error:
    loop.train(config, workdir)
  message = str(error.value)
  assert message.startswith(f"the checkpoint {parent}/checkpoints/{STEPS} "
                            "cannot be restored (DamagedCheckpoint: state/")
  assert "\n" not in message
  assert {k: v for k, v in file_snapshot(parent).items()
          if not k.startswith(workdir)} == before
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_a_checkpoint_saved_without_checksums_restores(run_dir, tmp_path,
                                                       caplog):
  """Step 10 as versions before checksums wrote it (state and run, no
  checksums): restored, with a warning that says it is unverified."""
  workdir = str(tmp_path / "run")
  shutil.copytree(run_dir, workdir,
                  ignore=shutil.ignore_patterns("checkpoints"))
  step_dir = _step_dir(run_dir, 10)
  state = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
  with open(os.path.join(step_dir, "run", "metadata")) as f:
    run_info = json.load(f)
  del run_info["checksums"]
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "run": ocp.JsonCheckpointHandler()})
  manager.save(10, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state), run=ocp.args.JsonSave(run_info)))
  manager.wait_until_finished()
  manager.close()
  assert not os.path.exists(os.path.join(_step_dir(workdir, 10),
                                         checkpoint.CHECKSUMS))
  with caplog.at_level(logging.WARNING):
    result = modes.evaluate(saved_config.load_saved(workdir), workdir)
  assert result["step"] == 10
  assert any("checkpoints/10 has no checksums (saved before they were "
             "recorded); restoring it unverified" in r.getMessage()
             for r in caplog.records)
