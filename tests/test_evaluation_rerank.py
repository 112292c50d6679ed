"""re_ranking vs a direct, loop-by-loop implementation of Zhong et al.'s algorithm."""

from __future__ import annotations

import numpy as np
import pytest

from reid_jax import evaluation as ev
from reid_jax.evaluation import EvaluationError
from reid_jax.evaluation import rerank
from reid_jax.evaluation.rerank import select_smallest, smallest_k_stable


def loop_re_ranking(q_g, q_q, g_g, k1=20, k2=6, lam=0.3):
  """The published algorithm, one item at a time (stable sort for ties)."""
  nq = q_g.shape[0]
  full = np.block([[q_q, q_g], [q_g.T, g_g]])
  full = np.power(full, 2).astype(np.float32)
  full = (full / np.max(full, axis=0)).T  # column-normalised, row i = item i
  n = full.shape[0]
  rank = np.argsort(full, axis=1, kind="stable")

  def reciprocal(i, k):
    out = []
    for j in rank[i, :k + 1]:
      if i in rank[j, :k + 1]:
        out.append(j)
    return out

  v = np.zeros((n, n), np.float32)
  half = int(np.around(k1 / 2.))
  for i in range(n):
    r = reciprocal(i, k1)
    expanded = list(r)
    for c in r:
      rc = reciprocal(c, half)
      common = len(set(rc) & set(r))
      if common > 2. / 3 * len(rc):
        expanded.extend(rc)
    idx = np.unique(np.asarray(expanded, dtype=int))  # may be empty (many duplicates)
    w = np.exp(-full[i, idx])
    v[i, idx] = w / np.sum(w)
  if k2 != 1:
    v_qe = np.zeros_like(v)
    for i in range(n):
      v_qe[i] = np.mean(v[rank[i, :k2]], axis=0)
    v = v_qe
  jac = np.zeros((nq, n), np.float32)
  for i in range(nq):
    tmin = np.zeros(n, np.float32)
    for l in np.flatnonzero(v[i]):
      for j in np.flatnonzero(v[:, l]):
        tmin[j] += min(v[i, l], v[j, l])
    jac[i] = 1 - tmin / (2. - tmin)
  final = jac * (1 - lam) + full[:nq] * lam
  return final[:, nq:]


def random_dists(seed, nq=15, ng=60, dim=6, clusters=8):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, dim))
  q = centers[rng.integers(0, clusters, nq)] + 0.5 * rng.normal(size=(nq, dim))
  g = centers[rng.integers(0, clusters, ng)] + 0.5 * rng.normal(size=(ng, dim))
  q, g = q.astype(np.float32), g.astype(np.float32)
  return q, g, (ev.pairwise_distance(q, g), ev.pairwise_distance(q, q),
                ev.pairwise_distance(g, g))


@pytest.mark.parametrize("seed,k1,k2,lam", [(0, 20, 6, 0.3), (1, 7, 3, 0.5), (2, 5, 1, 0.0),
                                            (3, 4, 2, 1.0), (4, 100, 6, 0.3)])
def test_matches_loop_reference(seed, k1, k2, lam):
  _, _, (qg, qq, gg) = random_dists(seed)
  ours = ev.re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
  ref = loop_re_ranking(qg, qq, gg, k1, k2, lam)
  assert ours.shape == ref.shape and ours.dtype == np.float32
  assert np.abs(ours - ref).max() <= 1e-5


def test_matches_loop_reference_float64_and_small_blocks():
  _, _, (qg, qq, gg) = random_dists(5)
  qg, qq, gg = (x.astype(np.float64) for x in (qg, qq, gg))
  ours = ev.re_ranking(qg, qq, gg, k1=6, k2=3, block_rows=7, num_threads=2)
  assert np.abs(ours - loop_re_ranking(qg, qq, gg, 6, 3)).max() <= 1e-5


def test_ties_from_duplicate_points():
  rng = np.random.default_rng(3)
  g = rng.integers(0, 3, (40, 3)).astype(np.float32)  # many identical points
  q = g[:8].copy()
  qg, qq, gg = ev.pairwise_distance(q, g), ev.pairwise_distance(q, q), ev.pairwise_distance(g, g)
  ours = ev.re_ranking(qg, qq, gg, k1=5, k2=2)
  assert np.abs(ours - loop_re_ranking(qg, qq, gg, 5, 2)).max() <= 1e-5


def test_from_embeddings_matches_matrix_version():
  q, g, (qg, qq, gg) = random_dists(6)
  a = ev.re_ranking(qg, qq, gg, k1=8, k2=4)
  b = ev.re_ranking_from_embeddings(q, g, k1=8, k2=4, block_rows=16)
  assert np.abs(a - b).max() <= 1e-5
  qc, qqc, ggc = (ev.pairwise_distance(x, y, "cosine") for x, y in ((q, g), (q, q), (g, g)))
  a = ev.re_ranking(qc, qqc, ggc, k1=8, k2=4)
  b = ev.re_ranking_from_embeddings(q, g, k1=8, k2=4, metric="cosine")
  assert np.abs(a - b).max() <= 1e-5


def grid_dists(seed, nq=20, ng=70, dim=4, dup=0):
  """Integer points: many exact ties at non-zero distances; `dup` copies of query 0."""
  rng = np.random.default_rng(seed)
  q = rng.integers(0, 4, (nq, dim)).astype(np.float32)
  g = rng.integers(0, 4, (ng, dim)).astype(np.float32)
  g[:dup] = q[0]
  return q, g, (ev.pairwise_distance(q, g), ev.pairwise_distance(q, q),
                ev.pairwise_distance(g, g))


def normalised_rows(qg, qq, gg):
  full = np.square(np.block([[qq, qg], [qg.T, gg]])).astype(np.float32)
  return (full / np.max(full, axis=0)).T


@pytest.mark.parametrize("case", ["grid", "cosine", "float64", "asymmetric"])
@pytest.mark.parametrize("threads", [1, 3])
def test_neighbour_scan_equals_full_sort(case, threads):
  """The two row scans give exactly the stable sort of the normalised matrix."""
  if case == "grid":  # exact ties at non-zero distances
    _, _, (qg, qq, gg) = grid_dists(0)
  elif case == "cosine":  # tiny negative self-distances
    q, g, _ = random_dists(1)
    qg, qq, gg = (ev.pairwise_distance(x, y, "cosine") for x, y in ((q, g), (q, q), (g, g)))
  else:
    _, _, (qg, qq, gg) = random_dists(2)
    if case == "float64":
      qg, qq, gg = (x.astype(np.float64) for x in (qg, qq, gg))
    else:  # [[qq, qg], [qg.T, gg]] not symmetric: columns and rows differ
      rng = np.random.default_rng(0)
      qq, gg = (x * rng.uniform(0.5, 1.5, x.shape).astype(x.dtype) for x in (qq, gg))
  for kk in (4, 21, 40):
    rank, colmax, bad = rerank._knn_distances(qg, qq, gg, kk, threads)
    rows = normalised_rows(qg, qq, gg)
    assert not bad.any()
    np.testing.assert_array_equal(rank, smallest_k_stable(rows, kk))
    np.testing.assert_array_equal(colmax, np.square(np.block([[qq, qg], [qg.T, gg]]))
                                  .astype(np.float32).max(axis=0))


def test_ties_at_zero_and_many_candidates_use_the_exact_fallback(monkeypatch):
  _, _, (qg, qq, gg) = grid_dists(3, dup=20)  # 21 copies of query 0: ties at distance 0
  rank, _, bad = rerank._knn_distances(qg, qq, gg, 21, 1)
  assert bad.any() and not bad.all()
  ref = loop_re_ranking(qg, qq, gg, 20, 6)
  assert np.abs(ev.re_ranking(qg, qq, gg) - ref).max() <= 1e-5
  monkeypatch.setattr(rerank, "_CAND_CAP", 3)  # every column holds more candidates
  monkeypatch.setattr(rerank, "_CAND_CHECK", 0)
  assert rerank._knn_distances(qg, qq, gg, 21, 2)[2].all()
  assert np.abs(ev.re_ranking(qg, qq, gg, num_threads=2) - ref).max() <= 1e-5


@pytest.mark.parametrize("case", ["grid", "cosine", "asymmetric"])
def test_fast_paths_match_loop_reference(case):
  if case == "grid":
    _, _, (qg, qq, gg) = grid_dists(4, dup=3)
  elif case == "cosine":
    q, g, _ = random_dists(7)
    qg, qq, gg = (ev.pairwise_distance(x, y, "cosine") for x, y in ((q, g), (q, q), (g, g)))
  else:
    _, _, (qg, qq, gg) = random_dists(8)
    rng = np.random.default_rng(1)
    qq, gg = (x * rng.uniform(0.5, 1.5, x.shape).astype(np.float32) for x in (qq, gg))
  ref = loop_re_ranking(qg, qq, gg, 20, 6, 0.3)
  one = ev.re_ranking(qg, qq, gg, num_threads=1)
  assert np.abs(one - ref).max() <= 1e-5
  np.testing.assert_array_equal(ev.re_ranking(qg, qq, gg, num_threads=3), one)


@pytest.mark.parametrize("dup", [20, 25])  # 25: some items are not in their own R(i)
def test_from_embeddings_ties_and_duplicates(dup):
  q, g, (qg, qq, gg) = grid_dists(5, dup=dup)
  assert np.abs(ev.re_ranking(qg, qq, gg) - loop_re_ranking(qg, qq, gg, 20, 6, 0.3)).max() <= 1e-5
  a = ev.re_ranking_from_embeddings(q, g, num_threads=1)
  assert np.abs(a - loop_re_ranking(qg, qq, gg, 20, 6, 0.3)).max() <= 1e-5
  np.testing.assert_array_equal(ev.re_ranking_from_embeddings(q, g, block_rows=7,
                                                              num_threads=2), a)


def test_select_smallest_both_key_paths():
  rng = np.random.default_rng(0)
  item = np.repeat(np.arange(6), 9)
  idx = np.concatenate([rng.permutation(40)[:9] for _ in range(6)])
  val = rng.integers(0, 3, len(item)).astype(np.float32) / 2  # ties, 0 and 1 included
  order = np.lexsort((idx, val, item))
  want = idx[order].reshape(6, 9)[:, :4]
  np.testing.assert_array_equal(select_smallest(item, val, idx, 6, 4, 40), want)
  np.testing.assert_array_equal(select_smallest(item, val, idx, 6, 4, 1 << 33), want)


def test_smallest_k_stable_ties():
  rows = np.array([[3., 1., 1., 0., 1., 1.], [5., 4., 3., 2., 1., 0.]], np.float32)
  np.testing.assert_array_equal(smallest_k_stable(rows, 3), [[3, 1, 2], [5, 4, 3]])
  np.testing.assert_array_equal(smallest_k_stable(rows, 6),
                                np.argsort(rows, axis=1, kind="stable"))


def test_rerank_improves_clustered_retrieval():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(30, 32))
  g_pids = np.repeat(np.arange(30), 8)
  g = centers[g_pids] + 0.9 * rng.normal(size=(240, 32))
  q_pids = np.arange(30)
  q = centers[q_pids] + 0.9 * rng.normal(size=(30, 32))
  qc, gc = np.zeros(30, int), np.ones(240, int)
  base = ev.evaluate_rank(ev.pairwise_distance(q, g), q_pids, g_pids, qc, gc)
  rr = ev.re_ranking_from_embeddings(q, g)
  after = ev.evaluate_rank(rr, q_pids, g_pids, qc, gc)
  assert after["mAP"] > base["mAP"]


@pytest.mark.parametrize("args,match", [
    ((np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((4, 4))), "g_g_dist has shape"),
    ((np.zeros((2, 3)), np.zeros((3, 3)), np.zeros((3, 3))), "q_q_dist has shape"),
    ((np.zeros((0, 3)), np.zeros((0, 0)), np.zeros((3, 3))), "empty query set"),
    ((np.full((2, 3), np.nan), np.ones((2, 2)), np.ones((3, 3))), "q_g_dist contains NaN"),
    ((np.ones((2, 3)), np.array([[0, np.nan], [1, 0]]), np.ones((3, 3))),
     "q_q_dist contains NaN"),
    ((np.ones((2, 3)), np.ones((2, 2)), np.diag([np.nan, 1, 1])), "g_g_dist contains NaN"),
])
def test_bad_input(args, match):
  with pytest.raises(EvaluationError, match=match):
    ev.re_ranking(*args)
  with pytest.raises(EvaluationError, match="k1"):
    ev.re_ranking(np.ones((1, 2)), np.ones((1, 1)), np.ones((2, 2)), k1=0)
