"""Orbax checkpoints holding the train state and the grain iterator position.

Saving both (plus the step, which seeds everything else) makes a re-run of the same
command continue bit-identically. Orbax writes to a temporary folder and renames it
when complete, so an interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def _several_processes() -> bool:
  return jax.process_count() > 1


def _drop_closed_loop_reports() -> None:
  """After a failed restore, drops the reports of its leftover reads.

  When one array of a damaged checkpoint fails to read, orbax closes its asyncio loop
  while tensorstore still completes the other reads; each then reports `RuntimeError:
  Event loop is closed` as an unraisable exception (a 6-line traceback each, printed
  around the command's one-line error). Those reports, and only those, are dropped.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_reports", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)
  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory` (the caller picks the steps).

  An older checkpoint is deleted only after a newer one was saved and read back intact,
  so a failed or damaged save never costs a good checkpoint. `create=False` (read-only
  use, e.g. evaluation) never creates the directory.
  """

  def __init__(self, directory: str, keep: int = 3, create: bool = True):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=create),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any | None) -> bool:
    """Saves, waits for the write, reads it back, then rotates the oldest out.

    Returns False (one line on stderr; the older checkpoints all kept) when the new
    checkpoint cannot be read back; it is then moved aside, like a damaged one. With
    several processes it is left in place instead: a peer that died during the read
    makes an intact checkpoint look damaged, and moving it would lose it; a resume
    checks it again (`restore_newest_readable`).
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()
    if not self.readable(step):
      if _several_processes():
        print(f"checkpoint {step} in {self.directory} could not be read back after saving "
              "(damaged, or another process failed during the read); left in place for "
              "a resume to check; the older checkpoints are kept", file=sys.stderr,
              flush=True)
        return False
      moved = self._move_aside(step)
      print(f"checkpoint {step} in {self.directory} could not be read back after saving; "
            f"moved to {moved}; the older checkpoints are kept", file=sys.stderr,
            flush=True)
      return False
    for old in self.all_steps()[:-self.keep]:
      self.manager.delete(old)
    return True

  def restore(self, step: int, state_template: Any, data_iter: Any | None = None) -> Any:
    """Restores the state (shaped like `state_template`) and, if given, the iterator."""
    items = {"state": ocp.args.StandardRestore(state_template)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception:
      _drop_closed_loop_reports()
      raise
    return restored["state"]

  def readable(self, step: int) -> bool:
    """True if checkpoint `step`'s state can be read without a template (its metadata and
    every array are intact); a damaged folder (truncated file, broken _METADATA) is not."""
    try:
      self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      return True
    except Exception:  # pylint: disable=broad-except  (tensorstore / JSON / OS errors)
      _drop_closed_loop_reports()
      return False

  def restore_newest_readable(self, state_template: Any, data_iter: Any | None = None
                              ) -> tuple[Any, int | None]:
    """(state, step) of the newest checkpoint that can be restored, walking back past
    damaged ones; each is moved aside (never deleted) to `<directory>.unreadable/` with
    one line saying so. (template, None) when there is none. A checkpoint that is intact
    but does not fit the template (another config) is an error, not skipped."""
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, state_template, data_iter), step
      except Exception as e:  # pylint: disable=broad-except
        if self.readable(step):
          raise ValueError(f"checkpoint {step} in {self.directory} does not match this "
                           f"config ({type(e).__name__}); use the config it was trained "
                           "with or a new --workdir") from None
        moved = self._move_aside(step)
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        print(f"checkpoint {step} in {self.directory} is unreadable ({type(e).__name__}: "
              f"{reason}); moved to {moved}; trying the previous one", file=sys.stderr,
              flush=True)
    return state_template, None

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step folder out of the manager's view (process 0 only)."""
    dst = os.path.join(self.directory + ".unreadable", f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dst)
    self.manager.reload()
    return dst

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
