"""re_ranking vs a direct, loop-by-loop implementation of Zhong et al.'s algorithm."""

from __future__ import annotations

import numpy as np
import pytest

from reid_jax import evaluation as ev
from reid_jax.evaluation import EvaluationError
from reid_jax.evaluation.rerank import smallest_k_stable


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
    idx = np.unique(expanded)
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
