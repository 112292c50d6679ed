"""evaluate_rank / evaluate_cuhk03 / pooling vs independent per-query loops and hand cases."""

from __future__ import annotations

import numpy as np
import pytest

from reid_jax import evaluation as ev
from reid_jax.evaluation import EvaluationError


# ----------------------------------------------------------------- reference loops


def ref_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, ap="standard"):
  """Obviously-correct per-query loop: stable argsort, drop junk, read off the hits."""
  all_cmc, all_ap, all_inp = [], [], []
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind="stable")  # ties: lower gallery index first
    ranked = []
    for g in order:
      if g_pids[g] == -1:
        continue  # junk
      if g_pids[g] == q_pids[i] and g_camids[g] == q_camids[i]:
        continue  # junk
      ranked.append(g_pids[g] == q_pids[i])
    good = np.array(ranked, bool)
    if not good.any():
      continue
    hit_ranks = np.flatnonzero(good) + 1  # 1-based
    cmc = np.array([1.0 if hit_ranks[0] <= k else 0.0 for k in range(1, max_rank + 1)])
    all_cmc.append(cmc)
    m = len(hit_ranks)
    if ap == "standard":
      all_ap.append(np.mean([(n + 1) / r for n, r in enumerate(hit_ranks)]))
    else:
      all_ap.append(ref_official_ap(good))
    all_inp.append(m / hit_ranks[-1])
  if not all_cmc:
    raise AssertionError("no valid query")
  return {"cmc": np.mean(all_cmc, axis=0), "mAP": np.mean(all_ap), "mINP": np.mean(all_inp),
          "num_valid_queries": len(all_cmc)}


def ref_official_ap(good):
  """Market-1501 compute_AP.m (junk already removed): trapezoid over the ranked list."""
  ngood = good.sum()
  old_recall, old_precision, ap, hits = 0.0, 1.0, 0.0, 0
  for j, is_good in enumerate(good):
    if is_good:
      hits += 1
    recall = hits / ngood
    precision = hits / (j + 1)
    ap += (recall - old_recall) * ((old_precision + precision) / 2)
    old_recall, old_precision = recall, precision
    if hits == ngood:
      break
  return ap


def planted(seed, nq=40, ng=300, nid=15, ncam=4, ties=False):
  """Random distances with planted ids/cameras, distractors (0), junk (-1), ties."""
  rng = np.random.default_rng(seed)
  q_pids = rng.integers(1, nid + 4, nq)  # ids > nid have no gallery match
  q_camids = rng.integers(0, ncam, nq)
  g_pids = rng.integers(1, nid + 1, ng)
  g_pids[rng.random(ng) < 0.15] = 0  # distractors
  g_pids[rng.random(ng) < 0.1] = -1  # junk
  g_camids = rng.integers(0, ncam, ng)
  if ties:
    dist = rng.integers(0, 6, (nq, ng)).astype(np.float32)
    dist[rng.random((nq, ng)) < 0.05] = -0.0
  else:
    dist = rng.random((nq, ng))
    # Matches a bit closer, so numbers are not all near zero.
    dist -= 0.3 * (q_pids[:, None] == g_pids[None, :])
  return dist, q_pids, g_pids, q_camids, g_camids


def assert_same(res, ref):
  np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-12)
  assert abs(res["mAP"] - ref["mAP"]) < 1e-12
  assert abs(res["mINP"] - ref["mINP"]) < 1e-12
  assert res["num_valid_queries"] == ref["num_valid_queries"]


# ----------------------------------------------------------------- evaluate_rank


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ap", ["standard", "official"])
@pytest.mark.parametrize("sort_fraction", [0.0, 2.0])  # whole-row sort / candidate path
def test_matches_reference_loop(seed, ties, ap, sort_fraction, monkeypatch):
  from reid_jax.evaluation import metrics
  monkeypatch.setattr(metrics, "_SORT_FRACTION", sort_fraction)
  d, qp, gp, qc, gc = planted(seed, ties=ties)
  res = ev.evaluate_rank(d, qp, gp, qc, gc, max_rank=20, ap=ap)
  ref = ref_evaluate(d, qp, gp, qc, gc, max_rank=20, ap=ap)
  assert_same(res, ref)
  assert res["cmc"].shape == (20,)
  assert res["num_valid_queries"] < len(qp)  # some queries were skipped


def test_float64_and_int_inputs_and_threads():
  d, qp, gp, qc, gc = planted(7, ties=True)
  ref = ref_evaluate(d, qp, gp, qc, gc, max_rank=5)
  assert_same(ev.evaluate_rank(d.astype(np.float64), qp, gp, qc, gc, max_rank=5), ref)
  assert_same(ev.evaluate_rank(d.astype(np.int32), list(qp), gp, qc, gc, max_rank=5), ref)
  q, r = ev.positive_ranks(d, qp, gp, qc, gc, num_threads=1)
  q2, r2 = ev.positive_ranks(d, qp, gp, qc, gc, num_threads=3)
  np.testing.assert_array_equal(q, q2)
  np.testing.assert_array_equal(r, r2)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("sort_fraction", [0.0, 2.0])
def test_float32_packed_keys_with_negatives(seed, dtype, sort_fraction, monkeypatch):
  """float32 (and float16, widened exactly) take the packed (row, value, index) sort."""
  from reid_jax.evaluation import metrics
  monkeypatch.setattr(metrics, "_SORT_FRACTION", sort_fraction)
  d, qp, gp, qc, gc = planted(seed)
  d = (d - 0.5).astype(dtype)  # negative, positive, ties after the cast
  d[0, :7] = -0.0
  d[1, :7] = 0.0
  ref = ref_evaluate(d, qp, gp, qc, gc, max_rank=20)
  assert_same(ev.evaluate_rank(d, qp, gp, qc, gc, max_rank=20), ref)
  assert_same(ev.evaluate_rank(d, qp, gp, qc, gc, max_rank=20, num_threads=3), ref)


@pytest.mark.parametrize("where", ["no_positive_row", "beyond_hardest", "positive", "whole_row"])
@pytest.mark.parametrize("sort_fraction", [0.0, 2.0])
def test_nan_anywhere_is_an_error(where, sort_fraction, monkeypatch):
  from reid_jax.evaluation import metrics
  monkeypatch.setattr(metrics, "_SORT_FRACTION", sort_fraction)
  d, qp, gp, qc, gc = planted(0)
  d = d.astype(np.float32)
  pos = (qp[:, None] == gp[None, :]) & (qc[:, None] != gc[None, :]) & (gp[None, :] != -1)
  r = int(np.flatnonzero(~pos.any(axis=1))[0]) if where == "no_positive_row" else \
      int(np.flatnonzero(pos.any(axis=1))[0])
  if where == "positive":
    d[r, np.flatnonzero(pos[r])[0]] = np.nan
  elif where == "whole_row":
    d[r] = np.nan
  else:  # the row's farthest entry: never a candidate
    d[r, np.argmax(d[r])] = np.nan
  with pytest.raises(EvaluationError, match=f"contains NaN .* first at row {r}"):
    ev.evaluate_rank(d, qp, gp, qc, gc)


@pytest.mark.parametrize("sort_fraction", [0.0, 2.0])
def test_many_chunks(monkeypatch, sort_fraction):
  from reid_jax.evaluation import metrics
  monkeypatch.setattr(metrics, "_CHUNK_ELEMS", 700)  # 2 rows per chunk
  monkeypatch.setattr(metrics, "_SORT_FRACTION", sort_fraction)
  d, qp, gp, qc, gc = planted(3, ties=True)
  assert_same(ev.evaluate_rank(d, qp, gp, qc, gc, max_rank=7),
              ref_evaluate(d, qp, gp, qc, gc, max_rank=7))


def test_hand_computed_single_query():
  # Gallery ids/cams; query id 1 in camera 0.
  # index:   0    1    2    3    4    5
  g_pids = [1, 2, 1, -1, 1, 0]
  g_cams = [1, 1, 0, 1, 2, 1]
  dist = np.array([[0.5, 0.1, 0.05, 0.2, 0.9, 0.3]])
  # Order: 2 (junk: same id+cam), 1 (neg), 3 (junk: -1), 5 (distractor, neg), 0 (pos), 4 (pos).
  # Junk removed: [1:neg, 5:neg, 0:pos, 4:pos] -> hits at ranks 3 and 4.
  res = ev.evaluate_rank(dist, [1], g_pids, [0], g_cams, max_rank=5, per_query=True)
  np.testing.assert_allclose(res["cmc"], [0, 0, 1, 1, 1])
  assert res["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)  # 0.416666...
  assert res["mINP"] == pytest.approx(2 / 4)
  assert res["num_valid_queries"] == 1
  assert res["first_hit"].tolist() == [2]
  # Official AP: hit 1 at rank 3: (1/2) * (0/2 + 1/3) / 2 = 1/12;
  #              hit 2 at rank 4: (1/2) * (1/3 + 2/4) / 2 = 5/24.  Sum = 7/24.
  off = ev.evaluate_rank(dist, [1], g_pids, [0], g_cams, max_rank=5, ap="official")
  assert off["mAP"] == pytest.approx(7 / 24)


def test_hand_computed_ties_and_skips():
  # Two queries; query 1 (id 9) has no match and is skipped.
  g_pids = [3, 4, 3, 3]
  g_cams = [1, 1, 1, 2]
  dist = np.array([[1.0, 1.0, 1.0, 0.0],  # all tie at 1.0 except item 3
                   [0.0, 0.0, 0.0, 0.0]])
  # Query 0 (id 3, cam 0): order 3(pos), 0(pos), 1(neg), 2(pos) -> ranks 1, 2, 4.
  res = ev.evaluate_rank(dist, [3, 9], g_pids, [0, 0], g_cams, max_rank=3)
  assert res["num_valid_queries"] == 1
  np.testing.assert_allclose(res["cmc"], [1, 1, 1])
  assert res["mAP"] == pytest.approx((1 / 1 + 2 / 2 + 3 / 4) / 3)  # 0.916666...
  assert res["mINP"] == pytest.approx(3 / 4)
  # Official: (1/3)[(1+1)/2 + (1+1)/2 + (2/3 + 3/4)/2] = (1/3)(2 + 17/24) = 65/72.
  off = ev.evaluate_rank(dist, [3, 9], g_pids, [0, 0], g_cams, max_rank=3, ap="official")
  assert off["mAP"] == pytest.approx(65 / 72)


def test_perfect_and_worst_rankings():
  g_pids = np.array([1, 1, 2, 2])
  g_cams = np.array([1, 1, 1, 1])
  d = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
  res = ev.evaluate_rank(d, [1, 2], g_pids, [0, 0], g_cams, max_rank=4)
  # Query id 1: hits at 1, 2 -> AP 1. Query id 2: hits at 3, 4 -> AP (1/3 + 2/4)/2.
  assert res["mAP"] == pytest.approx((1 + 5 / 12) / 2)
  assert res["mINP"] == pytest.approx((1 + 2 / 4) / 2)
  np.testing.assert_allclose(res["cmc"], [0.5, 0.5, 1, 1])


@pytest.mark.parametrize("call,match", [
    (lambda: ev.evaluate_rank(np.zeros((2, 3)), [1], [1, 2, 3], [0, 0], [1, 1, 1]),
     "q_pids has 1 entries"),
    (lambda: ev.evaluate_rank(np.zeros((2, 3)), [1, 2], [1, 2], [0, 0], [1, 1, 1]),
     "g_pids has 2 entries"),
    (lambda: ev.evaluate_rank(np.zeros(3), [1], [1, 2, 3], [0], [1, 1, 1]), "must be 2-D"),
    (lambda: ev.evaluate_rank(np.array([[0.1, np.nan]]), [1], [1, 2], [0], [1, 1]),
     "contains NaN"),
    (lambda: ev.evaluate_rank(np.zeros((0, 3)), [], [1, 2, 3], [], [1, 1, 1]),
     "empty query set"),
    (lambda: ev.evaluate_rank(np.zeros((2, 0)), [1, 2], [], [0, 0], []), "empty gallery"),
    (lambda: ev.evaluate_rank(np.zeros((1, 2)), [1], [1, 2], [0], [0, 1]),
     "no query has a valid match"),
    (lambda: ev.evaluate_rank(np.zeros((1, 2)), [1], [1, 1], [0], [1, 1], ap="x"), "ap="),
    (lambda: ev.evaluate_rank(np.zeros((1, 2)), [1], [1, 1], [0], [1, 1], max_rank=0),
     "max_rank"),
])
def test_bad_input_one_line_errors(call, match):
  with pytest.raises(EvaluationError, match=match) as info:
    call()
  assert "\n" not in str(info.value)
  assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------- CUHK03 single-shot


def ref_cuhk03(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, num_repeats, seed):
  """Loop with the documented draw: priorities from rng.random((Q, G)) per draw."""
  rng = np.random.default_rng(seed)
  nq, ng = distmat.shape
  total, valid = np.zeros(max_rank), 0
  valid_q = set()
  for _ in range(num_repeats):
    u = rng.random((nq, ng))
    for i in range(nq):
      kept = [g for g in range(ng) if g_pids[g] != -1 and
              not (g_pids[g] == q_pids[i] and g_camids[g] == q_camids[i])]
      chosen = {}
      for g in kept:
        p = g_pids[g]
        if p not in chosen or u[i, g] < u[i, chosen[p]]:
          chosen[p] = g
      if q_pids[i] not in chosen:
        continue
      valid_q.add(i)
      drawn = sorted(chosen.values())
      order = sorted(drawn, key=lambda g: (distmat[i, g], g))
      r = [g_pids[g] for g in order].index(q_pids[i])
      total += np.arange(max_rank) >= r
  valid = len(valid_q)
  return total / (num_repeats * valid)


def test_cuhk03_matches_reference_draws():
  d, qp, gp, qc, gc = planted(11, nq=12, ng=80, nid=6, ties=True)
  res = ev.evaluate_cuhk03(d, qp, gp, qc, gc, max_rank=6, num_repeats=3, seed=5)
  ref = ref_cuhk03(d, qp, gp, qc, gc, 6, 3, 5)
  np.testing.assert_allclose(res["cmc"], ref, atol=1e-12)
  full = ev.evaluate_rank(d, qp, gp, qc, gc, max_rank=6)
  assert res["mAP"] == full["mAP"] and res["num_valid_queries"] == full["num_valid_queries"]
  again = ev.evaluate_cuhk03(d, qp, gp, qc, gc, max_rank=6, num_repeats=3, seed=5)
  np.testing.assert_array_equal(res["cmc"], again["cmc"])  # seeded


def test_cuhk03_one_image_per_identity_equals_market_cmc():
  # One gallery image per identity: every draw is the whole gallery.
  rng = np.random.default_rng(0)
  g_pids = np.arange(1, 21)
  g_cams = np.ones(20, int)
  q_pids = np.arange(1, 21)
  q_cams = np.zeros(20, int)
  d = rng.random((20, 20))
  a = ev.evaluate_cuhk03(d, q_pids, g_pids, q_cams, g_cams, max_rank=10)
  b = ev.evaluate_rank(d, q_pids, g_pids, q_cams, g_cams, max_rank=10)
  np.testing.assert_allclose(a["cmc"], b["cmc"])


def test_cuhk03_hand_expectation():
  # Query id 1 (cam 0). Gallery: id 1 at distances 0.1 and 0.9, id 2 at 0.5.
  # Draw of id 1 picks 0.1 (rank 1) or 0.9 (rank 2) with prob 1/2 each.
  d = np.array([[0.1, 0.9, 0.5]])
  res = ev.evaluate_cuhk03(d, [1], [1, 1, 2], [0], [1, 1, 1], max_rank=2, num_repeats=4000)
  assert res["cmc"][0] == pytest.approx(0.5, abs=0.03)
  assert res["cmc"][1] == 1.0


# ----------------------------------------------------------------- pooling


def test_pool_queries_mean_and_max():
  emb = np.array([[1., 0.], [3., 2.], [5., 5.], [0., 1.]], np.float32)
  pooled, pids, cams = ev.pool_queries(emb, [7, 7, 8, 7], [0, 0, 0, 1], "mean")
  np.testing.assert_allclose(pooled, [[2, 1], [5, 5], [0, 1]])
  assert pids.tolist() == [7, 8, 7] and cams.tolist() == [0, 0, 1]
  pooled, _, _ = ev.pool_queries(emb, [7, 7, 8, 7], [0, 0, 0, 1], "max")
  np.testing.assert_allclose(pooled, [[3, 2], [5, 5], [0, 1]])


def test_pool_by_tracklet():
  emb = np.arange(12, dtype=np.float32).reshape(6, 2)
  tids = [5, 5, 2, 5, 2, 9]
  pooled, ids, pids, cams = ev.pool_by_tracklet(emb, tids, [1, 1, 3, 1, 3, 4],
                                                [0, 0, 1, 0, 1, 2], "mean")
  assert ids.tolist() == [5, 2, 9] and pids.tolist() == [1, 3, 4] and cams.tolist() == [0, 1, 2]
  np.testing.assert_allclose(pooled, [emb[[0, 1, 3]].mean(0), emb[[2, 4]].mean(0), emb[5]])
  mx, *_ = ev.pool_by_tracklet(emb, tids, [1, 1, 3, 1, 3, 4], [0, 0, 1, 0, 1, 2], "max")
  np.testing.assert_allclose(mx, [emb[3], emb[4], emb[5]])
  with pytest.raises(EvaluationError, match="tracklet 5 mixes person ids"):
    ev.pool_by_tracklet(emb, tids, [1, 2, 3, 1, 3, 4], [0, 0, 1, 0, 1, 2])
  with pytest.raises(EvaluationError, match="method="):
    ev.pool_by_tracklet(emb, tids, [1] * 6, [0] * 6, "median")


def test_video_pipeline_end_to_end():
  # Frames of 2 query and 4 gallery tracklets -> pooled -> ranked.
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 16)).astype(np.float32)
  def frames(pid, n):
    return centers[pid] + 0.05 * rng.normal(size=(n, 16)).astype(np.float32)
  q = np.concatenate([frames(0, 5), frames(1, 4)])
  q_t = [0] * 5 + [1] * 4
  g = np.concatenate([frames(0, 3), frames(1, 6), frames(2, 2), frames(0, 4)])
  g_t = [10] * 3 + [11] * 6 + [12] * 2 + [13] * 4
  g_p = [0] * 3 + [1] * 6 + [2] * 2 + [0] * 4
  qe, _, qp, qc = ev.pool_by_tracklet(q, q_t, [0] * 5 + [1] * 4, [0] * 9)
  ge, _, gp, gc = ev.pool_by_tracklet(g, g_t, g_p, [1] * 15)
  res = ev.evaluate_rank(ev.pairwise_distance(qe, ge), qp, gp, qc, gc, max_rank=4)
  assert res["mAP"] == 1.0 and res["cmc"][0] == 1.0
