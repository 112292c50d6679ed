"""Offline hard-triplet mining (Re-ID done right; Gordo et al.'s deep image retrieval
scheme): embed a random pool of training images with the current model, and keep, for
each anchor, its `top` hardest (positive, negative) pairs by triplet loss.

The loss of (a, p, n) grows with d(a, p)^2 - d(a, n)^2, so the `top` largest values of
that sum lie among the `top` farthest positives x the `top` nearest negatives: the search
is exact without enumerating every pair.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class HardTable:
  """Each anchor's hardest pairs, as record indices of the training split.

  anchors: [A] records; pairs: [A, top, 2] (positive, negative) records, hardest first;
  counts: [A] valid pairs per anchor (the rest of its row is -1).
  """
  anchors: np.ndarray
  pairs: np.ndarray
  counts: np.ndarray

  def draw(self, rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniform anchor, then one of its hardest pairs uniformly."""
    i = int(rng.integers(len(self.anchors)))
    j = int(rng.integers(self.counts[i]))
    p, n = self.pairs[i, j]
    return int(self.anchors[i]), int(p), int(n)


def _nearest(values: np.ndarray, k: int) -> np.ndarray:
  """Column indices of the k smallest values of each row, in increasing order."""
  k = min(k, values.shape[1])
  part = np.argpartition(values, k - 1, axis=1)[:, :k] if k < values.shape[1] else (
      np.broadcast_to(np.arange(values.shape[1]), values.shape))
  sub = np.take_along_axis(values, part, 1)
  return np.take_along_axis(part, np.argsort(sub, axis=1, kind="stable"), 1)


def mine(embeddings: np.ndarray, person_ids: np.ndarray, records: np.ndarray, top: int,
         chunk: int = 1024) -> HardTable:
  """The `top` hardest (positive, negative) pairs of every pool image with a positive.

  `embeddings` [N, D] of the pool images, `person_ids` [N] their identities, `records`
  [N] their record indices in the training split (what the table stores). Rows are
  processed `chunk` anchors at a time (memory ~ chunk x N).
  """
  pids = np.asarray(person_ids)
  recs = np.asarray(records)
  e = np.asarray(embeddings, np.float64)
  sq = np.sum(e * e, 1)
  anchors, pairs, counts = [], [], []
  for lo in range(0, len(pids), chunk):
    rows = np.arange(lo, min(lo + chunk, len(pids)))
    dist = np.maximum(sq[rows, None] + sq[None, :] - 2.0 * e[rows] @ e.T, 0.0)
    same = pids[rows, None] == pids[None, :]
    same[np.arange(len(rows)), rows] = False
    other = pids[rows, None] != pids[None, :]
    keep = same.any(1) & other.any(1)
    if not keep.any():
      continue
    rows, dist, same, other = rows[keep], dist[keep], same[keep], other[keep]
    pos_idx = _nearest(np.where(same, -dist, np.inf), top)    # farthest positives
    neg_idx = _nearest(np.where(other, dist, np.inf), top)    # nearest negatives
    dp = np.where(np.take_along_axis(same, pos_idx, 1),
                  np.take_along_axis(dist, pos_idx, 1), -np.inf)
    dn = np.where(np.take_along_axis(other, neg_idx, 1),
                  np.take_along_axis(dist, neg_idx, 1), np.inf)
    flat = (dp[:, :, None] - dn[:, None, :]).reshape(len(rows), -1)
    order = _nearest(-flat, top)
    valid = np.isfinite(np.take_along_axis(flat, order, 1))
    pi, ni = np.divmod(order, neg_idx.shape[1])
    pair = np.stack([np.take_along_axis(pos_idx, pi, 1),
                     np.take_along_axis(neg_idx, ni, 1)], -1)
    pairs.append(np.where(valid[..., None], recs[pair], -1).astype(np.int64))
    anchors.append(recs[rows].astype(np.int64))
    counts.append(valid.sum(1).astype(np.int64))
  if not anchors:
    raise ValueError("hard-triplet mining found no pool image with both a positive and a "
                     "negative; raise config.mining.pool")
  return HardTable(anchors=np.concatenate(anchors), pairs=np.concatenate(pairs),
                   counts=np.concatenate(counts))
