"""CMC, mAP and mINP under the Market-1501 protocol, exact and vectorised.

Protocol (per query; `evaluate_rank`, `evaluate_rank_streaming` and
`evaluate_cuhk03` share it):
  * positives: gallery items with the query's id and a different camera;
  * junk (removed from the ranked list, neither hit nor miss): items with the
    query's id and camera, and every item with id -1;
  * everything else is a negative, including the id-0 distractors of Market-1501
    (the id is compared like any other, as the official MATLAB code does);
  * a query with no positive is skipped and counted out of `num_valid_queries`;
  * camera id -1 (`UNKNOWN_CAMERA`: datasets without camera ids, e.g. a user's own
    `folder` dataset) differs from every camera, another -1 included: such a pair is
    never same-camera junk (`distinct_unknown_cameras`).

Ranking and ties: the gallery is ordered by ascending distance, ties broken by
ascending gallery index (a stable sort, `np.argsort(kind="stable")`). A
positive's 0-based rank is the number of valid (non-junk) gallery items strictly
closer, plus those equally close with a lower index. `-0.0` equals `0.0`.

From the ranks r_1 < ... < r_m (1-based, junk removed) of a query's m positives:
  * CMC@k = 1 if r_1 <= k;
  * AP ("standard", torchreid/fast-reid) = mean_i i / r_i;
  * AP ("official", Market-1501 `compute_AP.m`) = sum_i (1/m) * (p_old + i/r_i) / 2
    with p_old = (i-1)/(r_i-1), or 1 when r_i = 1 (the trapezoid rule);
  * INP (Ye et al.) = m / r_m.
The reported numbers are means over valid queries.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from reid_jax.evaluation._checks import (EvaluationError, as_labels, check_choice,
                                         check_distmat, check_positive_int, check_sizes,
                                         nan_error)

AP_MODES = ("standard", "official")
_CHUNK_ELEMS = 1 << 20  # distance entries per row chunk (4 MiB of float32: stays in cache)
_SORT_FRACTION = 0.03  # sort whole rows when more candidates than this fraction
#: camera_id of an item whose camera is not known; it matches no camera, itself included.
UNKNOWN_CAMERA = -1


def default_threads() -> int:
  """Threads for the blocked evaluation loops: the CPUs this process may use, at most 4."""
  try:
    n = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    n = os.cpu_count() or 1
  return max(1, min(4, n))


def _labels(distmat: np.ndarray, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any):
  nq, ng = distmat.shape
  out = (as_labels("q_pids", q_pids, nq), as_labels("g_pids", g_pids, ng),
         as_labels("q_camids", q_camids, nq), as_labels("g_camids", g_camids, ng))
  check_sizes(nq, ng)
  return out[:2] + distinct_unknown_cameras(out[2], out[3])


def distinct_unknown_cameras(q_camids: np.ndarray, g_camids: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
  """Cameras with every `UNKNOWN_CAMERA` replaced so that it equals no camera of the other set.

  Unknown query cameras become max + 1 and unknown gallery cameras max + 2 (max over
  all known cameras): a pair with an unknown side is then always "another camera",
  which is what the protocol assumes when cameras are not recorded. Inputs without
  unknown cameras are returned unchanged.
  """
  q_unknown, g_unknown = q_camids == UNKNOWN_CAMERA, g_camids == UNKNOWN_CAMERA
  if not (q_unknown.any() or g_unknown.any()):
    return q_camids, g_camids
  known = np.concatenate([q_camids[~q_unknown], g_camids[~g_unknown]])
  top = int(known.max()) if known.size else 0
  return np.where(q_unknown, top + 1, q_camids), np.where(g_unknown, top + 2, g_camids)


def positive_and_junk(q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray,
                      g_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Boolean [Q, G] masks (positive, junk) of the protocol above."""
  same = q_pids[:, None] == g_pids[None, :]
  same_cam = q_camids[:, None] == g_camids[None, :]
  distractor_junk = (g_pids == -1)[None, :]
  pos = same & ~same_cam & ~distractor_junk
  junk = (same & same_cam) | distractor_junk
  return pos, junk


def same_id_pairs(q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray,
                  g_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(query index, gallery index, is positive) of all same-id pairs with id != -1.

  Sorted by query, then gallery index; the pairs that are not positive are the
  same-camera junk. O(pairs) memory, no [Q, G] mask.
  """
  perm = np.argsort(g_pids, kind="stable")
  gps = g_pids[perm]
  lo = np.searchsorted(gps, q_pids, side="left")
  hi = np.searchsorted(gps, q_pids, side="right")
  cnt = np.where(q_pids == -1, 0, hi - lo)
  qrep = np.repeat(np.arange(len(q_pids)), cnt)
  offs = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
  gidx = perm[np.repeat(lo, cnt) + offs]
  return qrep, gidx, g_camids[gidx] != q_camids[qrep]


def _sorted_row_ranks(d, rows, cols, x, junk_rows, junk_cols, g_valid):
  """Ranks by sorting whole rows (used when most items are ahead of the hardest positive)."""
  work = d + d.dtype.type(0)  # a copy, with -0.0 turned into +0.0
  work[:, ~g_valid] = np.nan  # NaN sorts last: junk never counts as ranked ahead
  work[junk_rows, junk_cols] = np.nan
  junk_any = np.zeros(d.shape[0], bool)
  junk_any[junk_rows] = True
  work.sort(axis=1)
  left = np.empty(len(rows), np.int64)
  right = np.empty(len(rows), np.int64)
  bounds = np.searchsorted(rows, np.arange(d.shape[0] + 1))
  for r in np.flatnonzero(np.diff(bounds)):  # one C call per row with positives
    a, b = bounds[r], bounds[r + 1]
    left[a:b] = np.searchsorted(work[r], x[a:b], side="left")
    right[a:b] = np.searchsorted(work[r], x[a:b], side="right")
  rank = left
  for t in np.flatnonzero(right - left > 1):  # exact ties: lower gallery index first
    r, c = rows[t], cols[t]
    ok = g_valid.copy()
    ok[junk_cols[junk_rows == r]] = False
    rank[t] += np.count_nonzero((d[r, :c] == x[t]) & ok[:c])
  return rank


def _sortable_bits(x: np.ndarray) -> np.ndarray:
  """uint64 codes of float32 values (no NaN) whose order is the float order (-0 == 0)."""
  u = (x + np.float32(0)).view(np.uint32)  # + 0 turns -0.0 into +0.0
  if (u >> 31).any():  # negative values: flip them below the positive ones
    u = np.where(u >> 31, ~u, u | np.uint32(1 << 31))
  return u.astype(np.uint64)


def _chunk_ranks(d: np.ndarray, r0: int, pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
                 g_valid: np.ndarray, codes: tuple[np.ndarray, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(query index, 0-based rank among valid items) of every positive in a row chunk.

  Only valid items at most as far as the query's hardest positive can rank ahead
  of a positive; when they are few (the usual case) they are gathered and
  ordered by (distance, gallery index) directly, otherwise whole rows are sorted.
  `codes` = (q_code of the chunk's rows, g_code), equal for same id and camera:
  the gathered items' same-camera junk. Float32 distances are ordered by one
  sort of packed (row, distance, index) keys.
  """
  prow, pcol, is_pos = pairs
  rows, cols = prow[is_pos] - r0, pcol[is_pos]
  x = d[rows, cols] + d.dtype.type(0)
  if np.isnan(x).any():
    raise nan_error("distmat", d, r0)
  tmax = np.full(d.shape[0], -np.inf, d.dtype)
  np.maximum.at(tmax, rows, x)
  near = np.greater(d, tmax[:, None])
  np.logical_not(near, out=near)  # d <= tmax, or NaN: candidates, one pass over d
  flat = np.flatnonzero(near)
  del near
  if len(flat) > _SORT_FRACTION * d.size:
    if np.isnan(d.max()):
      raise nan_error("distmat", d, r0)
    return rows + r0, _sorted_row_ranks(d, rows, cols, x, prow[~is_pos] - r0,
                                        pcol[~is_pos], g_valid)
  vals = d.reshape(-1)[flat]
  if np.isnan(vals).any():
    raise nan_error("distmat", d, r0)
  ng = d.shape[1]
  cr, cc = np.divmod(flat, ng)
  q_code, g_code = codes
  keep = g_valid[cc]
  keep &= g_code[cc] != q_code[cr]  # same id and camera: junk
  row_bits = max(1, int(d.shape[0] - 1).bit_length())
  col_bits = max(1, int(ng - 1).bit_length())
  if d.dtype == np.float32 and row_bits + 32 + col_bits <= 64:
    shift = np.uint64(col_bits)
    key = ((cr.astype(np.uint64) << np.uint64(32)) | _sortable_bits(vals)) << shift
    key |= cc.astype(np.uint64)
    key = key[keep]
    key.sort()
    pkey = ((rows.astype(np.uint64) << np.uint64(32)) | _sortable_bits(x)) << shift
    pkey |= cols.astype(np.uint64)
    # Valid items ahead of a positive: the keys below its own, in its row.
    start = np.searchsorted(key, rows.astype(np.uint64) << np.uint64(32 + col_bits))
    return rows + r0, (np.searchsorted(key, pkey) - start).astype(np.int64)
  cr, cc, flat = cr[keep], cc[keep], flat[keep]
  order = np.lexsort((cc, vals[keep] + d.dtype.type(0), cr))
  key = flat[order]
  cr = cr[order]
  where = np.flatnonzero(np.isin(key, rows * ng + cols))  # positives, in (row, rank) order
  row_start = np.searchsorted(cr, cr[where], side="left")
  return cr[where] + r0, (where - row_start).astype(np.int64)


def _codes(q_pids, q_camids, g_pids, g_camids) -> tuple[np.ndarray, np.ndarray]:
  """int64 codes of (id, camera), equal iff both are (ids and cameras as given)."""
  cams = np.concatenate([q_camids, g_camids])
  lo = int(cams.min()) if cams.size else 0
  width = (int(cams.max()) - lo + 1) if cams.size else 1
  return q_pids * width + (q_camids - lo), g_pids * width + (g_camids - lo)


def positive_ranks(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                   q_camids: np.ndarray, g_camids: np.ndarray,
                   num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Ranks of all positives, sorted by (query, rank): (query index, 0-based rank).

  Rows are processed in chunks of about 1M entries on `num_threads` threads
  (default: the usable CPUs, at most 4; numpy releases the GIL in its array
  loops). The result does not depend on it.
  """
  nq, ng = distmat.shape
  num_threads = default_threads() if num_threads is None else max(1, int(num_threads))
  step = max(1, _CHUNK_ELEMS // max(ng, 1))
  starts = list(range(0, nq, step))
  num_threads = min(num_threads, len(starts))
  prow, pcol, is_pos = same_id_pairs(q_pids, q_camids, g_pids, g_camids)
  bounds = np.searchsorted(prow, np.r_[starts, nq])
  g_valid = g_pids != -1
  q_code, g_code = _codes(q_pids, q_camids, g_pids, g_camids)

  def job(i: int):
    r0 = starts[i]
    d = np.asarray(distmat[r0:r0 + step])
    if d.dtype == np.float16:
      d = d.astype(np.float32)  # exact
    elif not np.issubdtype(d.dtype, np.floating):
      d = d.astype(np.float64)
    sl = slice(bounds[i], bounds[i + 1])
    return _chunk_ranks(d, r0, (prow[sl], pcol[sl], is_pos[sl]), g_valid,
                        (q_code[r0:r0 + step], g_code))

  if num_threads > 1:
    with ThreadPoolExecutor(num_threads) as pool:
      parts = list(pool.map(job, range(len(starts))))
  else:
    parts = [job(i) for i in range(len(starts))]
  qidx = np.concatenate([p[0] for p in parts]).astype(np.int64)
  rank = np.concatenate([p[1] for p in parts]).astype(np.int64)
  order = np.lexsort((rank, qidx))
  return qidx[order], rank[order]


def metrics_from_ranks(qidx: np.ndarray, rank: np.ndarray, num_q: int, max_rank: int,
                       ap: str = "standard", per_query: bool = False) -> dict[str, Any]:
  """CMC/mAP/mINP from positive ranks sorted by (query, rank); see module docstring."""
  m = np.bincount(qidx, minlength=num_q)
  valid = m > 0
  num_valid = int(valid.sum())
  if num_valid == 0:
    raise EvaluationError(f"no query has a valid match in the gallery (all {num_q} queries "
                          "skipped): check that query and gallery ids overlap across cameras")
  start = np.cumsum(m) - m
  hits = np.arange(len(qidx)) - start[qidx] + 1.0  # i: 1-based hit number
  pos = rank + 1.0  # r_i: 1-based rank
  prec = hits / pos
  if ap == "standard":
    ap_sum = np.bincount(qidx, prec, minlength=num_q)
  else:
    old = np.where(rank == 0, 1.0, (hits - 1.0) / np.maximum(rank, 1))
    ap_sum = np.bincount(qidx, (old + prec) / 2.0, minlength=num_q)
  ap_q = np.full(num_q, np.nan)
  ap_q[valid] = ap_sum[valid] / m[valid]
  last = start + m - 1
  inp_q = np.full(num_q, np.nan)
  inp_q[valid] = m[valid] / pos[last[valid]]
  first = np.full(num_q, -1, np.int64)
  first[valid] = rank[start[valid]]
  hist = np.bincount(np.minimum(first[valid], max_rank), minlength=max_rank + 1)
  cmc = np.cumsum(hist[:max_rank]) / num_valid
  out = {"cmc": cmc.astype(np.float64), "mAP": float(np.nanmean(ap_q)),
         "mINP": float(np.nanmean(inp_q)), "num_valid_queries": num_valid}
  if per_query:
    out.update(AP=ap_q, INP=inp_q, first_hit=first)
  return out


def evaluate_rank(distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                  max_rank: int = 50, ap: str = "standard",
                  per_query: bool = False, num_threads: int | None = None) -> dict[str, Any]:
  """Market-1501 CMC, mAP and mINP of a query x gallery distance matrix.

  Args:
    distmat: [Q, G] distances (any float dtype; smaller = closer; no NaN).
    q_pids, g_pids, q_camids, g_camids: integer ids and cameras.
    max_rank: length of the returned CMC curve (ranks 1..max_rank).
    ap: "standard" (mean precision at each hit) or "official" (Market-1501
      MATLAB trapezoid rule).
    per_query: also return per-query "AP", "INP" (NaN when skipped) and
      "first_hit" (0-based rank of the first positive, -1 when skipped).
    num_threads: threads over row chunks (default: the usable CPUs, at most
      4); the result does not depend on it.

  Returns:
    {"cmc": float64 [max_rank], "mAP": float, "mINP": float,
     "num_valid_queries": int}, plus the per-query arrays if asked.

  Raises:
    EvaluationError (a ValueError): shape mismatch, NaN, empty set, bad option,
    or no query with a valid match.
  """
  check_choice("ap", ap, AP_MODES)
  max_rank = check_positive_int("max_rank", max_rank)
  d = check_distmat(distmat)
  qp, gp, qc, gc = _labels(d, q_pids, g_pids, q_camids, g_camids)
  qidx, rank = positive_ranks(d, qp, gp, qc, gc, num_threads)
  return metrics_from_ranks(qidx, rank, d.shape[0], max_rank, ap, per_query)


def evaluate_cuhk03(distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                    max_rank: int = 50, num_repeats: int = 10, seed: int = 0,
                    ap: str = "standard") -> dict[str, Any]:
  """CUHK03 classic single-shot evaluation.

  CMC: for each query and each of `num_repeats` draws, one gallery image per
  identity is drawn uniformly among that identity's non-junk items (junk as in
  the module docstring), the query's single drawn positive is ranked among the
  drawn items (same tie rule), and CMC is averaged over draws and valid queries
  (torchreid's `eval_cuhk03` sampling). The draws are reproducible: for draw r
  and queries in order, `rng.random((rows, G))` with
  `rng = np.random.default_rng(seed)` gives each item a priority and the
  smallest priority of each (query, identity) is the drawn item.
  mAP and mINP are computed over the whole gallery, exactly as `evaluate_rank`.

  Returns the same dict as `evaluate_rank`.
  """
  check_choice("ap", ap, AP_MODES)
  max_rank = check_positive_int("max_rank", max_rank)
  num_repeats = check_positive_int("num_repeats", num_repeats)
  d = check_distmat(distmat)
  qp, gp, qc, gc = _labels(d, q_pids, g_pids, q_camids, g_camids)
  full = evaluate_rank(d, qp, gp, qc, gc, max_rank=max_rank, ap=ap)
  nq, ng = d.shape
  perm = np.argsort(gp, kind="stable")
  bounds = np.flatnonzero(np.r_[True, gp[perm][1:] != gp[perm][:-1]])
  sizes = np.diff(np.r_[bounds, ng])
  rng = np.random.default_rng(seed)
  step = max(1, _CHUNK_ELEMS // ng)
  hist = np.zeros(max_rank + 1, np.int64)
  cols = np.arange(ng)
  for _ in range(num_repeats):
    for r0 in range(0, nq, step):
      u = rng.random((min(step, nq - r0), ng))
      dc = np.asarray(d[r0:r0 + step]) + 0.0
      pos, junk = positive_and_junk(qp[r0:r0 + step], qc[r0:r0 + step], gp, gc)
      u[junk] = np.inf
      up = u[:, perm]
      gmin = np.minimum.reduceat(up, bounds, axis=1)
      drawn = np.empty_like(junk)
      drawn[:, perm] = (up == np.repeat(gmin, sizes, axis=1)) & np.isfinite(up)
      hit = drawn & pos
      has = hit.any(axis=1)
      p = np.argmax(hit, axis=1)
      rows = np.flatnonzero(has)
      dp = dc[rows, p[rows]][:, None]
      sub = dc[rows]
      ahead = drawn[rows] & ((sub < dp) | ((sub == dp) & (cols[None, :] < p[rows][:, None])))
      hist += np.bincount(np.minimum(ahead.sum(axis=1), max_rank), minlength=max_rank + 1)
  cmc = np.cumsum(hist[:max_rank]) / (num_repeats * full["num_valid_queries"])
  full["cmc"] = cmc.astype(np.float64)
  return full
