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

A checkpoint that cannot be restored (truncated or missing files) is moved
aside to `<step>.damaged` and the previous one is used: nothing is deleted,
and the damaged step cannot shadow the next save of that step.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from trainer.errors import ConfigError


class Checkpointer:

  def __init__(self, workdir: str, keep: int, keep_best: bool = False,
               read_only: bool = False, keep_steps=()):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.read_only = read_only
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
    self._manager.save(
        step, metrics=None if eval_loss is None else {"eval_loss": eval_loss},
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            run=ocp.args.JsonSave(run_info)))

  def save_params(self, step: int, params, run_info: dict) -> None:
    """A checkpoint of the params alone (an export): all that eval, sample
    and init_from read."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave({"params": params}),
        run=ocp.args.JsonSave(run_info)))

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
    `params_only`, the rest of the returned state is None."""
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
    """Waits for the pending save to be committed. Safe to call twice."""
    self._manager.wait_until_finished()
    self._manager.close()


def reason(error: Exception) -> str:
  message = str(error).strip().splitlines()
  return f"{type(error).__name__}: {message[0][:300] if message else ''}"


def _shapes(tree) -> dict:
  """{'params.block_0...kernel': shape} for a state or its saved metadata."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {".".join(map(name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
