"""Orbax checkpoints under <workdir>/checkpoints: the train state and the
Grain iterator together, saved asynchronously (training does not wait)."""

import os

import grain
import jax
import orbax.checkpoint as ocp

from trainer.errors import ConfigError


class Checkpointer:

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step: int, target_state, data_iterator=None):
    """Restores onto `target_state`'s shapes and shardings; the iterator, if
    given, is restored in place."""
    saved = _shapes(self._manager.item_metadata(step)["state"])
    wanted = _shapes(target_state)
    if saved != wanted:
      diff = sorted(set(saved.items()) ^ set(wanted.items()))[0][0]
      raise ConfigError(
          f"the checkpoint {self.directory}/{step} does not match the model "
          f"and optimizer of this config ({diff}: {saved.get(diff, 'absent')} "
          f"saved, {wanted.get(diff, 'absent')} wanted); use a new --workdir, "
          "or the config that run was trained with")
    args = {"state": ocp.args.StandardRestore(target_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**args)).state

  def close(self) -> None:
    """Waits for the pending save to be committed. Safe to call twice."""
    self._manager.wait_until_finished()
    self._manager.close()


def _shapes(tree) -> dict:
  """{'params.block_0...kernel': shape} for a state or its saved metadata."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {".".join(map(name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
