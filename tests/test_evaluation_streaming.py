"""evaluate_rank_streaming == evaluate_rank on the full matrix; distances; TTA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import evaluation as ev
from reid_jax.evaluation import EvaluationError


def planted_embeddings(seed, nq=37, ng=500, nid=25, ncam=4, dim=12, integer=False):
  """Clustered embeddings with ids, cameras, distractors (0) and junk (-1)."""
  rng = np.random.default_rng(seed)
  q_pids = rng.integers(1, nid + 5, nq)  # some ids without gallery matches
  g_pids = rng.integers(1, nid + 1, ng)
  g_pids[rng.random(ng) < 0.2] = 0
  g_pids[rng.random(ng) < 0.1] = -1
  q_camids, g_camids = rng.integers(0, ncam, nq), rng.integers(0, ncam, ng)
  if integer:  # exact float32 arithmetic: lots of exact ties
    centers = rng.integers(-2, 3, (nid + 5, dim))
    q = centers[q_pids] + rng.integers(-1, 2, (nq, dim))
    g = centers[np.maximum(g_pids, 0)] + rng.integers(-1, 2, (ng, dim))
  else:
    centers = rng.normal(size=(nid + 5, dim))
    q = centers[q_pids] + 0.8 * rng.normal(size=(nq, dim))
    g = centers[np.maximum(g_pids, 0)] + 0.8 * rng.normal(size=(ng, dim))
  return (q.astype(np.float32), g.astype(np.float32), q_pids, g_pids, q_camids, g_camids)


def assert_identical(a, b):
  np.testing.assert_array_equal(a["cmc"], b["cmc"])
  assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-12)
  assert a["mINP"] == pytest.approx(b["mINP"], abs=1e-12)
  assert a["num_valid_queries"] == b["num_valid_queries"]


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("integer", [True, False])
def test_streaming_equals_full_matrix(metric, integer):
  q, g, qp, gp, qc, gc = planted_embeddings(0, integer=integer)
  # Same gallery block shape as the stream -> bitwise the same distances, even where
  # rounding happens (cosine of integer vectors) and exact ties abound.
  dist = ev.pairwise_distance(q, g, metric, block_size=128)
  full = ev.evaluate_rank(dist, qp, gp, qc, gc, max_rank=15)
  got = ev.evaluate_rank_streaming(q, g, qp, gp, qc, gc, metric=metric, max_rank=15,
                                   query_block=16, gallery_block=128)
  assert_identical(got, full)


@pytest.mark.parametrize("tile,cands", [(1, 1), (4, 2), (16, 64), (3, 5)])
@pytest.mark.parametrize("heavy_fraction", [0.0, 0.5, 1e9])
def test_filter_settings_never_change_result(tile, cands, heavy_fraction, monkeypatch):
  # tile=1, cands=1: nearly every row overflows; heavy_fraction 0: every query with a
  # candidate takes the exact step; 1e9: none does, overflow pairs are recomputed.
  from reid_jax.evaluation import streaming
  monkeypatch.setattr(streaming, "_HEAVY_FRACTION", heavy_fraction)
  q, g, qp, gp, qc, gc = planted_embeddings(1, integer=True)
  full = ev.evaluate_rank(ev.pairwise_distance(q, g, "sqeuclidean"), qp, gp, qc, gc,
                          max_rank=10, ap="official", per_query=True)
  got = ev.evaluate_rank_streaming(q, g, qp, gp, qc, gc, metric="sqeuclidean", max_rank=10,
                                   ap="official", query_block=8, gallery_block=96, tile=tile,
                                   candidate_tiles=cands, per_query=True)
  assert_identical(got, full)
  np.testing.assert_array_equal(got["first_hit"], full["first_hit"])
  np.testing.assert_allclose(got["AP"], full["AP"], atol=1e-12)


def test_streaming_on_one_device_and_memmap(tmp_path):
  q, g, qp, gp, qc, gc = planted_embeddings(2)
  path = tmp_path / "g.npy"
  np.save(path, g)
  g_mm = np.load(path, mmap_mode="r")
  full = ev.evaluate_rank(ev.pairwise_distance(q, g), qp, gp, qc, gc)
  got = ev.evaluate_rank_streaming(q, g_mm, qp, gp, qc, gc, devices=jax.devices()[:1],
                                   query_block=5, gallery_block=77)
  assert_identical(got, full)
  assert len(jax.devices()) >= 2  # conftest: the default call above used 8 CPU devices
  got = ev.evaluate_rank_streaming(jnp.asarray(q), g, qp, gp, qc, gc)
  assert_identical(got, full)


def test_streaming_bad_input():
  q, g, qp, gp, qc, gc = planted_embeddings(3, nq=4, ng=30)
  with pytest.raises(EvaluationError, match="g_emb has dimension"):
    ev.evaluate_rank_streaming(q, g[:, :5], qp, gp, qc, gc)
  with pytest.raises(EvaluationError, match="g_pids has 29 entries"):
    ev.evaluate_rank_streaming(q, g, qp, gp[:-1], qc, gc)
  bad = g.copy()
  bad[7, 1] = np.nan
  with pytest.raises(EvaluationError, match="g_emb contains NaN"):
    ev.evaluate_rank_streaming(q, bad, qp, gp, qc, gc)
  with pytest.raises(EvaluationError, match="no query has a valid match"):
    ev.evaluate_rank_streaming(q, g, qp + 1000, gp, qc, gc)
  with pytest.raises(EvaluationError, match="empty query set"):
    ev.evaluate_rank_streaming(q[:0], g, qp[:0], gp, qc[:0], gc)


# ----------------------------------------------------------------- distances


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_pairwise_distance_blocks(metric):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(23, 5)), rng.normal(size=(31, 5))
  if metric == "cosine":
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    want = 1 - xn @ yn.T
  else:
    want = ((x[:, None] - y[None]) ** 2).sum(-1)
    want = np.sqrt(want) if metric == "euclidean" else want
  got = ev.pairwise_distance(x, y, metric, block_size=8)
  assert got.dtype == np.float32 and got.shape == (23, 31)
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_array_equal(got, ev.pairwise_distance(x, y, metric, block_size=8))


def test_pairwise_distance_errors():
  with pytest.raises(EvaluationError, match="metric="):
    ev.pairwise_distance(np.ones((2, 2)), np.ones((2, 2)), "l1")
  with pytest.raises(EvaluationError, match="y has dimension 3"):
    ev.pairwise_distance(np.ones((2, 2)), np.ones((2, 3)))
  with pytest.raises(EvaluationError, match="x is empty"):
    ev.pairwise_distance(np.ones((0, 2)), np.ones((2, 2)))


# ----------------------------------------------------------------- TTA


def test_flip_and_ten_crops():
  img = np.arange(2 * 6 * 4 * 3).reshape(2, 6, 4, 3)
  np.testing.assert_array_equal(ev.tta.flip(img)[:, :, 0], img[:, :, 3])
  crops = ev.tta.five_crops(img, (4, 2))
  assert [c.shape for c in crops] == [(2, 4, 2, 3)] * 5
  np.testing.assert_array_equal(crops[0], img[:, :4, :2])
  np.testing.assert_array_equal(crops[1], img[:, :4, 2:])
  np.testing.assert_array_equal(crops[2], img[:, 2:, :2])
  np.testing.assert_array_equal(crops[3], img[:, 2:, 2:])
  np.testing.assert_array_equal(crops[4], img[:, 1:5, 1:3])
  ten = ev.tta.ten_crops(img, (4, 2))
  assert len(ten) == 10
  np.testing.assert_array_equal(ten[7], crops[2][:, :, ::-1])
  with pytest.raises(EvaluationError, match="does not fit"):
    ev.tta.five_crops(img, (7, 2))


def test_tta_embed_averages_views_under_jit():
  img = jnp.asarray(np.random.default_rng(0).random((3, 8, 6, 3)), jnp.float32)
  embed = lambda x: x.reshape(x.shape[0], -1)[:, :4] * 2.0
  got = jax.jit(lambda x: ev.tta.tta_embed(embed, x, "flip"))(img)
  want = (embed(img) + embed(img[:, :, ::-1])) / 2
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got10 = ev.tta.tta_embed(embed, img, "ten_crop", out_hw=(6, 4))
  want10 = np.mean([embed(v) for v in ev.tta.ten_crops(img, (6, 4))], axis=0)
  np.testing.assert_allclose(got10, want10, rtol=1e-6)
  with pytest.raises(EvaluationError, match="out_hw"):
    ev.tta.tta_embed(embed, img, "ten_crop")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_block_kernel_is_position_independent(metric):
  # The streaming thresholds rely on it: same shapes -> an entry's value does not
  # depend on where its gallery row sits in the block.
  rng = np.random.default_rng(0)
  q = rng.normal(size=(8, 64)).astype(np.float32)
  g = rng.normal(size=(256, 64)).astype(np.float32)
  perm = rng.permutation(256)
  f = jax.jit(lambda a, b: ev.distance.block_distance(a, b, metric))
  np.testing.assert_array_equal(np.asarray(f(q, g[perm])), np.asarray(f(q, g))[:, perm])
