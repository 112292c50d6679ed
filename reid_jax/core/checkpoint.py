"""Orbax checkpoints holding the train state and the grain iterator position.

Saving both (plus the step, which seeds everything else) makes a re-run of the same
command continue bit-identically. Orbax writes to a temporary folder and renames it
when complete, so an interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory` (the caller picks the steps).

  `create=False` (read-only use, e.g. evaluation) never creates the directory.
  """

  def __init__(self, directory: str, keep: int = 3, create: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any | None) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, state_template: Any, data_iter: Any | None = None) -> Any:
    """Restores the state (shaped like `state_template`) and, if given, the iterator."""
    items = {"state": ocp.args.StandardRestore(state_template)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
