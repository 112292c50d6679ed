"""Training logs: a progress line on stdout, a JSON-lines file and TensorBoard events."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Mapping

from absl import flags, logging


def quiet_library_logs() -> None:
  """Shows library INFO logs (orbax, tfds: several lines per checkpoint) only when asked.

  CLIs print their own progress; `--verbosity=0` (or `-v 0`) brings the INFO logs back.
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


class MetricWriter:
  """Writes scalars to stdout, `workdir/metrics.jsonl` and TensorBoard (tensorboardX).

  Only process 0 writes; other processes' writers are silent.
  """

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total = total_steps
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      print("tensorboardX is not installed: TensorBoard events are not written "
            "(pip install tensorboardX)", file=sys.stderr)
    self._t0 = None
    self._s0 = None

  def start(self, step: int) -> None:
    self._t0, self._s0 = time.time(), step
    self._last = (self._t0, step)
    self._sec_per_step = None  # moving average, leaving out the first (compiling) window

  def progress(self, step: int, images_per_s: float, scalars: Mapping[str, float]) -> None:
    """One progress-bar line: step, loss, images/s and ETA."""
    if not self.enabled:
      return
    now = time.time()
    done = step - self._s0
    elapsed = now - self._t0
    t_prev, s_prev = self._last
    if s_prev != self._s0 and step > s_prev:  # not the window that includes compilation
      rate = (now - t_prev) / (step - s_prev)
      self._sec_per_step = rate if self._sec_per_step is None else (
          0.7 * self._sec_per_step + 0.3 * rate)
    self._last = (now, step)
    sec_per_step = self._sec_per_step or elapsed / max(done, 1)
    eta = sec_per_step * (self.total - step)
    width = 20
    filled = int(width * step / max(self.total, 1))
    bar = "#" * filled + "." * (width - filled)
    loss = scalars.get("loss", float("nan"))
    print(f"[{bar}] step {step}/{self.total} loss {loss:.4f} "
          f"{images_per_s:,.0f} img/s elapsed {_fmt_time(elapsed)} ETA {_fmt_time(eta)}",
          flush=True)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{f"{prefix}{k}": float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{prefix}{k}", float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def end_progress_bars() -> None:
  """Closes live tqdm bars and ends their line, so what follows starts a line of its own.

  tfds's bars redraw with `\r` and no newline; an error raised while one is live would
  otherwise be printed on the bar's line. Nothing is written when no bar is live.
  """
  tqdm = sys.modules.get("tqdm")
  bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ())
  for bar in bars:
    with contextlib.suppress(Exception):  # A bar of a dead stream must not hide the error.
      bar.close()
  if bars:
    sys.stderr.write("\n")
