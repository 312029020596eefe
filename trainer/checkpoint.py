"""Orbax checkpoints under <workdir>/checkpoints: the train state and the
Grain iterator together, saved asynchronously (training does not wait)."""

import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"))

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
    args = {"state": ocp.args.StandardRestore(target_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**args)).state

  def close(self) -> None:
    """Waits for the pending save to be committed."""
    self._manager.wait_until_finished()
    self._manager.close()
