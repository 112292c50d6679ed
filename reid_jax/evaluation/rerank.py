"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), vectorised and memory-bounded.

Semantics of the published code (`re_ranking.py` of zhunzhong07/person-re-ranking
as used by torchreid and others), reproduced exactly:
  * inputs are plain distances; the all-pairs matrix over queries + gallery
    (N = Q + G items) is squared (in the input dtype, then float32) and every
    column divided by its maximum; row i of the result is item i's distances;
  * initial ranking: each row sorted ascending; ties by lower index (a stable
    sort; the reference's default quicksort leaves ties in arbitrary order);
  * R(i): the k1+1 nearest of i that also have i among their k1+1 nearest;
  * expansion: each c in R(i) adds R_half(c) (same rule with round(k1/2)+1,
    numpy rounding) when |R_half(c) & R(i)| > 2/3 |R_half(c)| (float test);
  * V[i, j] = exp(-d[i, j]) / sum over R*(i) for j in R*(i) (Gaussian kernel);
  * local query expansion: V[i] = mean of V over i's k2 nearest (skipped if k2 = 1);
  * Jaccard distance 1 - m / (2 - m), m = sum_l min(V[q, l], V[g, l]);
  * final = (1 - lambda) * Jaccard + lambda * d, for queries x gallery.

Memory: V is kept sparse (each row holds |R*| <= (k1+1)(round(k1/2)+2) items,
~k2 times that after query expansion) and the squared, normalised matrix is
never stored: it is rebuilt block by block of `block_rows` rows (float32
[block_rows, N]) for the nearest-neighbour search and gathered pair by pair for
the weights. Peak memory beyond the inputs and the [Q, G] float32 output is
O(block_rows * N + N * (k1 + 1) + nnz(V)); the Jaccard sum runs over query
chunks of bounded size. `re_ranking_from_embeddings` does not even need the
[Q, Q] and [G, G] inputs: the distances are computed on device block by block.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from reid_jax.evaluation._checks import EvaluationError, check_choice, check_positive_int
from reid_jax.evaluation.distance import (METRICS, block_distance, check_embeddings,
                                          paired_distance)

_JACCARD_CHUNK = 1 << 24  # expanded (query, gallery) min terms per chunk


def smallest_k_stable(rows: np.ndarray, k: int) -> np.ndarray:
  """Column indices [B, k] of each row's k smallest values, by (value, index)."""
  b, n = rows.shape
  if k >= n:
    return np.argsort(rows, axis=1, kind="stable")
  kth = np.partition(rows, k - 1, axis=1)[:, k - 1:k]
  sel = rows <= kth
  excess = np.flatnonzero(sel.sum(axis=1) > k)  # ties at the k-th value
  if excess.size:
    sub = rows[excess]
    less = sub < kth[excess]
    eq = sub == kth[excess]
    need = k - less.sum(axis=1, keepdims=True)
    sel[excess] = less | (eq & (np.cumsum(eq, axis=1) <= need))
  cols = (np.flatnonzero(sel) % n).reshape(b, k)  # ascending index within each row
  vals = np.take_along_axis(rows, cols, axis=1)
  return np.take_along_axis(cols, np.argsort(vals, axis=1, kind="stable"), axis=1)


def _reciprocal(nn: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
  """mask [N, k]: nn[i, a] has i among its own k nearest (k = nn.shape[1])."""
  n = nn.shape[0]
  out = np.empty(nn.shape, bool)
  for s in range(0, n, chunk):
    idx = np.arange(s, min(n, s + chunk))
    out[s:s + chunk] = (nn[nn[idx]] == idx[:, None, None]).any(axis=2)
  return out


def k_reciprocal_sets(rank: np.ndarray, k1: int, chunk: int = 1 << 13
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Expanded k-reciprocal sets R*(i) as CSR (indptr, sorted indices).

  `rank` [N, >= k1+1] holds each item's nearest items in order (itself first).
  """
  n = rank.shape[0]
  kk = min(k1 + 1, rank.shape[1])
  hh = min(int(np.around(k1 / 2.)) + 1, kk)
  fwd, fwd_h = rank[:, :kk], rank[:, :hh]
  rec, rec_h = _reciprocal(fwd), _reciprocal(fwd_h)
  half = np.where(rec_h, fwd_h, -1)  # R_half(c), -1 padded
  half_len = rec_h.sum(axis=1)
  lens = []
  indices = []
  for s in range(0, n, chunk):
    r = np.where(rec[s:s + chunk], fwd[s:s + chunk], -1)  # R(i), -1 padded [B, kk]
    cand_half = half[np.maximum(r, 0)]  # [B, kk, hh]
    inter = (cand_half[:, :, :, None] == r[:, None, None, :]) & (cand_half[:, :, :, None] >= 0)
    inter = inter.any(axis=3).sum(axis=2)  # [B, kk]
    clen = half_len[np.maximum(r, 0)]
    take = (r >= 0) & (inter > 2. / 3 * clen)
    expand = np.where(take[:, :, None], cand_half, -1).reshape(len(r), -1)
    allc = np.sort(np.concatenate([r, expand], axis=1), axis=1)
    keep = allc >= 0
    keep[:, 1:] &= allc[:, 1:] != allc[:, :-1]
    indices.append(allc[keep])
    lens.append(keep.sum(axis=1))
  indptr = np.r_[0, np.cumsum(np.concatenate(lens))].astype(np.int64)
  return indptr, np.concatenate(indices).astype(np.int64)


def encode(rank: np.ndarray, k1: int, k2: int,
           pair_dist: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> sp.csr_matrix:
  """The k-reciprocal feature V (sparse [N, N] float32), after query expansion.

  `pair_dist(i, j)` returns the normalised squared distances d[i, j] (float32).
  """
  n = rank.shape[0]
  indptr, indices = k_reciprocal_sets(rank, k1)
  rows = np.repeat(np.arange(n), np.diff(indptr))
  w = np.exp(-pair_dist(rows, indices).astype(np.float32))
  sums = np.add.reduceat(w, indptr[:-1]) if len(w) else np.zeros(n, np.float32)
  data = (w / np.repeat(sums, np.diff(indptr))).astype(np.float32)
  v = sp.csr_matrix((data, indices, indptr), shape=(n, n))
  if k2 != 1:
    k2 = min(k2, rank.shape[1])
    sel = sp.csr_matrix((np.ones(n * k2, np.float32), rank[:, :k2].reshape(-1),
                         np.arange(0, n * k2 + 1, k2)), shape=(n, n))
    v = sel @ v
    v.data /= np.float32(k2)
    v.sort_indices()
  v.data = v.data.astype(np.float32)
  v.eliminate_zeros()
  return v


def jaccard_rows(v: sp.csr_matrix, q0: int, q1: int, vg_csc: sp.csc_matrix) -> np.ndarray:
  """float32 [q1 - q0, G] Jaccard distances of queries q0..q1 to the gallery rows.

  Every (query, l, gallery) term min(V[q, l], V[g, l]) is listed and summed in
  float32 by scipy's COO -> dense, in ascending l per (q, g) as the reference does.
  """
  g = vg_csc.shape[0]
  vq = v[q0:q1].tocoo()
  r, l, a = vq.row, vq.col, vq.data
  cp, cr, cv = vg_csc.indptr, vg_csc.indices, vg_csc.data
  lens = cp[l + 1] - cp[l]
  total = int(lens.sum())
  if not total:
    return np.ones((q1 - q0, g), np.float32)
  pos = np.arange(total, dtype=np.int64)
  pos += np.repeat(cp[l] - (np.cumsum(lens) - lens), lens)
  contrib = np.repeat(a.astype(np.float32), lens)
  np.minimum(contrib, cv[pos], out=contrib)
  tm = sp.coo_matrix((contrib, (np.repeat(r.astype(np.int32), lens), cr[pos])),
                     shape=(q1 - q0, g)).toarray()
  return 1 - tm / (np.float32(2.) - tm)


def _final(v: sp.csr_matrix, num_q: int, lambda_value: float,
           orig_rows: Callable[[int, int], np.ndarray], out: np.ndarray) -> np.ndarray:
  """Fills out [Q, G] with (1 - lambda) * Jaccard + lambda * original."""
  vg = v[num_q:].tocsc()
  nnz_row = np.diff(v.indptr[:num_q + 1])
  col_len = np.diff(vg.indptr)
  # Expanded terms per query, to size the chunks.
  cost = np.add.reduceat(col_len[v.indices[:v.indptr[num_q]]], v.indptr[:num_q]) \
      if v.indptr[num_q] else np.zeros(num_q, np.int64)
  cost = np.where(nnz_row > 0, cost, 0) + out.shape[1]
  q0 = 0
  while q0 < num_q:
    q1 = q0 + max(1, int(np.searchsorted(np.cumsum(cost[q0:]), _JACCARD_CHUNK)))
    q1 = min(q1, num_q)
    jac = jaccard_rows(v, q0, q1, vg)
    out[q0:q1] = jac * np.float32(1 - lambda_value) + orig_rows(q0, q1) * np.float32(lambda_value)
    q0 = q1
  return out


def _check_k(k1: int, k2: int, lambda_value: float) -> tuple[int, int]:
  k1 = check_positive_int("k1", k1)
  k2 = check_positive_int("k2", k2)
  if not 0.0 <= float(lambda_value) <= 1.0:
    raise EvaluationError(f"lambda_value must be in [0, 1], got {lambda_value}")
  return k1, k2


def _check_dist(name: str, d: Any, shape: tuple[int, int]) -> np.ndarray:
  arr = np.asarray(d)
  if arr.shape != shape:
    raise EvaluationError(f"{name} has shape {arr.shape} but {shape} was expected "
                          "(q_g_dist is [Q, G], q_q_dist [Q, Q], g_g_dist [G, G])")
  if not np.issubdtype(arr.dtype, np.floating):
    arr = arr.astype(np.float64)
  return arr


def _sq(x: np.ndarray) -> np.ndarray:
  """Squared in the input dtype, then float32 (the reference's np.power(x, 2).astype)."""
  return np.square(x).astype(np.float32, copy=False)


def _put_sq_t(out: np.ndarray, col0: int, src: np.ndarray, a: int, b: int,
              tile: int = 256) -> None:
  """out[:, col0 + r] = src[r, a:b] ** 2 (float32), a tiled transpose of columns a..b."""
  m = src.shape[0]
  if src.dtype == np.float32:  # square once, in place, after the transpose
    for s in range(0, m, tile):
      out[:, col0 + s:col0 + min(s + tile, m)] = src[s:s + tile, a:b].T
    np.square(out[:, col0:col0 + m], out=out[:, col0:col0 + m])
    return
  for s in range(0, m, tile):
    out[:, col0 + s:col0 + min(s + tile, m)] = _sq(src[s:s + tile, a:b]).T


def re_ranking(q_g_dist: Any, q_q_dist: Any, g_g_dist: Any, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3, block_rows: int = 1024,
               num_threads: int = 1) -> np.ndarray:
  """k-reciprocal re-ranked query x gallery distances (float32 [Q, G]).

  Args:
    q_g_dist, q_q_dist, g_g_dist: plain (not squared) distances [Q, G], [Q, Q],
      [G, G], e.g. `pairwise_distance(..., metric="euclidean")`; squared inside,
      as the reference does.
    k1, k2, lambda_value: the paper's parameters (defaults 20, 6, 0.3).
    block_rows: rows of the normalised all-pairs matrix built at once.
    num_threads: threads for the neighbour search (default 1: on a shared
      2-core machine more threads measured slower; try 2-4 on idle big machines).

  Returns:
    float32 [Q, G] distances; rank them with `evaluate_rank`.
  """
  k1, k2 = _check_k(k1, k2, lambda_value)
  qg = np.asarray(q_g_dist)
  if qg.ndim != 2:
    raise EvaluationError(f"q_g_dist must be 2-D [Q, G], got shape {qg.shape}")
  nq, ng = qg.shape
  if nq == 0 or ng == 0:
    raise EvaluationError(f"empty {'query set' if nq == 0 else 'gallery'}: q_g_dist has shape"
                          f" {qg.shape}")
  qg = _check_dist("q_g_dist", qg, (nq, ng))
  qq = _check_dist("q_q_dist", q_q_dist, (nq, nq))
  gg = _check_dist("g_g_dist", g_g_dist, (ng, ng))
  n = nq + ng
  block_rows = check_positive_int("block_rows", block_rows)
  step = max(1, min(block_rows, (1 << 24) // n))

  colmax = np.empty(n, np.float32)  # column maxima of the squared all-pairs matrix

  def norm_rows(r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 of the normalised matrix: column i of the squared matrix / its max.

    Also fills colmax[r0:r1] (row i here is column i of [[qq, qg], [qg.T, gg]]).
    """
    rows = np.empty((r1 - r0, n), np.float32)
    if r0 < nq:
      a, b = r0, min(r1, nq)
      _put_sq_t(rows[:b - a], 0, qq, a, b)
      rows[:b - a, nq:] = _sq(qg[a:b])
    if r1 > nq:
      a, b = max(r0, nq) - nq, r1 - nq
      _put_sq_t(rows[r1 - r0 - (b - a):], 0, qg, a, b)
      _put_sq_t(rows[r1 - r0 - (b - a):], nq, gg, a, b)
    colmax[r0:r1] = rows.max(axis=1)  # NaN propagates: every input entry is in some row
    if np.isnan(colmax[r0:r1]).any():
      i = r0 + int(np.flatnonzero(np.isnan(colmax[r0:r1]))[0])
      srcs = ("q_q_dist", "q_g_dist") if i < nq else ("q_g_dist", "g_g_dist")
      name = srcs[0] if np.isnan(rows[i - r0, :nq]).any() else srcs[1]
      raise EvaluationError(f"{name} contains NaN (in the distances of item {i})")
    if not colmax[r0:r1].all():
      i = r0 + int(np.argmin(colmax[r0:r1]))
      raise EvaluationError(f"the distances of item {i} to all items are 0: cannot "
                            "normalise (are all embeddings identical?)")
    rows /= colmax[r0:r1, None]
    return rows

  kk = min(max(k1 + 1, k2), n)
  rank = np.empty((n, kk), np.int64)

  def knn(r0: int) -> None:
    r1 = min(n, r0 + step)
    rank[r0:r1] = smallest_k_stable(norm_rows(r0, r1), kk)

  starts = list(range(0, n, step))
  threads = min(num_threads or 1, len(starts))
  if threads > 1:
    with ThreadPoolExecutor(threads) as pool:
      list(pool.map(knn, starts))
  else:
    for r0 in starts:
      knn(r0)

  def pair_dist(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Normalised d[i, j] = sq(M[j, i]) / colmax[i], M the all-pairs matrix."""
    out = np.empty(len(i), np.float32)
    iq, jq = i < nq, j < nq
    for mi, mj, src, ri, ci in ((iq, jq, qq, j, i), (~iq, jq, qg, j, i - nq),
                                (iq, ~jq, qg, i, j - nq), (~iq, ~jq, gg, j - nq, i - nq)):
      sel = mi & mj
      out[sel] = _sq(src[ri[sel], ci[sel]])
    return out / colmax[i]

  v = encode(rank, k1, k2, pair_dist)
  del rank
  out = np.empty((nq, ng), np.float32)
  return _final(v, nq, lambda_value, lambda a, b: _sq(qg[a:b]) / colmax[a:b, None], out)


def _sq_metric(metric: str) -> str:
  """The kernel whose output is the square of `metric` (or `metric`, squared after)."""
  return "sqeuclidean" if metric == "euclidean" else metric


@functools.lru_cache(maxsize=None)
def _kernels(metric: str):
  """Jitted (rows x all -> squared distances and row max, pairs, rows x gallery)."""
  k = _sq_metric(metric)
  sq = (lambda d: d) if metric == "euclidean" else (lambda d: d * d)

  @jax.jit
  def rows(xb, x_all):
    d = sq(block_distance(xb, x_all, k))
    return d, jnp.max(d, axis=1)

  pairs = jax.jit(lambda a, b: sq(paired_distance(a, b[:, None, :], k))[:, 0])
  block = jax.jit(lambda a, b: sq(block_distance(a, b, k)))
  return rows, pairs, block


def re_ranking_from_embeddings(q_emb: Any, g_emb: Any, k1: int = 20, k2: int = 6,
                               lambda_value: float = 0.3, metric: str = "euclidean",
                               block_rows: int = 1024) -> np.ndarray:
  """`re_ranking` of the distances between embeddings, without [Q, Q] or [G, G] inputs.

  Equivalent to `re_ranking(pairwise_distance(q, g, metric), pairwise_distance(q,
  q, metric), pairwise_distance(g, g, metric))` up to float rounding: the
  squared distances are computed on device directly (for "euclidean", |x|^2 +
  |y|^2 - 2 x.y; other metrics are squared), rows of `block_rows` x N at a time;
  the column maximum of the symmetric matrix is taken as the row maximum.
  Memory: O(block_rows * N) per step + O(N * (k1 + 1)) neighbours + sparse V +
  the [Q, G] float32 output (N = Q + G).
  """
  k1, k2 = _check_k(k1, k2, lambda_value)
  check_choice("metric", metric, METRICS)
  q = check_embeddings("q_emb", q_emb)
  g = check_embeddings("g_emb", g_emb, q.shape[1])
  nq, ng = len(q), len(g)
  n = nq + ng
  x_all = np.concatenate([q, g])
  x_dev = jnp.asarray(x_all)
  step = max(1, min(check_positive_int("block_rows", block_rows), (1 << 24) // n))
  kk = min(max(k1 + 1, k2), n)
  rows_fn, pairs_fn, block_fn = _kernels(metric)
  rank = np.empty((n, kk), np.int64)
  colmax = np.empty(n, np.float32)
  pending = None
  for r0 in range(0, n, step):
    xb = np.zeros((step, x_all.shape[1]), np.float32)
    xb[:min(step, n - r0)] = x_all[r0:r0 + step]
    res = rows_fn(jnp.asarray(xb), x_dev)  # dispatched while the previous rows are sorted
    if pending is not None:
      _knn_store(pending, rank, colmax, kk, n)
    pending = (r0, res)
  _knn_store(pending, rank, colmax, kk, n)
  if not colmax.all():
    raise EvaluationError(f"the distances of item {int(np.argmin(colmax))} to all items are 0:"
                          " cannot normalise (are all embeddings identical?)")

  def pair_dist(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    out = np.empty(len(i), np.float32)
    chunk = 1 << 16
    for s in range(0, len(i), chunk):
      a, b = x_all[i[s:s + chunk]], x_all[j[s:s + chunk]]
      m = len(a)
      if m < chunk:
        a = np.concatenate([a, np.zeros((chunk - m, a.shape[1]), np.float32)])
        b = np.concatenate([b, np.zeros((chunk - m, b.shape[1]), np.float32)])
      out[s:s + m] = np.asarray(pairs_fn(jnp.asarray(a), jnp.asarray(b)))[:m]
    return out / colmax[i]

  v = encode(rank, k1, k2, pair_dist)
  del rank
  g_dev = jnp.asarray(g)

  def orig_rows(a: int, b: int, rows: int = 256) -> np.ndarray:
    out = np.empty((b - a, ng), np.float32)
    for s in range(a, b, rows):  # fixed-shape blocks: one compilation
      qb = np.zeros((rows, q.shape[1]), np.float32)
      qb[:min(rows, b - s)] = q[s:min(b, s + rows)]
      out[s - a:s - a + rows] = np.asarray(block_fn(jnp.asarray(qb), g_dev))[:min(rows, b - s)]
    return out / colmax[a:b, None]

  out = np.empty((nq, ng), np.float32)
  return _final(v, nq, lambda_value, orig_rows, out)


def _knn_store(pending, rank, colmax, kk, n) -> None:
  r0, (d, mx) = pending
  d = np.asarray(d)
  m = min(d.shape[0], n - r0)
  colmax[r0:r0 + m] = np.asarray(mx)[:m]
  rows = d[:m] / colmax[r0:r0 + m, None]
  rank[r0:r0 + m] = smallest_k_stable(rows, kk)
