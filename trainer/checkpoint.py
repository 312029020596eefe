"""Orbax checkpoints under <workdir>/checkpoints.

One checkpoint holds the whole truth of a step: the train state (params,
optimizer state, step; the dropout RNG is derived from seed and step) and
`run` (the config that produced it and counters such as tokens seen). The
data position is the step itself (data.loader orders batches by step), so a
checkpoint restores under any number of processes, devices or data workers;
older checkpoints also hold the Grain iterator of each process (`data`),
which is not read. Saves are asynchronous: training does not wait for the
disk. The newest `keep` are kept, plus the best by eval loss if asked, plus
those at `keep_steps` (where cooldown branches start).

Every file of a step has its SHA-256 in `<step>/checksums.sha256`
(`sha256sum -c` reads it), taken in Orbax's background thread once the
step's files are final and before it is committed, so that a committed step
always has them. A restore first checks every file, the optimizer state's
too when only the params are read: a changed byte that would restore
silently (a flipped bit decodes to other numbers; a file cut short is only
noticed if the restore reads its end) makes the checkpoint damaged. Steps
saved before checksums were recorded restore unverified, with a warning.

A damaged checkpoint (changed, truncated or missing files) is moved aside to
`<step>.damaged` and the previous one is used: nothing is deleted, and the
damaged step cannot shadow the next save of that step. In a run of several
processes, each judges every step it tries as it sees it, and the step is
taken only if all of them restored it: the verdicts are gathered, tagged
with the step, after the checks and again after the read, so that every
process restores the same step (or stops with the same line), and process 0
alone renames, once all have stopped reading.

Opened `read_only` (the modes that read a run), a Checkpointer writes,
deletes and renames nothing: not the unfinished save of a trainer running
beside it, nor a damaged step.
"""

import concurrent.futures
import glob
import hashlib
import json
import logging as std_logging
import os
import tempfile

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

import layout
from data import disk
from trainer.errors import ConfigError

CHECKSUMS = "checksums.sha256"
# Orbax rewrites this file (the commit time) after the checksums are taken;
# restoring does not need it.
_REWRITTEN_AT_COMMIT = "_CHECKPOINT_METADATA"
HASH_THREADS = min(8, os.cpu_count() or 1)
# Room left beside a checkpoint's estimated size: its metadata, and the
# metrics written while it is saved.
SPACE_MARGIN = 1 << 20


class _OrbaxToldHere(std_logging.Filter):
  """Drops what Orbax logs that is told here instead: its warning, each
  time a read-only manager opens a directory, that it is read only (the
  modes that read a run open it so on purpose), and the errors and
  tracebacks of a save that failed for want of space or permission, which
  the run reports in one line (Checkpointer.explain)."""

  def filter(self, record) -> bool:
    if not any(f"{os.sep}{name}{os.sep}" in record.pathname
               for name in ("orbax", "asyncio")):
      return True
    if str(record.msg).startswith("Given directory is read only"):
      return False
    error = record.exc_info[1] if record.exc_info else None
    return (disk.write_errno(error) is None and
            disk.write_errno(Exception(record.getMessage())) is None)


logging.get_absl_logger().addFilter(_OrbaxToldHere())
# Orbax's coroutines that failed so, reported by asyncio.
std_logging.getLogger("asyncio").addFilter(_OrbaxToldHere())


class DamagedCheckpoint(Exception):
  """A file of a checkpoint is missing or differs from its checksum."""


class Checkpointer:

  def __init__(self, workdir: str, keep: int, keep_best: bool = False,
               read_only: bool = False, keep_steps=()):
    self.directory = os.path.join(os.path.abspath(workdir), layout.CHECKPOINTS)
    self.read_only = read_only
    self._saving = None  # the step whose save is under way
    self._needed = None  # its estimated size in bytes
    self._failed = False  # a save failed and was told
    # Reads a step's state without Orbax's wait for every process (see
    # _restore_agreed).
    self._state_reader = ocp.PyTreeCheckpointHandler()
    keeps = [policies.LatestN(n=keep)]
    if keep_steps:
      keeps.append(policies.CustomSteps(steps=keep_steps))
    if keep_best:
      keeps.append(policies.BestN(
          get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            cleanup_tmp_directories=not read_only,
            async_options=ocp.AsyncOptions(
                post_finalization_callback=self._record_checksums),
            preservation_policy=policies.AnyPreservationPolicy(keeps)),
        # "data": the Grain iterator item of older checkpoints, never
        # restored; known, so that restoring them warns of nothing.
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "run": ocp.JsonCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, run_info: dict,
           eval_loss: float | None = None) -> None:
    if step in self._manager.all_steps():
      return
    self._save(step, state, run_info,
               None if eval_loss is None else {"eval_loss": eval_loss})

  def save_params(self, step: int, params, run_info: dict) -> None:
    """A checkpoint of the params alone (an export): all that eval, sample
    and init_from read."""
    self._save(step, {"params": params}, run_info)

  def _save(self, step: int, state, run_info: dict, metrics=None) -> None:
    # Orbax waits for the previous save anyway; done here, the step being
    # saved is known to _record_checksums. `run` says that checksums were
    # recorded, so that a checkpoint that lost them is not taken for an old
    # one.
    self._wait()
    self._check_room(step, state)
    self._saving = step
    try:
      self._manager.save(step, metrics=metrics, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          run=ocp.args.JsonSave({**run_info, "checksums": CHECKSUMS})))
    except Exception as e:  # noqa: BLE001 - re-raised unless a write failed
      raise self._save_failed(e) from None

  def _check_room(self, step: int, state) -> None:
    """Refuses a save that would not fit, or that could not be written,
    before Orbax starts it (Orbax fails noisily in its threads, or, when it
    cannot create the step's directory, leaves threads that keep the
    process from exiting). It needs the size of the newest saved step on
    disk, or of the state's arrays before the first, plus SPACE_MARGIN. The
    processes decide together: Orbax's save waits for all of them."""
    newest = [s for s in self.steps() if s != step][-1:]
    self._needed = SPACE_MARGIN + (
        _disk_usage(os.path.join(self.directory, str(newest[0])))
        if newest else sum(x.nbytes for x in jax.tree.leaves(state)))
    problem = None
    try:  # a file without a name: nothing is left behind
      with tempfile.TemporaryFile(dir=self.directory):
        pass
    except OSError as e:
      code = disk.write_errno(e)
      if code is None:
        raise
      problem = disk.failure(f"saving checkpoint {step}", self.directory,
                             code)
    free = disk.free_bytes(self.directory)
    if problem is None and free < self._needed:
      problem = (f"saving checkpoint {step} to {self.directory} failed: not "
                 f"enough space; it needs about {disk.size(self._needed)}, "
                 f"{disk.size(free)} free there")
    failed = problem is not None
    if jax.process_count() > 1:
      failed = bool(np.max(multihost_utils.process_allgather(
          np.int32(failed))))
    if failed:
      raise disk.WriteFailed(problem or f"saving checkpoint {step} failed: "
                             "another process of the run lacks room")

  def _wait(self) -> None:
    """Waits for the pending save. Its failure for want of space or
    permission is a WriteFailed, raised once."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - re-raised unless a write failed
      if self._failed:
        return
      raise self._save_failed(e) from None

  def _save_failed(self, error: Exception) -> Exception:
    """A save's failure as a WriteFailed when a write failed for want of
    space or permission, else as it is."""
    code = disk.write_errno(error)
    if code is None:
      return error
    self._failed = True
    return disk.WriteFailed(disk.failure(
        f"saving checkpoint {self._saving}", self.directory, code,
        self._needed))

  def explain(self, error: BaseException | None) -> None:
    """Raises, as one line, a write of the run that failed for want of space
    or permission (the checkpoint's or any other: metrics, samples), naming
    the newest step saved on disk, the one a resume starts from; does
    nothing for other errors."""
    code = disk.write_errno(error)
    if not isinstance(error, disk.WriteFailed):
      if code is None:
        return
      error = disk.WriteFailed(disk.failure(
          "a write", getattr(error, "filename", None) or self.directory,
          code))
    if self.read_only:
      raise error
    saved = ([int(d) for d in os.listdir(self.directory) if d.isdigit()]
             if os.path.isdir(self.directory) else [])
    last = (f"{self.directory}/{max(saved)}" if saved else
            "none (no checkpoint was saved yet)")
    raise disk.WriteFailed(
        f"{error}; what was saved before is unchanged, the last good "
        f"checkpoint is {last}; make room (or make it writable) and run the "
        "same command to resume") from None

  def _record_checksums(self) -> None:
    """Orbax's background thread, on process 0, once the files of the step
    being saved are final and before it is committed."""
    pending = glob.glob(os.path.join(
        glob.escape(self.directory), f"{self._saving}.orbax-checkpoint-tmp*"))
    if len(pending) > 1:
      raise RuntimeError(f"several uncommitted saves of step {self._saving} "
                         f"under {self.directory}: {pending}")
    # Without a temporary directory, Orbax commits in place (a marker file).
    path = pending[0] if pending else os.path.join(self.directory,
                                                   str(self._saving))
    names = sorted(
        os.path.relpath(os.path.join(d, f), path)
        for d, _, files in os.walk(path) for f in files)
    names = [n for n in names if n not in (_REWRITTEN_AT_COMMIT, CHECKSUMS)]
    with open(os.path.join(path, CHECKSUMS), "w") as f:
      f.writelines(f"{digest}  {name}\n" for name, digest in
                   zip(names, sha256s(path, names)))

  def _recorded_checksums(self, step: int) -> dict | None:
    """{file: sha256} of a step, or None for a step saved before checksums
    were recorded. Read straight from the files: Orbax's own restore waits
    for every process, which a process that fails here would never join."""
    path = os.path.join(self.directory, str(step))
    try:
      with open(os.path.join(path, CHECKSUMS)) as f:
        lines = f.read().splitlines()
    except FileNotFoundError:
      try:
        with open(os.path.join(path, "run", "metadata")) as f:
          run = json.load(f)
      except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{CHECKSUMS} and run/metadata are missing "
                                f"or unreadable ({reason(e)})") from None
      if run.get("checksums"):
        raise DamagedCheckpoint(f"{CHECKSUMS} is missing") from None
      return None
    recorded = {}
    for line in lines:  # sha256sum's format: digest, two spaces, name
      digest, separator, name = line.partition("  ")
      if len(digest) != 64 or not separator:
        raise DamagedCheckpoint(f"{CHECKSUMS} is unreadable")
      recorded[name] = digest
    if not recorded:
      raise DamagedCheckpoint(f"{CHECKSUMS} is empty")
    return recorded

  def verify(self, step: int) -> None:
    """Raises DamagedCheckpoint unless every file of `step`, as this process
    sees it, holds the bytes it was saved with. Each process checks every
    file: a copy damaged on one host's disk or cache alone is found by the
    process that would read it."""
    recorded = self._recorded_checksums(step)
    path = os.path.join(self.directory, str(step))
    if recorded is None:
      logging.warning("checkpoint %s has no checksums (saved before they "
                      "were recorded); restoring it unverified", path)
      return
    names = sorted(recorded)
    for name, digest in zip(names, sha256s(path, names)):
      if digest is None:
        raise DamagedCheckpoint(f"{name} is missing")
      if digest != recorded[name]:
        raise DamagedCheckpoint(f"{name} differs from its checksum, taken "
                                "when it was saved")

  def saved_shapes(self, step: int) -> dict:
    """{'params.Embed_0.embedding': shape, ...} of a checkpoint's state, read
    from its metadata (no array is loaded)."""
    return _shapes(self._manager.item_metadata(step)["state"])

  def _check_shapes(self, step: int, target_state, params_only: bool) -> None:
    saved = self.saved_shapes(step)
    wanted = _shapes(target_state)
    if params_only:
      saved, wanted = ({k: v for k, v in d.items() if k.startswith("params.")}
                       for d in (saved, wanted))
    if saved != wanted:
      diff = sorted(set(saved.items()) ^ set(wanted.items()))[0][0]
      raise ConfigError(
          f"the checkpoint {self.directory}/{step} does not match the model "
          f"and optimizer of this config ({diff}: {saved.get(diff, 'absent')} "
          f"saved, {wanted.get(diff, 'absent')} wanted); train it with the "
          "config it was saved with, or start a new run in another --workdir "
          "(with --config.checkpoint.init_from=<this workdir> to start from "
          "its parameters)")

  def restore(self, step: int, target_state, params_only: bool = False):
    """Restores onto `target_state`'s shapes and shardings (any mesh). With
    `params_only`, the rest of the returned state is None. A checkpoint that
    any process finds damaged raises DamagedCheckpoint on every process."""
    state, error = self._restore_agreed(step, target_state, params_only)
    if error is not None:
      raise error
    return state

  def _restore_agreed(self, step: int, target_state, params_only: bool):
    """(state, None), or (None, the error) on every process when any process
    cannot restore `step`. Each process checks the files, then reads the
    arrays, as it sees them; after each, the processes share their verdicts
    (_agree), so all go on together or none does."""
    error = None
    try:
      self.verify(step)
      self._check_shapes(step, target_state, params_only)
    except Exception as e:  # noqa: BLE001 - any damage, whatever raised it
      error = e
    verdicts = _agree(step, error)
    if not verdicts.any():
      target = {"params": target_state.params} if params_only else target_state
      try:
        state = self._state_reader.restore(
            epath.Path(self.directory) / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item=target, partial_restore=params_only,
                restore_args=ocp.checkpoint_utils.construct_restore_args(
                    target)))
      except Exception as e:  # noqa: BLE001 - as above
        error = e
      verdicts = _agree(step, error)
    if verdicts.any():
      return None, error or _seen_elsewhere(self.directory, step, verdicts)
    if params_only:
      return target_state.replace(params=state["params"], opt_state=None), None
    return state, None

  def restore_latest_valid(self, target_state, params_only: bool = False):
    """(step, state) of the newest checkpoint that every process restores,
    or (None, None) if there is none. The processes try the same steps, from
    the newest down, and take the first that none of them failed. Newer ones
    that failed are then set aside (so the failure was theirs, not the
    code's); if none restores, the newest one's failure is raised as a
    ConfigError."""
    failed = []
    for step in reversed(self._agreed_steps()):
      state, error = self._restore_agreed(step, target_state, params_only)
      if isinstance(error, ConfigError):
        raise error
      if error is not None:
        logging.warning("checkpoint %s/%d cannot be restored (%s); trying the "
                        "previous one", self.directory, step, reason(error))
        failed.append((step, error))
        continue
      self._set_aside([bad for bad, _ in failed])
      return step, state
    if failed:
      step, e = failed[0]
      raise ConfigError(
          f"no checkpoint under {self.directory} can be restored; the newest, "
          f"{step}, fails with {reason(e)} (--debug shows where); move the "
          "directory away to start afresh")
    return None, None

  def _agreed_steps(self) -> list[int]:
    """The steps that any process of the run sees: a step missing from one
    process's view is tried too, and fails there."""
    steps = self.steps()
    if jax.process_count() == 1:
      return steps
    count = int(np.max(multihost_utils.process_allgather(
        np.int32(len(steps)))))
    padded = np.full(count, -1, np.int32)
    padded[:len(steps)] = steps
    seen = multihost_utils.process_allgather(padded)
    return sorted(int(s) for s in np.unique(seen) if s >= 0)

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged checkpoints out of the way of the next save of their
    steps; nothing is deleted. Every process waits until all have finished
    reading, process 0 renames, and all wait for it before reading the
    directory again."""
    if self.read_only or not steps:
      return
    multihost_utils.sync_global_devices("checkpoints to set aside")
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        if not os.path.isdir(path):  # seen by another process only
          continue
        aside, n = f"{path}.damaged", 1
        while os.path.exists(aside):
          aside, n = f"{path}.damaged{n}", n + 1
        logging.warning("moved the damaged checkpoint %s to %s", path, aside)
        os.replace(path, aside)
    multihost_utils.sync_global_devices("checkpoints set aside")
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any of them was told to
    stop (multi-process runs, through JAX's preemption sync)."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for the pending save to be committed, and for the removal of
    unfinished saves' temporary directories that the manager starts in a
    thread of its own and does not wait for when closed: a process that
    exits at once (a refused resume) would otherwise have that thread fail
    at interpreter shutdown, a traceback after its one-line error. Safe to
    call twice, and after a save failed."""
    try:
      self._wait()
    finally:
      # Orbax's own wait for that thread (orbax-checkpoint 0.12.8; a save
      # waits for it, close does not).
      getattr(self._manager, "_maybe_await_cleanup_tmp_directory",
              lambda: None)()
      try:
        self._manager.close()
      except Exception:  # noqa: BLE001 - the failed save, told by _wait
        if not self._failed:
          raise


def _agree(step: int, error: Exception | None) -> np.ndarray:
  """Each process's verdict on `step` (0: restores; 1: damaged; 2: does not
  fit the model), by process. The gather carries the step each process
  judged: processes that judged different steps stop together with one
  line, rather than pair one step's verdict with another's."""
  verdict = (0 if error is None else
             2 if isinstance(error, ConfigError) else 1)
  if jax.process_count() == 1:
    return np.array([verdict])
  got = multihost_utils.process_allgather(np.array([step, verdict], np.int32))
  if (got[:, 0] != step).any():
    raise ConfigError(
        "the processes of this run disagree on which checkpoint to restore "
        f"(steps {got[:, 0].tolist()}, by process); their --workdir must be "
        "the same directory, seen alike by every host")
  return got[:, 1]


def _seen_elsewhere(directory: str, step: int, verdicts: np.ndarray):
  """The error of a process that restored `step` itself, when others did
  not."""
  which = ", ".join(map(str, np.flatnonzero(verdicts)))
  if (verdicts == 2).any():
    return ConfigError(
        f"the checkpoint {directory}/{step} does not match the model of "
        f"this config as process(es) {which} see it; train it with the "
        "config it was saved with")
  return DamagedCheckpoint(f"process(es) {which} found it damaged or "
                           "unreadable")


def reason(error: Exception) -> str:
  message = str(error).strip().splitlines()
  return f"{type(error).__name__}: {message[0][:300] if message else ''}"


def _disk_usage(path: str) -> int:
  """Bytes that the files under `path` take on disk."""
  return sum(os.stat(os.path.join(d, f)).st_blocks * 512
             for d, _, files in os.walk(path) for f in files)


def _sha256(path: str) -> str | None:
  """The hex digest of a file, None if there is no such file."""
  try:
    with open(path, "rb") as f:
      return hashlib.file_digest(f, "sha256").hexdigest()
  except FileNotFoundError:
    return None


def sha256s(root: str, names: list[str]) -> list[str | None]:
  """Digests of files under root, several at a time (hashlib releases the
  GIL)."""
  with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
    return list(pool.map(_sha256, (os.path.join(root, n) for n in names)))


def _shapes(tree) -> dict:
  """{'params.block_0...kernel': shape} for a state or its saved metadata."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {".".join(map(name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
