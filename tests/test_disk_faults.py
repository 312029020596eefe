"""Faults of the disk: no space left (a small tmpfs, or a patched writer), a
read-only workdir, a directory the process cannot write, and reading a run
(eval, sample, export) while its trainer saves. Each ends with one line and
its exit status, and nothing saved before is changed or lost.

The tmpfs and read-only cases mount file systems in a private mount
namespace (`unshare -m`, as root); they are skipped where that is not
allowed."""

import errno
import functools
import os
import re
import shlex
import shutil
import subprocess
import threading

import pytest

from conftest import REPO, TINY_FLAGS, file_snapshot, tiny_run_config
from data import disk, prepare, store, work
from data.corpus import DataError
from trainer import checkpoint, loop, metrics, modes
from trainer import run as run_lib, saved_config

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
TIMEOUT = 300


@functools.cache
def _can_mount() -> bool:
  if os.geteuid() != 0 or not shutil.which("unshare"):
    return False
  probe = subprocess.run(
      ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
      capture_output=True)
  return probe.returncode == 0


needs_mount = pytest.mark.skipif(
    not _can_mount(), reason="needs root and unshare -m to mount file systems")


def _in_namespace(script: str, tmp_path) -> str:
  """Runs a bash script in a private mount namespace, in the repository
  root; its output. Its lines `python train.py ...` report `rc=N`."""
  result = subprocess.run(["unshare", "-m", "bash", "-c", script], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=TIMEOUT)
  (tmp_path / "namespace.log").write_text(result.stdout)
  assert result.returncode == 0, result.stdout[-3000:]
  return result.stdout


def _flags(corpus_dir, cache, workdir, steps):
  return shlex.join([*TINY_FLAGS,
                   f"--config.data.source={corpus_dir}",
                   f"--config.data.cache_dir={cache}", f"--workdir={workdir}",
                   f"--config.train.steps={steps}",
                   "--config.checkpoint.every_steps=10",
                   "--config.eval.every_steps=10",
                   "--config.eval.max_batches=2"])


def _runs(log: str, noisy=()) -> list[tuple[int, list[str]]]:
  """(exit status, error lines) of each `python train.py` of a script whose
  commands are separated by `rc=N` lines; none but those `noisy` prints a
  traceback."""
  runs = []
  for i, (part, rc) in enumerate(re.findall(r"(.*?)^rc=(\d+)$", log,
                                            re.S | re.M)):
    assert i in noisy or "Traceback" not in part, part[-3000:]
    runs.append((int(rc), [line for line in part.splitlines()
                           if line.startswith("error")]))
  return runs


@needs_mount
def test_a_full_disk_stops_with_one_line_and_resumes(corpus_dir, tmp_path):
  """A 1.6 MB tmpfs holds the step-10 checkpoint, not the step-20 one: the
  save is refused before Orbax writes (exit 74, the space needed and free,
  the last good checkpoint); with that check off and the disk filled up to
  160 KB, Orbax's own failure ends with the same kind of line; with more
  room the same command resumes and finishes. Checkpoint 10 keeps the
  bytes it was saved with throughout."""
  mnt, cache = tmp_path / "mnt", tmp_path / "cache"
  mnt.mkdir()
  workdir = mnt / "run"
  flags = _flags(corpus_dir, cache, workdir, 30)
  # Orbax's failure at the last step: no metrics are written after it.
  flags_20 = _flags(corpus_dir, cache, workdir, 20)
  unchecked = ("python -c 'import runpy, sys; from trainer import checkpoint; "
               "checkpoint.SPACE_MARGIN = -2**40; sys.argv[0] = \"train.py\"; "
               "runpy.run_path(\"train.py\", run_name=\"__main__\")'")
  verify = ("python -c 'import sys; from trainer import checkpoint; "
            "checkpoint.Checkpointer(sys.argv[1], keep=3, read_only=True)"
            ".verify(10); print(\"verified\")'")
  log = _in_namespace(f"""
    mount -t tmpfs -o size=1600k tmpfs {mnt}
    python train.py {flags}; echo rc=$?
    {verify} {workdir}
    dd if=/dev/zero of={mnt}/filler bs=4k 2> /dev/null
    truncate -s -160k {mnt}/filler
    {unchecked} {flags_20}; echo rc=$?
    {verify} {workdir}
    rm {mnt}/filler
    mount -o remount,size=8m {mnt}
    python train.py {flags}; echo rc=$?
    ls {workdir}/checkpoints
    """, tmp_path)
  # Orbax's own failure may still print tracebacks from tensorstore's
  # callbacks (not through logging) before the line.
  (refused, refused_errors), (failed, failed_errors), (resumed, _) = _runs(
      log, noisy=(1,))
  checkpoints = f"{workdir}/checkpoints"
  last_good = (f"; what was saved before is unchanged, the last good "
               f"checkpoint is {checkpoints}/10; make room (or make it "
               "writable) and run the same command to resume")
  assert refused == failed == disk.WriteFailed.exit_code == 74
  assert len(refused_errors) == 1
  assert re.fullmatch(
      f"error: saving checkpoint 20 to {checkpoints} failed: not enough "
      r"space; it needs about [\d.]+ MB, [\d.]+ (KB|MB) free there" +
      re.escape(last_good), refused_errors[0]), refused_errors
  assert len(failed_errors) == 1
  assert re.fullmatch(
      "error: saving checkpoint 20 failed: No space left on device "
      rf"\({checkpoints}\); it needs about .*, [\d.]+ (bytes|KB) free there" +
      re.escape(last_good), failed_errors[0]), failed_errors
  assert log.count("verified") == 2
  assert resumed == 0
  assert f"resuming from {checkpoints} at step 10" in log
  assert log.split()[-3:] == ["10", "20", "30"]


@needs_mount
def test_read_only_workdir_is_read_and_refused_for_training(
    corpus_dir, tmp_path):
  """On a read-only mount of a run, eval and next work (they write
  nothing) and training stops with its one line (status 2); with only its
  checkpoints/ read-only, training stops at the first save with status 74
  naming the last good checkpoint. Nothing is changed."""
  cache, workdir = tmp_path / "cache", tmp_path / "run"
  flags = functools.partial(_flags, corpus_dir, cache, workdir)
  log = _in_namespace(f"""
    python train.py {flags(10)}; echo rc=$?
    mount --bind {workdir} {workdir} && mount -o remount,ro,bind {workdir}
    python train.py --mode=eval --workdir={workdir} --json; echo rc=$?
    python train.py --mode=next --workdir={workdir} \
        --config.sample.prompt=the; echo rc=$?
    python train.py {flags(20)}; echo rc=$?
    umount {workdir}
    find {workdir} -type f | sort | xargs sha256sum > {tmp_path}/before
    mount --bind {workdir}/checkpoints {workdir}/checkpoints
    mount -o remount,ro,bind {workdir}/checkpoints
    timeout 200 python train.py {flags(30)}; echo rc=$?
    """, tmp_path)
  runs = _runs(log)
  assert [rc for rc, _ in runs] == [0, 0, 0, 2, 74]
  assert '"step": 10' in log and "probability" in log
  assert runs[3][1] == [f"error: --workdir={workdir} is not writable "
                        f"({workdir}: Read-only file system); choose another "
                        "path"]
  assert len(runs[4][1]) == 1
  assert runs[4][1][0].startswith(
      f"error: saving checkpoint 20 failed: Read-only file system "
      f"({workdir}/checkpoints); what was saved before is unchanged, the last "
      f"good checkpoint is {workdir}/checkpoints/10"), runs[4][1]
  for line in (tmp_path / "before").read_text().splitlines():
    digest, name = line.split("  ", 1)
    if "/checkpoints/" in name:
      with open(name, "rb") as f:
        assert checkpoint.hashlib.sha256(f.read()).hexdigest() == digest


# ------------------------------------------------- in this process

@pytest.fixture(scope="module")
def run_dir(corpus_dir, data_cache, tmp_path_factory):
  """8 steps, saved at 4 and 8."""
  config = tiny_run_config(corpus_dir, data_cache, steps=8)
  config.checkpoint.every_steps = 4
  config.eval.update(every_steps=4, max_batches=1)
  workdir = str(tmp_path_factory.mktemp("disk") / "run")
  loop.train(config, workdir)
  return workdir


class _FullFile:
  """A metrics file on a full disk."""
  closed = False

  def write(self, _):
    raise ENOSPC

  def close(self):
    self.closed = True


def test_a_metrics_write_on_a_full_disk_names_the_last_checkpoint(
    run_dir, tmp_path, monkeypatch):
  """Resumed to step 12, the metrics write of step 10 finds the disk full:
  one WriteFailed naming the file, the bytes it needed and the last good
  checkpoint (8); the saved steps keep their bytes."""
  workdir = str(tmp_path / "run")
  shutil.copytree(run_dir, workdir)
  write = metrics.MetricsWriter.write

  def full_at_10(self, step, record):
    if step == 10:
      self._file = _FullFile()
    write(self, step, record)

  monkeypatch.setattr(metrics.MetricsWriter, "write", full_at_10)
  config = saved_config.load_saved(workdir)
  config.train.steps = 12
  with pytest.raises(disk.WriteFailed) as failed:
    loop.train(config, workdir)
  assert re.fullmatch(
      f"writing the metrics failed: No space left on device \\({workdir}/"
      r"metrics.jsonl\); it needs about \d+ bytes, [\d.]+ [KMG]B free there; "
      "what was saved before is unchanged, the last good checkpoint is "
      f"{workdir}/checkpoints/8; make room \\(or make it writable\\) and run "
      "the same command to resume", str(failed.value)), str(failed.value)
  saved = checkpoint.Checkpointer(workdir, keep=3, read_only=True)
  assert saved.steps() == [4, 8]
  for step in (4, 8):
    saved.verify(step)
  saved.close()


def test_reading_a_run_while_it_saves_touches_nothing(run_dir, tmp_path,
                                                      monkeypatch):
  """A save of step 9 held open before its commit (its files under Orbax's
  temporary name): eval, sample and export of the run meanwhile read step
  8, and change, delete or rename nothing of the workdir; the save then
  commits whole."""
  workdir = str(tmp_path / "run")
  shutil.copytree(run_dir, workdir)
  config = saved_config.load_saved(workdir)
  config.sample.max_new_tokens = 3
  release, held = threading.Event(), threading.Event()
  record = checkpoint.Checkpointer._record_checksums

  def held_open(self):
    held.set()
    assert release.wait(TIMEOUT)
    record(self)

  run = run_lib.build(config, workdir, splits=())
  # Only the trainer's saves are held (its callback is bound when built).
  monkeypatch.setattr(checkpoint.Checkpointer, "_record_checksums", held_open)
  trainer = checkpoint.Checkpointer(workdir, keep=3)
  monkeypatch.undo()
  try:
    with run.context():
      _, state = run.restore_latest(trainer)
      trainer.save(9, state, run_lib.run_info(config, 9))
      assert held.wait(TIMEOUT)
      before = file_snapshot(workdir)
      assert any(".orbax-checkpoint-tmp" in path for path in before)
      assert modes.evaluate(config, workdir)["step"] == 8
      modes.sample(config, workdir)
      assert modes.export(config, workdir, str(tmp_path / "export")) == 8
      assert file_snapshot(workdir) == before
  finally:
    release.set()
    trainer.close()
  assert trainer.steps() == [4, 8, 9]
  trainer.verify(9)


def _prepare_args(corpus_dir, output):
  return ["--input", corpus_dir, "--output", str(output), "--tokenizer",
          "char", "--seq-len", "16", "--workers", "0", "--holdout", "hamlet"]


def test_prepare_out_of_space_is_never_taken_for_complete(
    corpus_dir, tmp_path, monkeypatch, capsys):
  """data.prepare meeting a full disk: exit 74 with one line. Out of space
  in the first shard, the new output is removed; at meta.json, the finished
  shards stay, without meta.json (refused by training), and the same
  command finishes them into what a preparation with room gives."""
  output = tmp_path / "prepared"
  finish = prepare.shards.Writer._finish_shard

  def full(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path + ".tmp")

  monkeypatch.setattr(prepare.shards.Writer, "_finish_shard", full)
  assert prepare.main(_prepare_args(corpus_dir, output)) == 74
  line, = capsys.readouterr().err.splitlines()
  assert re.fullmatch(
      f"error: preparing {output} failed: No space left on device "
      f"\\({output}/shards/.*\\.bin\\.tmp\\); it needs about [\\d.]+ KB, "
      r"[\d.]+ [KMG]B free there; nothing was kept; run the same command "
      "once there is room", line), line
  assert not output.exists()

  monkeypatch.setattr(prepare.shards.Writer, "_finish_shard", finish)
  write_json = disk.write_json

  def full_at_meta(path, value, **kwargs):
    if path.endswith(store.META):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + ".tmp")
    write_json(path, value, **kwargs)

  monkeypatch.setattr(disk, "write_json", full_at_meta)
  assert prepare.main(_prepare_args(corpus_dir, output)) == 74
  line, = capsys.readouterr().err.splitlines()
  assert line.endswith(f"; the finished part is kept (without "
                       f"{store.META}, so nothing takes it for complete) "
                       "and the same command continues it once there is room")
  with pytest.raises(DataError, match="no finished preparation"):
    prepare.load(str(output))

  monkeypatch.setattr(disk, "write_json", write_json)
  calls = []
  monkeypatch.setattr(work.Worker, "__call__",
                      lambda self, task: calls.append(task))
  assert prepare.main(_prepare_args(corpus_dir, output)) == 0
  assert calls == []  # the finished task was not redone
  monkeypatch.undo()
  fresh = tmp_path / "fresh"
  assert prepare.main(_prepare_args(corpus_dir, fresh)) == 0
  got, want = prepare.load(str(output)).meta, prepare.load(str(fresh)).meta
  assert got["splits"] == want["splits"]
