"""Input checks shared by the evaluators: one-line errors that say what is wrong."""

from __future__ import annotations

from typing import Any

import numpy as np


class EvaluationError(ValueError):
  """A one-line, user-facing evaluation input error (bad shape, NaN, empty, no match)."""


def as_labels(name: str, x: Any, n: int | None = None) -> np.ndarray:
  """Returns `x` as a 1-D int64 array, checking its length against `n`."""
  arr = np.asarray(x)
  if arr.ndim != 1:
    raise EvaluationError(f"{name} must be 1-D, got shape {arr.shape}")
  if arr.size and not (np.issubdtype(arr.dtype, np.integer) or
                       np.issubdtype(arr.dtype, np.bool_)):
    if not np.issubdtype(arr.dtype, np.floating) or np.any(arr != np.round(arr)):
      raise EvaluationError(f"{name} must hold integer ids, got dtype {arr.dtype}")
  if n is not None and arr.shape[0] != n:
    raise EvaluationError(f"{name} has {arr.shape[0]} entries but {n} were expected "
                          "(shape mismatch with the distance matrix or embeddings)")
  return arr.astype(np.int64)


def check_sizes(num_q: int, num_g: int) -> None:
  """Rejects an empty query or gallery set."""
  if num_q == 0:
    raise EvaluationError("empty query set: 0 queries given")
  if num_g == 0:
    raise EvaluationError("empty gallery: 0 gallery items given")


def check_distmat(distmat: Any) -> np.ndarray:
  """Returns `distmat` as a 2-D float array (no copy when possible)."""
  d = np.asarray(distmat)
  if d.ndim != 2:
    raise EvaluationError(f"distmat must be 2-D (num_query, num_gallery), got shape {d.shape}")
  if not np.issubdtype(d.dtype, np.floating):
    if not (np.issubdtype(d.dtype, np.integer) or np.issubdtype(d.dtype, np.bool_)):
      raise EvaluationError(f"distmat must be numeric, got dtype {d.dtype}")
    d = d.astype(np.float64)
  return d


def nan_error(name: str, block: np.ndarray, row_offset: int = 0) -> EvaluationError:
  """The error for NaNs in `block` (whose first row is `row_offset`)."""
  bad = np.argwhere(np.isnan(block))
  r, c = bad[0]
  return EvaluationError(f"{name} contains NaN ({len(bad)} in rows {row_offset}.."
                         f"{row_offset + block.shape[0] - 1}, first at row {row_offset + r},"
                         f" column {c})")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise EvaluationError(f"{name}={value!r} is not one of {choices}")


def check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise EvaluationError(f"{name} must be a positive integer, got {value!r}")
  return int(value)
