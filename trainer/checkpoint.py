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
damaged step cannot shadow the next save of that step.
"""

import concurrent.futures
import glob
import hashlib
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from trainer.errors import ConfigError

CHECKSUMS = "checksums.sha256"
# Orbax rewrites this file (the commit time) after the checksums are taken;
# restoring does not need it.
_REWRITTEN_AT_COMMIT = "_CHECKPOINT_METADATA"
HASH_THREADS = min(8, os.cpu_count() or 1)


class DamagedCheckpoint(Exception):
  """A file of a checkpoint is missing or differs from its checksum."""


class Checkpointer:

  def __init__(self, workdir: str, keep: int, keep_best: bool = False,
               read_only: bool = False, keep_steps=()):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.read_only = read_only
    self._saving = None  # the step whose save is under way
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
    self._manager.wait_until_finished()
    self._saving = step
    self._manager.save(step, metrics=metrics, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        run=ocp.args.JsonSave({**run_info, "checksums": CHECKSUMS})))

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
    were recorded."""
    path = os.path.join(self.directory, str(step))
    try:
      with open(os.path.join(path, CHECKSUMS)) as f:
        lines = f.read().splitlines()
    except FileNotFoundError:
      run = self._manager.restore(step, args=ocp.args.Composite(
          run=ocp.args.JsonRestore())).run
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
    """Raises DamagedCheckpoint unless every file of `step` holds the bytes
    it was saved with. The processes of a run split the files between them
    and agree on the outcome."""
    recorded = self._recorded_checksums(step)
    path = os.path.join(self.directory, str(step))
    if recorded is None:
      logging.warning("checkpoint %s has no checksums (saved before they "
                      "were recorded); restoring it unverified", path)
      return
    names = sorted(recorded)
    mine = range(jax.process_index(), len(names), jax.process_count())
    digests = sha256s(path, [names[i] for i in mine])
    first_bad = next((i for i, digest in zip(mine, digests)
                      if digest != recorded[names[i]]), len(names))
    if jax.process_count() > 1:
      first_bad = int(np.min(multihost_utils.process_allgather(
          np.int32(first_bad))))
    if first_bad < len(names):
      name = names[first_bad]
      raise DamagedCheckpoint(
          f"{name} is missing" if not os.path.exists(os.path.join(path, name))
          else f"{name} differs from its checksum, taken when it was saved")

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
    `params_only`, the rest of the returned state is None. A damaged
    checkpoint raises DamagedCheckpoint, whatever is restored of it."""
    self.verify(step)
    self._check_shapes(step, target_state, params_only)
    target = {"params": target_state.params} if params_only else target_state
    restore = ocp.args.PyTreeRestore(
        item=target, partial_restore=params_only,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    state = self._manager.restore(
        step, args=ocp.args.Composite(state=restore)).state
    if params_only:
      return target_state.replace(params=state["params"], opt_state=None)
    return state

  def restore_latest_valid(self, target_state, params_only: bool = False):
    """(step, state) of the newest checkpoint that restores, or (None, None)
    if there is none. Newer ones that failed are set aside once an older one
    has restored (so the failure was theirs, not the code's); if none
    restores, the newest one's failure is raised as a ConfigError."""
    failed = []
    for step in reversed(self.steps()):
      try:
        state = self.restore(step, target_state, params_only)
      except ConfigError:
        raise
      except Exception as e:  # noqa: BLE001 - any damage, whatever raised it
        logging.warning("checkpoint %s/%d cannot be restored (%s); trying the "
                        "previous one", self.directory, step, reason(e))
        failed.append((step, e))
        continue
      for bad, _ in failed:
        self._set_aside(bad)
      return step, state
    if failed:
      step, e = failed[0]
      raise ConfigError(
          f"no checkpoint under {self.directory} can be restored; the newest, "
          f"{step}, fails with {reason(e)} (--debug shows where); move the "
          "directory away to start afresh")
    return None, None

  def _set_aside(self, step: int) -> None:
    """Renames a damaged checkpoint out of the way of the next save of its
    step; nothing is deleted."""
    if self.read_only:
      return
    path = os.path.join(self.directory, str(step))
    aside, n = f"{path}.damaged", 1
    while os.path.exists(aside):
      aside, n = f"{path}.damaged{n}", n + 1
    logging.warning("moved the damaged checkpoint %s to %s", path, aside)
    if jax.process_index() == 0:
      os.replace(path, aside)
    multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
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
    call twice."""
    self._manager.wait_until_finished()
    # Orbax's own wait for that thread (orbax-checkpoint 0.12.8; a save
    # waits for it, close does not).
    getattr(self._manager, "_maybe_await_cleanup_tmp_directory",
            lambda: None)()
    self._manager.close()


def reason(error: Exception) -> str:
  message = str(error).strip().splitlines()
  return f"{type(error).__name__}: {message[0][:300] if message else ''}"


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
