"""Distances between embeddings, computed on device in blocks so memory stays bounded.

Metrics (all float32, smaller = more similar):
  * `"sqeuclidean"`: |x|^2 + |y|^2 - 2 x.y via one matmul, clamped at 0 (what
    torchreid's `compute_distance_matrix(metric="euclidean")` returns).
  * `"euclidean"`: the square root of the above: a plain distance, the input
    convention of `re_ranking` (which squares it, as the reference code does).
  * `"cosine"`: 1 - cos(x, y) on L2-normalised rows.
Matmuls run at `Precision.HIGHEST` so GPUs do not silently use TF32.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax.evaluation._checks import EvaluationError, check_choice, check_positive_int

METRICS = ("euclidean", "sqeuclidean", "cosine")
_EPS = 1e-12


def check_embeddings(name: str, x: Any, dim: int | None = None) -> np.ndarray:
  """Returns `x` as a finite 2-D float32 array with `dim` columns (one-line error else)."""
  arr = np.asarray(x)
  if arr.ndim != 2:
    raise EvaluationError(f"{name} must be 2-D (num_items, dim), got shape {arr.shape}")
  if arr.shape[0] == 0:
    raise EvaluationError(f"{name} is empty: 0 embeddings given")
  if dim is not None and arr.shape[1] != dim:
    raise EvaluationError(f"{name} has dimension {arr.shape[1]} but the other set has {dim}")
  arr = np.asarray(arr, np.float32)
  finite = np.isfinite(arr)
  if not finite.all():
    bad = np.argwhere(~finite)[0]
    raise EvaluationError(f"{name} contains NaN or inf ({int((~finite).sum())} values, first"
                          f" at row {bad[0]}, column {bad[1]})")
  return arr


def block_distance(x: jnp.ndarray, y: jnp.ndarray, metric: str) -> jnp.ndarray:
  """Distance matrix [len(x), len(y)] of two blocks (traceable; no checks)."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  if metric == "cosine":
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), _EPS)
    y = y / jnp.maximum(jnp.linalg.norm(y, axis=1, keepdims=True), _EPS)
    return 1.0 - jnp.dot(x, y.T, precision=jax.lax.Precision.HIGHEST)
  xy = jnp.dot(x, y.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * xy
  d = jnp.maximum(d, 0.0)
  return jnp.sqrt(d) if metric == "euclidean" else d


def paired_distance(x: jnp.ndarray, y: jnp.ndarray, metric: str) -> jnp.ndarray:
  """Distance of each row x[b] to each y[b, m] (batched; shape [B, M]) (traceable)."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  if metric == "cosine":
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)
    y = y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), _EPS)
    return 1.0 - jnp.einsum("bd,bmd->bm", x, y, precision=hp)
  xy = jnp.einsum("bd,bmd->bm", x, y, precision=hp)
  d = jnp.sum(x * x, axis=-1)[:, None] + jnp.sum(y * y, axis=-1) - 2.0 * xy
  d = jnp.maximum(d, 0.0)
  return jnp.sqrt(d) if metric == "euclidean" else d


@functools.partial(jax.jit, static_argnames=("metric",))
def _distance_block(x: jnp.ndarray, y: jnp.ndarray, metric: str) -> jnp.ndarray:
  return block_distance(x, y, metric)


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
  if a.shape[0] == n:
    return a
  return np.concatenate([a, np.zeros((n - a.shape[0],) + a.shape[1:], a.dtype)])


def pairwise_distance(x: Any, y: Any, metric: str = "euclidean",
                      block_size: int = 4096) -> np.ndarray:
  """All distances [len(x), len(y)] as a float32 numpy array.

  Computed on JAX's default device in blocks of `block_size` x `block_size`, so
  device memory is O(block_size * (block_size + dim)); only the result lives on
  the host. Blocks are padded to a fixed shape (one compilation per shape).

  Args:
    x: [N, D] embeddings (query side).
    y: [M, D] embeddings (gallery side).
    metric: "euclidean" (plain), "sqeuclidean" or "cosine"; see module docstring.
    block_size: rows/columns per device block.
  """
  check_choice("metric", metric, METRICS)
  block_size = check_positive_int("block_size", block_size)
  x = check_embeddings("x", x)
  y = check_embeddings("y", y, x.shape[1])
  nx, ny = x.shape[0], y.shape[0]
  bx, by = min(block_size, nx), min(block_size, ny)
  out = np.empty((nx, ny), np.float32)
  y_blocks = [jnp.asarray(_pad_rows(y[j:j + by], by)) for j in range(0, ny, by)]
  pending = None
  for i in range(0, nx, bx):
    xb = jnp.asarray(_pad_rows(x[i:i + bx], bx))
    for jb, j in enumerate(range(0, ny, by)):
      res = _distance_block(xb, y_blocks[jb], metric)  # async dispatch
      if pending is not None:
        _store(out, *pending)
      pending = (res, i, j)
  _store(out, *pending)
  return out


def _store(out: np.ndarray, res: jnp.ndarray, i: int, j: int) -> None:
  blk = np.asarray(res)
  ni = min(blk.shape[0], out.shape[0] - i)
  nj = min(blk.shape[1], out.shape[1] - j)
  out[i:i + ni, j:j + nj] = blk[:ni, :nj]
