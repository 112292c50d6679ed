"""Expected errors end a command with one line on stderr, not a traceback.

The project's own errors (data, config, checkpoint, evaluation, divergence) are
`ValueError`/`FileNotFoundError` subclasses with a one-line message that names the
file or setting and the fix. `one_line_errors(main)` prints such a message as
`error: ...` and exits 1; `--verbosity` (any value) or `REID_JAX_TRACEBACK=1` shows the
traceback instead. Anything else (a multi-line message, another exception type) is
unexpected and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from absl import flags

from reid_jax.core.loop import TrainingDiverged
from reid_jax.core.writer import end_progress_bars

EXPECTED = (ValueError, FileNotFoundError, TrainingDiverged)


def _want_traceback() -> bool:
  if os.environ.get("REID_JAX_TRACEBACK") == "1":
    return True
  try:
    return flags.FLAGS["verbosity"].present
  except KeyError:
    return False


def one_line_errors(main: Callable) -> Callable:
  """Wraps an absl `main(argv)`."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except EXPECTED as e:
      message = str(e).strip()
      if _want_traceback() or not message or "\n" in message:
        raise
      end_progress_bars()
      print(f"error: {message}", file=sys.stderr, flush=True)
      sys.exit(1)
  return wrapped
