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
  * Jaccard distance 1 - m / (2 - m), m = sum_l min(V[q, l], V[g, l]), summed in
    float32 in ascending l as the reference does;
  * final = (1 - lambda) * Jaccard + lambda * d, for queries x gallery.

How (`re_ranking`, the distance-matrix path):
  * nearest neighbours without sorting or transposing (`_knn_distances`): item
    j's row of the normalised matrix is column j of M = [[qq, qg], [qg.T, gg]],
    so the inputs are read in contiguous row tiles, twice. Scan 1 keeps, per
    column, its maximum and the minima of disjoint row groups; the kk-th
    smallest |group minimum| T bounds the kk-th smallest |entry| (kk distinct
    groups hold an entry with |x| <= T). Scan 2 collects the entries
    x <= T' = T (1 + 2^-20), a few more than kk per column, whose normalised
    values are sorted by (value, index) in one sort of packed keys. Squaring
    and dividing are monotone in |x| and f(T') > f(T) is checked per column,
    so this equals the stable full sort, ties included. A column where that
    cannot be certified (NaN, inf, all zeros, ties at 0, fewer groups than kk,
    more than _CAND_CAP candidates) is done the old way (its normalised rows
    built and partially sorted), which also raises the old errors;
  * k-reciprocal sets by sparse products: R and R_half are symmetric relations
    (top-k and its transpose, elementwise), |R_half(c) & R(i)| = (A H)[i, c],
    and R*(i) is the pattern of row i of A + T H (T: the accepted c);
  * V sparse (|R*(i)| <= (k1+1)(round(k1/2)+2) entries per row), query
    expansion as a sparse product with the k2-nearest selection matrix
    (summed in rank order in float32, as np.mean);
  * Jaccard: for a block of queries the gallery columns of V are gathered per
    query entry (a scipy row gather) and clipped by min(); the terms of
    _DENSE_ROWS queries at a time are summed into a small dense buffer with
    np.add.at (float32, in ascending l per pair: the reference's order), and
    1 - m / (2 - m) and the final combination are computed densely, in cache.
  The scans, the sparse products and the Jaccard blocks run on `num_threads`
  threads over row blocks (numpy and scipy release the GIL in these loops);
  the result does not depend on the number of threads.

Memory: the inputs + the [Q, G] float32 output + O(N * (k1 + 1)) neighbours
+ nnz(V) + O(num_threads * N * 16) per scan thread + the Jaccard blocks
(O(_JACCARD_CHUNK)): 2.2 GiB peak RSS at Market-1501 scale, of which the three
float32 inputs are 1.74 GiB (4 N^2 bytes). When that is too much use
`re_ranking_from_embeddings`, the low-memory path: it never holds the [Q, Q]
or [G, G] matrices (the distances are computed on device block by block), so
its peak is the [Q, G] output plus ~0.4 GiB (0.8 GiB RSS with JAX at Market
scale), at the price of the N x N x dim matmul.
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
from reid_jax.evaluation.metrics import default_threads

_JACCARD_CHUNK = 1 << 21  # expanded (query, feature, gallery) min terms per query block
_SCAN_ROWS = 16  # rows per tile in the neighbour scans (also the groups per row range)
_CAND_CAP = 512  # candidates per column beyond which it is done the exact way (ties)
_CAND_CHECK = 1 << 20  # candidates a scan thread holds before it counts them per column
_DENSE_ROWS = 16  # output rows combined at once (stays in cache)
_MARGIN = 1 + 2. ** -20  # T' = T * _MARGIN: entries above it are certainly ranked after T


def _pool_map(fn: Callable, items: list, num_threads: int) -> list:
  if num_threads > 1 and len(items) > 1:
    with ThreadPoolExecutor(min(num_threads, len(items))) as pool:
      return list(pool.map(fn, items))
  return [fn(x) for x in items]


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


def select_smallest(item: np.ndarray, val: np.ndarray, idx: np.ndarray, num_items: int,
                    k: int, n: int) -> np.ndarray:
  """[num_items, k] `idx` of each item's k smallest candidates by (val, idx).

  Candidates are (item, val, idx) triples, idx < n distinct per item, val float32
  in [0, 1]; every item must have >= k of them. One sort of packed int64 keys.
  """
  if num_items * n <= 1 << 33:
    key = ((item.astype(np.int64) << 30) | val.view(np.int32)) * n + idx
    key.sort()
    idx_s = key % n
    item_s = (key // n) >> 30
  else:  # keys would not fit in 63 bits
    order = np.lexsort((idx, val, item))
    idx_s, item_s = idx[order], item[order]
  start = np.searchsorted(item_s, np.arange(num_items))
  return idx_s[start[:, None] + np.arange(k)]


def _by_rows(fn: Callable[[int, int], sp.csr_matrix], n: int, num_threads: int
             ) -> sp.csr_matrix:
  """fn(r0, r1) (a CSR block of rows r0..r1) over row ranges on threads, stacked."""
  parts = _pool_map(lambda span: fn(*span), _split(n, num_threads), num_threads)
  return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def _top(rank: np.ndarray, k: int) -> sp.csr_matrix:
  """Pattern [N, N] (float32 ones, sorted indices) of j in top-k(i)."""
  n = rank.shape[0]
  f = sp.csr_matrix((np.ones(n * k, np.float32), rank[:, :k].reshape(-1),
                     np.arange(0, n * k + 1, k)), shape=(n, n))
  f.sort_indices()
  return f


def k_reciprocal_sets(rank: np.ndarray, k1: int, num_threads: int = 1
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Expanded k-reciprocal sets R*(i) as CSR (indptr, sorted indices).

  `rank` [N, >= k1+1] holds each item's nearest items in order (itself first).
  Both relations are symmetric (j in R(i) iff i in R(j)), so with A = R and
  H = R_half as sparse patterns (top-k and its transpose, elementwise),
  |R_half(c) & R(i)| = (A H)[i, c]; the accepted c form T, and R*(i) is the
  pattern of row i of A + T H. Row blocks run on `num_threads` threads.
  """
  n = rank.shape[0]
  kk = min(k1 + 1, rank.shape[1])
  hh = min(int(np.around(k1 / 2.)) + 1, kk)
  f = _top(rank, kk)
  f_t = f.T.tocsr()
  fh = _top(rank, hh)
  h = fh.multiply(fh.T.tocsr()).tocsr()
  half_len = np.diff(h.indptr)

  def block(r0: int, r1: int) -> sp.csr_matrix:
    a = f[r0:r1].multiply(f_t[r0:r1]).tocsr()
    t = a.multiply(a @ h).tocsr()  # entries c of R(i) with a nonempty intersection
    t.data = (t.data > 2. / 3 * half_len[t.indices]).astype(np.float32)
    t.eliminate_zeros()
    u = (a + t @ h).tocsr()
    u.sort_indices()
    return u

  u = _by_rows(block, n, num_threads)
  return u.indptr.astype(np.int64), u.indices.astype(np.int64)


def query_expansion(v: sp.csr_matrix, rank: np.ndarray, k2: int, num_threads: int = 1
                    ) -> sp.csr_matrix:
  """V[i] <- mean of V over rank[i, :k2] (float32, summed in rank order), sorted indices."""
  n = v.shape[0]
  k2 = min(k2, rank.shape[1])
  sel = sp.csr_matrix((np.ones(n * k2, np.float32), rank[:, :k2].reshape(-1),
                       np.arange(0, n * k2 + 1, k2)), shape=(n, n))

  def block(r0: int, r1: int) -> sp.csr_matrix:
    out = sel[r0:r1] @ v
    out.data /= np.float32(k2)
    out.sort_indices()
    return out

  return _by_rows(block, n, num_threads)


def encode(rank: np.ndarray, k1: int, k2: int,
           pair_dist: Callable[[np.ndarray, np.ndarray], np.ndarray],
           num_threads: int = 1) -> sp.csr_matrix:
  """The k-reciprocal feature V (sparse [N, N] float32), after query expansion.

  `pair_dist(i, j)` returns the normalised squared distances d[i, j] (float32);
  it is called on `num_threads` chunks at once.
  """
  n = rank.shape[0]
  indptr, indices = k_reciprocal_sets(rank, k1, num_threads)
  counts = np.diff(indptr)
  rows = np.repeat(np.arange(n), counts)
  spans = _split(len(rows), num_threads)
  d = np.concatenate(_pool_map(lambda ab: pair_dist(rows[ab[0]:ab[1]], indices[ab[0]:ab[1]]),
                               spans, num_threads))
  w = np.exp(-d.astype(np.float32))
  sums = np.zeros(n, np.float32)
  if len(w):  # R*(i) can be empty (an item with more than k1 duplicates before it)
    sums[counts > 0] = np.add.reduceat(w, indptr[:-1][counts > 0])
  data = (w / np.repeat(sums, counts)).astype(np.float32)
  v = sp.csr_matrix((data, indices, indptr), shape=(n, n))
  if k2 != 1:
    v = query_expansion(v, rank, k2, num_threads)
  v.data = v.data.astype(np.float32)
  v.eliminate_zeros()
  return v


def jaccard_terms(v: sp.csr_matrix, q0: int, q1: int, vg_t: sp.csr_matrix
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The terms min(V[q, l], V[g, l]) of the Jaccard sums of queries q0..q1.

  Returns (offsets [q1 - q0 + 1] of each query's terms, gallery index g,
  value), in (query, ascending l, g) order: the reference's summation order.
  `vg_t` is the gallery part of V transposed (row l: the gallery items with
  V[g, l] > 0); row e of `p` is the gallery column of the queries' e-th entry.
  """
  vq = v[q0:q1]
  p = vg_t[vq.indices]
  np.minimum(p.data, np.repeat(vq.data.astype(np.float32), np.diff(p.indptr)), out=p.data)
  return p.indptr[vq.indptr], p.indices, p.data


def jaccard_sums(m: np.ndarray, terms: tuple[np.ndarray, np.ndarray, np.ndarray],
                 a: int, b: int, ng: int) -> None:
  """m[(q - a) * ng + g] += the terms of queries a..b (of a `jaccard_terms` block).

  float32, one term at a time in the reference's order (ascending l per pair).
  """
  offs, cols, vals = terms
  lo, hi = offs[a], offs[b]
  lin = np.repeat(np.arange(b - a) * ng, np.diff(offs[a:b + 1]))
  lin += cols[lo:hi]
  np.add.at(m, lin, vals[lo:hi])


def _final(v: sp.csr_matrix, num_q: int, lambda_value: float,
           orig_rows: Callable[[int, int, np.ndarray], None], out: np.ndarray,
           num_threads: int = 1) -> np.ndarray:
  """Fills out [Q, G] with (1 - lambda) * Jaccard + lambda * original.

  `orig_rows(a, b, o)` writes the normalised original distances of queries a..b
  into o (float32 [b - a, G]). The Jaccard sums of _DENSE_ROWS queries at a
  time are accumulated in float32, term by term in the reference's order, in a
  small dense buffer and combined with the original distances in cache.
  """
  ng = out.shape[1]
  vg_t = v[num_q:].T.tocsr()
  col_len = np.diff(vg_t.indptr)
  # Expanded terms per query (+ a share for the dense part), to size the blocks.
  terms = np.zeros(v.indptr[num_q] + 1, np.int64)
  np.cumsum(col_len[v.indices[:v.indptr[num_q]]], out=terms[1:])
  cost = terms[v.indptr[1:num_q + 1]] - terms[v.indptr[:num_q]] + ng // 8
  bounds = [0]
  csum = np.cumsum(cost)
  while bounds[-1] < num_q:
    q0 = bounds[-1]
    done = csum[q0 - 1] if q0 else 0
    bounds.append(min(num_q, max(q0 + 1, int(np.searchsorted(csum, done + _JACCARD_CHUNK)))))
  lam = np.float32(lambda_value)
  lam1 = np.float32(1 - lambda_value)
  two = np.float32(2)

  def job(span: tuple[int, int]) -> None:
    q0, q1 = span
    terms = jaccard_terms(v, q0, q1, vg_t)
    m = np.zeros(_DENSE_ROWS * ng, np.float32)  # sum of min terms, per (query, gallery)
    t = np.empty((_DENSE_ROWS, ng), np.float32)
    for a in range(q0, q1, _DENSE_ROWS):
      b = min(q1, a + _DENSE_ROWS)
      jaccard_sums(m, terms, a - q0, b - q0, ng)
      mb, tb, o = m[:(b - a) * ng].reshape(b - a, ng), t[:b - a], out[a:b]
      orig_rows(a, b, o)
      np.multiply(o, lam, out=o)
      np.subtract(two, mb, out=tb)
      np.divide(mb, tb, out=tb)
      np.subtract(np.float32(1), tb, out=tb)  # Jaccard distance 1 - m / (2 - m)
      np.multiply(tb, lam1, out=tb)
      np.add(o, tb, out=o)
      mb.fill(0)

  _pool_map(job, list(zip(bounds[:-1], bounds[1:])), num_threads)
  return out


def _check_k(k1: int, k2: int, lambda_value: float) -> tuple[int, int]:
  k1 = check_positive_int("k1", k1)
  k2 = check_positive_int("k2", k2)
  if not 0.0 <= float(lambda_value) <= 1.0:
    raise EvaluationError(f"lambda_value must be in [0, 1], got {lambda_value}")
  return k1, k2


def _check_threads(num_threads: int | None) -> int:
  """None or 0: `default_threads()` (the usable CPUs, at most 4)."""
  return check_positive_int("num_threads", num_threads) if num_threads else default_threads()


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


def _split(n: int, parts: int, start: int = 0) -> list[tuple[int, int]]:
  b = np.linspace(start, n, parts + 1).round().astype(int)
  return list(zip(b[:-1].tolist(), b[1:].tolist()))


class _Scan:
  """Per-column maximum and minima of disjoint row groups, over row tiles.

  A group is (range of `range_rows` consecutive rows, row mod _SCAN_ROWS);
  every range starts fresh accumulators, so more ranges give more groups.
  """

  def __init__(self, cols: int, dtype, range_rows: int):
    self.cols, self.dtype, self.range_rows = cols, dtype, range_rows
    self.groups: list[np.ndarray] = []
    self.cmax = np.full((_SCAN_ROWS, cols), -np.inf, dtype)

  def rows(self, src: np.ndarray, a: int, b: int, tile_fn=None) -> None:
    for r0 in range(a, b, self.range_rows):
      r1 = min(b, r0 + self.range_rows)
      g = np.full((min(_SCAN_ROWS, r1 - r0), self.cols), np.inf, self.dtype)
      for t0 in range(r0, r1, _SCAN_ROWS):
        blk = src[t0:min(t0 + _SCAN_ROWS, r1)]
        k = len(blk)
        np.minimum(g[:k], blk, out=g[:k])
        np.maximum(self.cmax[:k], blk, out=self.cmax[:k])
        if tile_fn is not None:
          tile_fn(t0, blk)
      self.groups.append(g)


def _row_groups(blk: np.ndarray, m: int) -> np.ndarray:
  """Minima [B, m] of disjoint column groups (column mod m) of each row."""
  c = blk.shape[1]
  full = c // m * m
  g = blk[:, :full].reshape(len(blk), -1, m).min(axis=1)
  if full < c:
    np.minimum(g[:, :c - full], blk[:, full:], out=g[:, :c - full])
  return g


def _kth_group(groups: np.ndarray, kk: int) -> np.ndarray:
  """T per column: the kk-th smallest |group minimum| (inf with fewer groups)."""
  if groups.shape[0] < kk:
    return np.full(groups.shape[1], np.inf, groups.dtype)
  a = np.ascontiguousarray(np.abs(groups).T)
  a.partition(kk - 1, axis=1)
  return a[:, kk - 1]


def _margin(t: np.ndarray) -> np.ndarray:
  """T' = T * _MARGIN rounded in T's dtype (>= T); -inf where T is not finite."""
  with np.errstate(invalid="ignore", over="ignore"):
    tp = (t.astype(np.float64) * _MARGIN).astype(t.dtype)
  return np.where(np.isfinite(t), tp, t.dtype.type(-np.inf))


def _thresholds(groups: np.ndarray, kk: int, cmax: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(colmax float32, T' raw, ok) per column from its group minima [num_groups, C].

  T = k-th smallest |group minimum|: kk distinct groups hold an entry with
  |x| <= T, so the kk-th smallest normalised value is <= f(T), f(x) =
  sq(x) / colmax (monotone in |x|). A column is ok when f(T') > f(T): every
  entry with |x| > T' is then ranked after the kk-th, ties included.
  """
  with np.errstate(invalid="ignore", over="ignore"):
    colmax_raw = np.maximum(cmax, -groups.min(axis=0))
    colmax = _sq(colmax_raw)
    t = _kth_group(groups, kk)
    tp = _margin(t)
    ok = np.isfinite(colmax_raw) & (colmax > 0) & np.isfinite(t)
    safe = np.where(ok, colmax, np.float32(1))
    ok &= _sq(tp) / safe > _sq(t) / safe
  return colmax, np.where(ok, tp, t.dtype.type(-np.inf)), ok


class _Sink:
  """One thread's candidates (item, all-pairs index, raw value) below per-item thresholds.

  A column may collect at most _CAND_CAP candidates (many ties): beyond that
  it is dropped here and marked `heavy`, for the exact fallback.
  """

  def __init__(self, thr: np.ndarray):
    self.thr = thr.copy()  # heavy items get -inf
    self.items: list[np.ndarray] = []
    self.idx: list[np.ndarray] = []
    self.vals: list[np.ndarray] = []
    self.count = 0
    self.check_at = _CAND_CHECK
    self.heavy = np.zeros(len(thr), bool)

  def columns(self, blk: np.ndarray, t0: int, row_off: int, item_off: int) -> None:
    """Entries of blk (rows t0.. of a source, columns = items item_off..) <= thr.

    x <= T' (not |x| <= T': no abs() pass) also keeps the negative entries;
    the caller drops those with |x| > T'."""
    cols = blk.shape[1]
    thr = self.thr[item_off:item_off + cols]
    f = np.flatnonzero(blk <= thr)
    if f.size:
      r, c = np.divmod(f, cols)
      self._add(c + item_off, r + (t0 + row_off), blk.reshape(-1)[f])

  def rows(self, blk: np.ndarray, t0: int, col_off: int) -> None:
    """Entries of blk <= thr of its rows (items t0..; columns = indices col_off..)."""
    cols = blk.shape[1]
    thr = self.thr[t0:t0 + len(blk), None]
    f = np.flatnonzero(blk <= thr)
    if f.size:
      r, c = np.divmod(f, cols)
      self._add(r + t0, c + col_off, blk.reshape(-1)[f])

  def _add(self, item, idx, x) -> None:
    self.items.append(item)
    self.idx.append(idx)
    self.vals.append(x)
    self.count += len(item)
    if self.count > self.check_at:
      self._drop_heavy()

  def _drop_heavy(self) -> None:
    items = np.concatenate(self.items)
    heavy = np.bincount(items, minlength=len(self.thr)) > _CAND_CAP
    if heavy.any():
      self.heavy |= heavy
      self.thr[heavy] = -np.inf
      keep = ~heavy[items]
      self.items = [items[keep]]
      self.idx = [np.concatenate(self.idx)[keep]]
      self.vals = [np.concatenate(self.vals)[keep]]
      self.count = len(self.items[0])
    self.check_at = max(2 * self.count, _CAND_CHECK)

  def result(self, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not self.items:
      return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, dtype)
    return np.concatenate(self.items), np.concatenate(self.idx), np.concatenate(self.vals)


def _knn_distances(qg: np.ndarray, qq: np.ndarray, gg: np.ndarray, kk: int,
                   num_threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(rank [N, kk] int64, colmax [N] float32, bad [N] bool) by two row scans.

  Item j's entries are column j of M = [[qq, qg], [qg.T, gg]] (for a query j,
  also row j of qg). Scan 1 reads the inputs in row tiles for the column
  maxima and group minima (and, on qg's rows, the row maxima and column-group
  minima of the queries), scan 2 for the entries <= each column's threshold.
  Rows of bad items (see `_thresholds`, `_Sink`) are left unset for the
  exact fallback.
  """
  nq, ng = qg.shape
  n = nq + ng
  dt = qg.dtype
  mq = min(ng, 256)  # column groups of each qg row (the query items' gallery part)
  range_rows = max(_SCAN_ROWS, _SCAN_ROWS * (n // (4 * kk + 16)))
  parts = list(zip(_split(nq, num_threads), _split(ng, num_threads)))

  def scan1(part):
    (qa, qb), (ga, gb) = part
    sq_ = _Scan(nq, dt, range_rows)  # query columns: rows of qq
    sg = _Scan(ng, dt, range_rows)  # gallery columns: rows of qg, then of gg
    rg = np.empty((qb - qa, mq), dt)
    rmax = np.empty(qb - qa, dt)

    def query_rows(t0, blk):  # row i of qg is the gallery part of query i's column
      rg[t0 - qa:t0 - qa + len(blk)] = _row_groups(blk, mq)
      rmax[t0 - qa:t0 - qa + len(blk)] = blk.max(axis=1)

    sq_.rows(qq, qa, qb)
    sg.rows(qg, qa, qb, query_rows)
    sg.rows(gg, ga, gb)
    return sq_, sg, rg, rmax

  res = _pool_map(scan1, parts, num_threads)
  with np.errstate(invalid="ignore"):
    groups_q = np.concatenate([g for r in res for g in r[0].groups] +
                              [np.concatenate([r[2] for r in res]).T])
    cmax_q = np.maximum(np.max([r[0].cmax.max(axis=0) for r in res], axis=0),
                        np.concatenate([r[3] for r in res]))
    groups_g = np.concatenate([g for r in res for g in r[1].groups])
    cmax_g = np.max([r[1].cmax.max(axis=0) for r in res], axis=0)
  del res
  colmax_q, tq, ok_q = _thresholds(groups_q, kk, cmax_q)
  colmax_g, tg, ok_g = _thresholds(groups_g, kk, cmax_g)
  colmax = np.concatenate([colmax_q, colmax_g])
  thr = np.concatenate([tq, tg])

  def scan2(part):
    (qa, qb), (ga, gb) = part
    sink = _Sink(thr)
    for t0 in range(qa, qb, _SCAN_ROWS):
      sink.columns(qq[t0:min(t0 + _SCAN_ROWS, qb)], t0, 0, 0)
    for t0 in range(qa, qb, _SCAN_ROWS):
      blk = qg[t0:min(t0 + _SCAN_ROWS, qb)]
      sink.columns(blk, t0, 0, nq)
      sink.rows(blk, t0, nq)
    for t0 in range(ga, gb, _SCAN_ROWS):
      sink.columns(gg[t0:min(t0 + _SCAN_ROWS, gb)], t0, nq, nq)
    return sink

  sinks = _pool_map(scan2, parts, num_threads)
  ok = np.concatenate([ok_q, ok_g])
  for sink in sinks:
    ok &= ~sink.heavy
  got = [sink.result(dt) for sink in sinks]
  items = np.concatenate([p[0] for p in got])
  idx = np.concatenate([p[1] for p in got])
  x = np.concatenate([p[2] for p in got])
  keep = ok[items]
  keep &= np.abs(x) <= thr[items]  # x <= T' also kept the negative entries
  items, idx, x = items[keep], idx[keep], x[keep]
  rank = np.empty((n, kk), np.int64)
  good = np.flatnonzero(ok)
  if good.size:
    local = np.full(n, -1, np.int64)
    local[good] = np.arange(good.size)
    rank[good] = select_smallest(local[items], _sq(x) / colmax[items], idx, good.size, kk, n)
  return rank, colmax, ~ok


def re_ranking(q_g_dist: Any, q_q_dist: Any, g_g_dist: Any, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3, block_rows: int = 1024,
               num_threads: int | None = None) -> np.ndarray:
  """k-reciprocal re-ranked query x gallery distances (float32 [Q, G]).

  Args:
    q_g_dist, q_q_dist, g_g_dist: plain (not squared) distances [Q, G], [Q, Q],
      [G, G], e.g. `pairwise_distance(..., metric="euclidean")`; squared inside,
      as the reference does. They are read, never copied; with the [Q, G]
      output they are most of the memory (see `re_ranking_from_embeddings`).
    k1, k2, lambda_value: the paper's parameters (defaults 20, 6, 0.3).
    block_rows: rows of the normalised all-pairs matrix built at once where
      the exact fallback is needed (rare: see the module docstring).
    num_threads: threads for the scans and the Jaccard blocks (default: the
      usable CPUs, at most 4). Results do not depend on it.

  Returns:
    float32 [Q, G] distances; rank them with `evaluate_rank`.
  """
  k1, k2 = _check_k(k1, k2, lambda_value)
  num_threads = _check_threads(num_threads)
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
  kk = min(max(k1 + 1, k2), n)

  def norm_rows(r0: int, r1: int, colmax: np.ndarray) -> np.ndarray:
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

  if qg.dtype == qq.dtype == gg.dtype:
    rank, colmax, bad = _knn_distances(qg, qq, gg, kk, num_threads)
  else:  # mixed dtypes square differently: the exact path for every item
    rank, colmax = np.empty((n, kk), np.int64), np.empty(n, np.float32)
    bad = np.ones(n, bool)
  # Exact fallback, in the old blocks (same errors, raised for the same first item).
  for r0 in (np.unique(np.flatnonzero(bad) // step) * step).tolist():
    r1 = min(n, r0 + step)
    rank[r0:r1] = smallest_k_stable(norm_rows(r0, r1, colmax), kk)

  def pair_dist(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Normalised d[i, j] = sq(M[j, i]) / colmax[i], M the all-pairs matrix."""
    out = np.empty(len(i), np.float32)
    iq, jq = i < nq, j < nq
    for mi, mj, src, ri, ci in ((iq, jq, qq, j, i), (~iq, jq, qg, j, i - nq),
                                (iq, ~jq, qg, i, j - nq), (~iq, ~jq, gg, j - nq, i - nq)):
      sel = mi & mj
      out[sel] = _sq(src[ri[sel], ci[sel]])
    return out / colmax[i]

  v = encode(rank, k1, k2, pair_dist, num_threads)
  del rank

  def orig_rows(a: int, b: int, o: np.ndarray) -> None:
    if qg.dtype == np.float32:
      np.square(qg[a:b], out=o)
    else:
      o[...] = np.square(qg[a:b])
    np.divide(o, colmax[a:b, None], out=o)

  out = np.empty((nq, ng), np.float32)
  return _final(v, nq, lambda_value, orig_rows, out, num_threads)


def _sq_metric(metric: str) -> str:
  """The kernel whose output is the square of `metric` (or `metric`, squared after)."""
  return "sqeuclidean" if metric == "euclidean" else metric


@functools.lru_cache(maxsize=None)
def _kernels(metric: str):
  """Jitted (rows x all -> squared distances; pairs (i, j) of x_all -> squared distances)."""
  k = _sq_metric(metric)
  sq = (lambda d: d) if metric == "euclidean" else (lambda d: d * d)
  rows = jax.jit(lambda xb, x_all: sq(block_distance(xb, x_all, k)))
  pairs = jax.jit(lambda x_all, i, j: sq(paired_distance(x_all[i], x_all[j][:, None, :], k))[:, 0])
  return rows, pairs


def re_ranking_from_embeddings(q_emb: Any, g_emb: Any, k1: int = 20, k2: int = 6,
                               lambda_value: float = 0.3, metric: str = "euclidean",
                               block_rows: int = 1024,
                               num_threads: int | None = None) -> np.ndarray:
  """`re_ranking` of the distances between embeddings: the low-memory path.

  Equivalent to `re_ranking(pairwise_distance(q, g, metric), pairwise_distance(q,
  q, metric), pairwise_distance(g, g, metric))` up to float rounding, without
  the [Q, Q] and [G, G] matrices: the squared distances are computed on device
  directly (for "euclidean", |x|^2 + |y|^2 - 2 x.y; other metrics are squared),
  rows of `block_rows` x N at a time, and reduced at once to each row's
  nearest items (the certified threshold search of `re_ranking`, along rows);
  the column maximum of the symmetric matrix is taken as the row maximum. The
  query rows' gallery distances are kept in the output buffer for the final
  combination, the V weights computed on device from index pairs.
  Memory: the embeddings + the [Q, G] float32 output + O(block_rows * N) per
  step + O(N * (k1 + 1)) neighbours + sparse V (N = Q + G): about 0.9 GiB
  beyond the embeddings at Market-1501 scale (the output is 0.25 GiB of it),
  against 1.74 GiB of inputs alone for `re_ranking`. The price is the
  N x N x dim matmul (137 GFLOP at Market scale, 128-d), on device.
  """
  k1, k2 = _check_k(k1, k2, lambda_value)
  check_choice("metric", metric, METRICS)
  num_threads = _check_threads(num_threads)
  q = check_embeddings("q_emb", q_emb)
  g = check_embeddings("g_emb", g_emb, q.shape[1])
  nq, ng = len(q), len(g)
  n = nq + ng
  x_all = np.concatenate([q, g])
  x_dev = jnp.asarray(x_all)
  step = max(1, min(check_positive_int("block_rows", block_rows), (1 << 24) // n))
  kk = min(max(k1 + 1, k2), n)
  groups = min(n, 256)
  rows_fn, pairs_fn = _kernels(metric)
  rank = np.empty((n, kk), np.int64)
  colmax = np.empty(n, np.float32)
  out = np.empty((nq, ng), np.float32)  # the query rows' raw squared gallery distances

  def store(pending) -> None:
    r0, d = pending
    m = min(d.shape[0], n - r0)
    d = np.asarray(d)[:m]
    colmax[r0:r0 + m] = d.max(axis=1)
    if r0 < nq:
      out[r0:min(nq, r0 + m)] = d[:nq - r0, nq:]
    rank[r0:r0 + m] = _knn_rows(d, colmax[r0:r0 + m], _row_groups(d, groups), kk)

  pending = None
  for r0 in range(0, n, step):
    xb = np.zeros((step, x_all.shape[1]), np.float32)
    xb[:min(step, n - r0)] = x_all[r0:r0 + step]
    res = rows_fn(jnp.asarray(xb), x_dev)  # dispatched while the previous rows are sorted
    if pending is not None:
      store(pending)
    pending = (r0, res)
  store(pending)
  if not colmax.all():
    raise EvaluationError(f"the distances of item {int(np.argmin(colmax))} to all items are 0:"
                          " cannot normalise (are all embeddings identical?)")

  def pair_dist(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    res = np.empty(len(i), np.float32)
    chunk = 1 << 16
    for s in range(0, len(i), chunk):
      m = min(chunk, len(i) - s)
      a = np.zeros(chunk, np.int32)
      b = np.zeros(chunk, np.int32)
      a[:m], b[:m] = i[s:s + m], j[s:s + m]
      res[s:s + m] = np.asarray(pairs_fn(x_dev, jnp.asarray(a), jnp.asarray(b)))[:m]
    return res / colmax[i]

  v = encode(rank, k1, k2, pair_dist, num_threads)
  del rank

  def orig_rows(a: int, b: int, o: np.ndarray) -> None:
    np.divide(o, colmax[a:b, None], out=o)  # o holds the raw squared distances

  return _final(v, nq, lambda_value, orig_rows, out, num_threads)


def _knn_rows(d: np.ndarray, colmax: np.ndarray, gm: np.ndarray, kk: int) -> np.ndarray:
  """Each row's kk smallest of d / colmax by (value, index), from its group minima.

  d [B, N] >= 0 (squared distances), gm [B, m] minima of disjoint column groups.
  Rows whose threshold cannot be certified (ties at 0, fewer groups than kk)
  go through `smallest_k_stable`; rows with a zero maximum are left for the
  caller, which raises.
  """
  b, n = d.shape
  ok = colmax > 0
  if gm.shape[1] < kk:
    ok[:] = False
  t = np.partition(gm, kk - 1, axis=1)[:, kk - 1] if ok.any() else np.zeros(b, d.dtype)
  tp = (t.astype(np.float64) * _MARGIN).astype(np.float32)  # >= t
  safe = np.where(ok, colmax, np.float32(1))
  with np.errstate(invalid="ignore"):
    ok &= tp / safe > t / safe
  rank = np.empty((b, kk), np.int64)
  if ok.any():
    f = np.flatnonzero(d <= np.where(ok, tp, -1)[:, None])
    r, c = np.divmod(f, n)
    vals = d.reshape(-1)[f] / colmax[r]
    good = np.flatnonzero(ok)
    local = np.full(b, -1, np.int64)
    local[good] = np.arange(good.size)
    rank[good] = select_smallest(local[r], vals, c, good.size, kk, n)
  bad = np.flatnonzero(~ok & (colmax > 0))
  if bad.size:
    rank[bad] = smallest_k_stable(d[bad] / colmax[bad, None], kk)
  return rank
