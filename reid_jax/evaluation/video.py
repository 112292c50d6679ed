"""Pooling of embeddings into one per group: video tracklets and multi-query.

Video re-ID (MARS, DukeMTMC-VideoReID) ranks tracklets, not frames: frame
embeddings are pooled per tracklet first (mean, as DaRe does; max optional),
then `evaluate_rank` runs on the tracklet distances.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reid_jax.evaluation._checks import EvaluationError, as_labels, check_choice

POOL_METHODS = ("mean", "max")


def segment_pool(embeddings: Any, keys: list[np.ndarray], method: str = "mean"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pools rows of `embeddings` that share all `keys`.

  Returns (pooled [K, D] in the input float dtype, first row index of each
  group [K], group index of every row [N]); groups are ordered by first
  appearance, rows inside a group keep their order (mean accumulates in float64).
  """
  check_choice("method", method, POOL_METHODS)
  emb = np.asarray(embeddings)
  if emb.ndim != 2:
    raise EvaluationError(f"embeddings must be 2-D (num_items, dim), got shape {emb.shape}")
  if emb.shape[0] == 0:
    raise EvaluationError("embeddings are empty: nothing to pool")
  if np.isnan(emb).any():
    raise EvaluationError("embeddings contain NaN")
  stacked = np.stack(keys, axis=1)
  _, first, group = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
  group = group.reshape(-1)
  # Renumber groups by first appearance.
  order = np.argsort(first, kind="stable")
  renum = np.empty_like(order)
  renum[order] = np.arange(len(order))
  group = renum[group]
  first = first[order]
  rows = np.argsort(group, kind="stable")
  starts = np.searchsorted(group[rows], np.arange(len(first)))
  if method == "mean":
    sums = np.add.reduceat(emb[rows].astype(np.float64), starts, axis=0)
    pooled = sums / np.diff(np.r_[starts, len(rows)])[:, None]
  else:
    pooled = np.maximum.reduceat(emb[rows], starts, axis=0)
  dtype = emb.dtype if np.issubdtype(emb.dtype, np.floating) else np.float32
  return pooled.astype(dtype), first, group


def pool_by_tracklet(embeddings: Any, tracklet_ids: Any, pids: Any, camids: Any,
                     method: str = "mean"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Frame embeddings -> one embedding per tracklet.

  Args:
    embeddings: [N, D] frame embeddings.
    tracklet_ids, pids, camids: [N] ints; a tracklet's frames must share id and camera.
    method: "mean" (DaRe) or "max" (element-wise).

  Returns:
    (pooled [T, D], tracklet ids [T], pids [T], camids [T]), tracklets in order
    of first appearance.
  """
  n = np.asarray(embeddings).shape[0] if np.ndim(embeddings) == 2 else None
  tid = as_labels("tracklet_ids", tracklet_ids, n)
  pid = as_labels("pids", pids, len(tid))
  cam = as_labels("camids", camids, len(tid))
  pooled, first, group = segment_pool(embeddings, [tid], method)
  for name, lab in (("person id", pid), ("camera", cam)):
    bad = np.flatnonzero(lab != lab[first][group])
    if bad.size:
      t = tid[bad[0]]
      raise EvaluationError(f"tracklet {t} mixes {name}s {lab[first][group][bad[0]]} and "
                            f"{lab[bad[0]]} (frame {bad[0]})")
  return pooled, tid[first], pid[first], cam[first]


def pool_queries(embeddings: Any, pids: Any, camids: Any, method: str = "mean"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Market-1501 multi-query: pools the query images of one identity in one camera.

  Returns (pooled [K, D], pids [K], camids [K]) with one row per (id, camera),
  in order of first appearance; evaluate them like single queries.
  """
  n = np.asarray(embeddings).shape[0] if np.ndim(embeddings) == 2 else None
  pid = as_labels("pids", pids, n)
  cam = as_labels("camids", camids, len(pid))
  pooled, first, _ = segment_pool(embeddings, [pid, cam], method)
  return pooled, pid[first], cam[first]
