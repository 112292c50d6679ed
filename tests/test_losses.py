"""Triplet losses against brute-force numpy loops over every triplet."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax.losses import (batch_all_triplet_loss, batch_hard_triplet_loss,
                             pairwise_distances)


def _np_dist(x):
  return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))


def _brute_batch_hard(x, pids, margin):
  """For each anchor, loop over all (p, n) pairs and keep the hardest of each."""
  d = _np_dist(x.astype(np.float64))
  losses, active, top1 = [], [], []
  for a in range(len(x)):
    pos = [p for p in range(len(x)) if p != a and pids[p] == pids[a]]
    neg = [n for n in range(len(x)) if pids[n] != pids[a]]
    if not pos or not neg:
      continue
    hp = max(d[a, p] for p in pos)
    hn = min(d[a, n] for n in neg)
    z = hp - hn
    losses.append(np.log1p(np.exp(z)) if margin == "soft" else max(z + margin, 0.0))
    active.append(z + (0.0 if margin == "soft" else margin) > 0)
    others = [j for j in range(len(x)) if j != a]
    nn = min(others, key=lambda j: d[a, j])
    top1.append(pids[nn] == pids[a])
  return np.mean(losses), np.mean(active), np.mean(top1)


def _brute_batch_all(x, pids, margin):
  d = _np_dist(x.astype(np.float64))
  vals = []
  for a, p, n in itertools.product(range(len(x)), repeat=3):
    if a != p and pids[a] == pids[p] and pids[n] != pids[a]:
      z = d[a, p] - d[a, n]
      vals.append(np.log1p(np.exp(z)) if margin == "soft" else max(z + margin, 0.0))
  vals = np.array(vals)
  if margin == "soft":
    return vals.mean()
  return vals[vals > 0].mean()


@pytest.mark.parametrize("margin", ["soft", 0.3])
def test_batch_hard_equals_brute_force(margin):
  rng = np.random.default_rng(0)
  pids = np.repeat(np.arange(6), 4)
  x = rng.normal(size=(24, 8)).astype(np.float32)
  x += 0.8 * rng.normal(size=(6, 8)).astype(np.float32)[pids]
  loss, m = batch_hard_triplet_loss(jnp.asarray(x), jnp.asarray(pids), margin)
  ref_loss, ref_active, ref_top1 = _brute_batch_hard(x, pids, margin)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(m["active"]), ref_active, rtol=1e-6)
  np.testing.assert_allclose(float(m["top1"]), ref_top1, rtol=1e-6)


@pytest.mark.parametrize("margin", ["soft", 0.5])
def test_batch_all_equals_brute_force(margin):
  rng = np.random.default_rng(1)
  pids = np.array([0, 0, 1, 1, 1, 2, 2, 3])
  x = rng.normal(size=(8, 5)).astype(np.float32)
  loss, _ = batch_all_triplet_loss(jnp.asarray(x), jnp.asarray(pids), margin)
  np.testing.assert_allclose(float(loss), _brute_batch_all(x, pids, margin), rtol=1e-5)


def test_batch_hard_mask_excludes_padding():
  rng = np.random.default_rng(2)
  pids = np.repeat(np.arange(4), 3)
  x = rng.normal(size=(12, 4)).astype(np.float32)
  valid = np.ones(12, bool)
  valid[[3, 7]] = False
  loss, _ = batch_hard_triplet_loss(jnp.asarray(x), jnp.asarray(pids), "soft",
                                    jnp.asarray(valid))
  ref, _, _ = _brute_batch_hard(x[valid], pids[valid], "soft")
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_hand_computed_case():
  # 1-D points: id 0 at {0, 1}, id 1 at {3}. Anchor 0: d_ap=1, d_an=3 -> softplus(-2).
  # Anchor 1: d_ap=1, d_an=2 -> softplus(-1). Anchor 2 has no positive (skipped).
  x = jnp.array([[0.0], [1.0], [3.0]])
  loss, m = batch_hard_triplet_loss(x, jnp.array([0, 0, 1]), "soft")
  expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))) / 2
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert float(m["active"]) == 0.0 and float(m["top1"]) == 1.0


def test_distance_gradient_finite_at_zero():
  x = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
  g = jax.grad(lambda e: pairwise_distances(e).sum())(x)
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(np.asarray(pairwise_distances(x)),
                             _np_dist(np.asarray(x)), atol=1e-5)
