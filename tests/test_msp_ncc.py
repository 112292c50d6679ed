"""The NCC similarity loss of MSP-CNN (reid_jax.methods.msp_cnn.ncc) against a direct
float64 numpy loop written from the definition, plus hand-derived cases."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax.methods.msp_cnn import ncc

EPS = 0.01
_STATIC = ("patch", "row_radius", "pair_chunk")

# Jitted once per shape and setting (eager calls of lax.map would recompile each time).
_r = jax.jit(ncc.best_match_ncc, static_argnames=_STATIC)
_loss = jax.jit(ncc.ncc_loss, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _r_loss(fa, fb, same, margin, *, patch, row_radius, pair_chunk=1):
  """(r, (loss, metrics)). Tests share shapes and pass every argument explicitly (a
  defaulted one is another cache key), so that this compiles only a few times."""
  kw = dict(patch=patch, row_radius=row_radius, pair_chunk=pair_chunk)
  return ncc.best_match_ncc(fa, fb, **kw), ncc.ncc_loss(fa, fb, same, margin=margin, **kw)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _loss_grads(fa, fb, same, margin, *, patch=5, row_radius=2, pair_chunk=1):
  """(loss, (d loss / d fa, d loss / d fb))."""
  return jax.value_and_grad(
      lambda a, b: ncc.ncc_loss(a, b, same, patch=patch, row_radius=row_radius,
                                margin=margin, pair_chunk=pair_chunk)[0],
      argnums=(0, 1))(fa, fb)


# --- the reference: explicit loops over pairs, windows, channels and the search area ---

def ref_ncc(p: np.ndarray, q: np.ndarray, eps: float = EPS) -> float:
  """NCC of two windows, straight from the definition (sample std: divide by N - 1)."""
  n = p.size
  dp = p.ravel() - p.sum() / n
  dq = q.ravel() - q.sum() / n
  std_p = math.sqrt(dp @ dp / (n - 1))
  std_q = math.sqrt(dq @ dq / (n - 1))
  return float(dp @ dq) / ((n - 1) * (std_p + eps) * (std_q + eps))


def ref_pair_response(a: np.ndarray, b: np.ndarray, patch: int, row_radius: int,
                      eps: float = EPS) -> np.ndarray:
  """r [H', W', C] of one pair of [H, W, C] maps."""
  h, w, c = a.shape
  r = np.empty((h - patch + 1, w - patch + 1, c))
  for i in range(h - patch + 1):
    for j in range(w - patch + 1):
      for ch in range(c):
        p = a[i:i + patch, j:j + patch, ch]
        best = -np.inf
        for d in range(-row_radius, row_radius + 1):
          if not 0 <= i + d <= h - patch:
            continue  # outside the map: excluded, not zero-padded
          for j2 in range(w - patch + 1):
            best = max(best, ref_ncc(p, b[i + d:i + d + patch, j2:j2 + patch, ch], eps))
        r[i, j, ch] = best
  return r


def ref_pair_loss(a, b, same, patch, row_radius, margin, eps=EPS) -> float:
  s = ref_pair_response(a, b, patch, row_radius, eps).mean()
  return same * (1.0 - s) + (1 - same) * max(0.0, s - margin)


def ref_all(fa, fb, same, patch, row_radius, margin=0.0, eps=EPS):
  """(r [B, H', W', C], s [B], loss) of the reference."""
  r = np.stack([ref_pair_response(a, b, patch, row_radius, eps) for a, b in zip(fa, fb)])
  s = r.mean(axis=(1, 2, 3))
  losses = [same_ * (1.0 - s_) + (1 - same_) * max(0.0, s_ - margin)
            for s_, same_ in zip(s, same)]
  return r, s, float(np.mean(losses))


def window_self_ncc(f: np.ndarray, patch: int) -> np.ndarray:
  """(std / (std + eps))^2 of every window [B, H', W', C]: NCC(P, P) by hand, since
  sum((P - mean_P)^2) = (N - 1) std_P^2."""
  b, h, w, c = f.shape
  out = np.empty((b, h - patch + 1, w - patch + 1, c))
  for i in range(h - patch + 1):
    for j in range(w - patch + 1):
      std = f[:, i:i + patch, j:j + patch, :].std(axis=(1, 2), ddof=1)
      out[:, i, j, :] = (std / (std + EPS)) ** 2
  return out


def _f32(x) -> jnp.ndarray:
  return jnp.asarray(x, jnp.float32)


def _maps(rng, shape):
  return rng.standard_normal(shape), rng.standard_normal(shape)


# --- values against the reference ---

def test_patch_helpers():
  """extract_patches lays windows out as [..., H', C, W', N] (value u * patch + v);
  patch_stats gives the mean and sample std; z . z of a window is its self-NCC."""
  rng = np.random.default_rng(0)
  f = rng.standard_normal((2, 6, 5, 3))
  p, (mean, std), z = jax.jit(lambda x: (ncc.extract_patches(x, 3),
                                         ncc.patch_stats(ncc.extract_patches(x, 3)),
                                         ncc.normalized_patches(x, patch=3)))(_f32(f))
  p = np.asarray(p)
  assert p.shape == (2, 4, 3, 3, 9)
  want = np.stack([f[:, u:u + 4, v:v + 3, :] for u in range(3) for v in range(3)], -1)
  np.testing.assert_allclose(p, want.transpose(0, 1, 3, 2, 4), atol=1e-6)
  np.testing.assert_allclose(mean, p.mean(-1), atol=1e-6)
  np.testing.assert_allclose(std, p.std(-1, ddof=1), atol=1e-5)
  self_ncc = window_self_ncc(f, 3).transpose(0, 1, 3, 2)
  np.testing.assert_allclose(np.sum(np.asarray(z) ** 2, -1), self_ncc, atol=1e-5)


@pytest.mark.parametrize("shape,patch,row_radius", [
    ((3, 9, 7, 2), 5, 2),
    ((2, 8, 6, 3), 3, 1),
    ((2, 6, 6, 1), 4, 0),
])
def test_matches_numpy_reference(shape, patch, row_radius):
  """r, s and the loss equal the loop reference (random maps, one with ReLU zeros,
  one pair with fb = -fa) for default and non-default patch / row radius."""
  rng = np.random.default_rng(sum(shape) + patch)
  fa, fb = _maps(rng, shape)
  fb[0] = np.maximum(fb[0], 0.0)
  fb[-1] = -fa[-1]
  same = np.arange(shape[0]) % 2
  r_ref, s_ref, loss_ref = ref_all(fa, fb, same, patch, row_radius)
  r, (loss, metrics) = _r_loss(_f32(fa), _f32(fb), _f32(same), 0.0, patch=patch,
                               row_radius=row_radius)
  assert r.shape == r_ref.shape and r.dtype == jnp.float32
  np.testing.assert_allclose(r, r_ref, atol=1e-5)
  np.testing.assert_allclose(np.mean(r, axis=(1, 2, 3)), s_ref, atol=1e-5)
  np.testing.assert_allclose(loss, loss_ref, atol=1e-5)
  pos = same == 1
  np.testing.assert_allclose(metrics["score_pos"], s_ref[pos].mean(), atol=1e-5)
  np.testing.assert_allclose(metrics["score_neg"], s_ref[~pos].mean(), atol=1e-5)
  assert float(metrics["num_pos"]) == pos.sum() and float(metrics["num_neg"]) == (~pos).sum()


def test_margin_and_metrics_without_positives_or_negatives():
  """The hinge margin matches the reference; a batch of only negatives (or positives)
  reports 0 for the missing side, with its count 0, and no NaN."""
  rng = np.random.default_rng(1)
  fa, fb = _maps(rng, (2, 8, 6, 3))
  _, s_ref, _ = ref_all(fa, fb, [0, 0], 3, 1)
  margin = float(s_ref.mean())  # one pair below the margin, one above
  _, _, loss_ref = ref_all(fa, fb, [0, 0], 3, 1, margin=margin)
  a, b = _f32(fa), _f32(fb)
  _, (loss, m) = _r_loss(a, b, jnp.zeros(2), margin, patch=3, row_radius=1)
  np.testing.assert_allclose(loss, loss_ref, atol=1e-5)
  assert float(m["num_pos"]) == 0 and float(m["score_pos"]) == 0.0
  np.testing.assert_allclose(m["score_neg"], s_ref.mean(), atol=1e-5)
  assert float(m["active_neg"]) == 0.5
  _, (_, m) = _r_loss(a, b, jnp.ones(2), 0.0, patch=3, row_radius=1)
  assert float(m["num_neg"]) == 0 and float(m["score_neg"]) == 0.0
  assert float(m["active_neg"]) == 0.0
  assert all(np.isfinite(float(v)) for v in m.values())


# --- gradients against central finite differences of the reference ---

def _fd_grads(fa, fb, same, patch, row_radius, margin, h=1e-6):
  """d loss / d (fa, fb) by central differences of the reference; an element of pair b
  only changes pair b's term (1/B of it), so only that pair is recomputed."""
  n = len(fa)
  grads = (np.zeros_like(fa), np.zeros_like(fb))
  for b in range(n):
    for which, g in enumerate(grads):
      maps = [fa[b].copy(), fb[b].copy()]
      for idx in np.ndindex(maps[which].shape):
        x0 = maps[which][idx]
        maps[which][idx] = x0 + h
        up = ref_pair_loss(*maps, same[b], patch, row_radius, margin)
        maps[which][idx] = x0 - h
        down = ref_pair_loss(*maps, same[b], patch, row_radius, margin)
        maps[which][idx] = x0
        g[b][idx] = (up - down) / (2 * h) / n
  return grads


@pytest.mark.parametrize("shape,patch,row_radius", [((4, 6, 5, 1), 3, 1),
                                                    ((2, 7, 6, 1), 5, 2)])
def test_gradients_match_finite_differences(shape, patch, row_radius):
  """jax.grad of the loss w.r.t. both maps equals central differences of the float64
  reference: a random and a near-copy positive pair, and (with 4 pairs) a random
  negative below the margin (zero gradient) and a near-copy negative above it."""
  rng = np.random.default_rng(7)
  fa, fb = _maps(rng, shape)
  fb[1] = fa[1] + 0.05 * rng.standard_normal(shape[1:])
  same = np.array([1, 1, 0, 0][:shape[0]])
  margin = 0.9
  if shape[0] == 4:
    fb[3] = fa[3] + 0.05 * rng.standard_normal(shape[1:])
    _, s_ref, _ = ref_all(fa, fb, same, patch, row_radius)
    assert s_ref[2] < margin < s_ref[3]  # the case the test is about
  _, (ga, gb) = _loss_grads(_f32(fa), _f32(fb), _f32(same), margin, patch=patch,
                            row_radius=row_radius)
  fd_a, fd_b = _fd_grads(fa, fb, same, patch, row_radius, margin)
  for g, fd in ((ga, fd_a), (gb, fd_b)):
    g = np.asarray(g, np.float64)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-4 * np.abs(fd).max())
    assert np.abs(g[0]).max() > 0 and np.abs(g[1]).max() > 0
  if shape[0] == 4:
    assert np.all(np.asarray(ga[2]) == 0) and np.all(np.asarray(gb[2]) == 0)
    assert np.abs(np.asarray(ga[3])).max() > 0


# --- hand-derived cases ---

def test_identical_maps_give_self_ncc():
  """fb == fa: each window's best match is itself, NCC(P, P) = (std / (std + eps))^2,
  just below 1 because of eps; s is its mean and a positive pair's loss is 1 - s."""
  rng = np.random.default_rng(3)
  fa = rng.standard_normal((2, 9, 7, 3))
  want = window_self_ncc(fa, 5)
  x = _f32(fa)
  r, (loss, m) = _r_loss(x, x, jnp.ones(2), 0.0, patch=5, row_radius=2)
  r = np.asarray(r)
  np.testing.assert_allclose(r, want, atol=1e-5)
  assert np.all(r < 1.0) and np.all(r > 0.9)
  np.testing.assert_allclose(m["score_pos"], want.mean(), atol=1e-5)
  np.testing.assert_allclose(loss, 1.0 - want.mean(), atol=1e-5)


def test_single_window_negated_map_not_zero_padded():
  """Maps of exactly one window (H = W = patch): fb = fa gives +(std/(std+eps))^2 and
  fb = -fa gives -(std/(std+eps))^2 < 0. Every offset d != 0 leaves the map; had it been
  zero-padded, its NCC of 0 would have won the max."""
  rng = np.random.default_rng(4)
  fa = rng.standard_normal((2, 5, 5, 4))
  want = window_self_ncc(fa, 5)
  x = _f32(fa)
  np.testing.assert_allclose(_r(x, x, row_radius=2), want, atol=1e-5)
  r = np.asarray(_r(x, -x, row_radius=2))
  np.testing.assert_allclose(r, -want, atol=1e-5)
  assert np.all(r < -0.9)


def test_constant_maps_give_zero_and_finite_gradients():
  """A constant map has std 0 everywhere: NCC 0 against anything (the numerator is 0),
  and the gradients stay finite (no NaN from the sqrt of a zero variance)."""
  rng = np.random.default_rng(5)
  for shape in ((2, 9, 7, 3), (2, 7, 6, 1)):  # the shapes of other tests: no new compile
    const = jnp.full(shape, 0.3, jnp.float32)
    rand = _f32(rng.standard_normal(shape))
    for fa, fb in ((const, rand), (rand, const), (const, const)):
      if shape[-1] == 3:
        r, (loss, _) = _r_loss(fa, fb, jnp.ones(2), 0.0, patch=5, row_radius=2)
        np.testing.assert_allclose(r, 0.0, atol=1e-5)
        np.testing.assert_allclose(loss, 1.0, atol=1e-5)
        continue
      for same in (jnp.ones(2), jnp.zeros(2), jnp.array([1.0, 0.0])):
        loss, grads = _loss_grads(fa, fb, same, -0.5, patch=5, row_radius=2)
        np.testing.assert_allclose(loss, np.mean(same * 1.0 + (1 - same) * 0.5), atol=1e-5)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_match_outside_row_band_is_not_found():
  """fb holds fa shifted down by 3 rows, so each window's identical copy sits at row
  offset +3: outside row_radius=2 it is not found (r stays below the self-NCC and equals
  the reference); with row_radius=3 it is."""
  rng = np.random.default_rng(6)
  fa = rng.standard_normal((3, 9, 7, 2))
  fb = np.concatenate([rng.standard_normal((3, 3, 7, 2)), fa[:, :-3]], axis=1)
  self_ncc = window_self_ncc(fa, 5)
  a, b = _f32(fa), _f32(fb)
  r2 = np.asarray(_r_loss(a, b, jnp.ones(3), 0.0, patch=5, row_radius=2)[0])
  assert np.all(r2 < self_ncc - 1e-3)
  np.testing.assert_allclose(r2, ref_all(fa, fb, [1] * 3, 5, 2)[0], atol=1e-5)
  r3 = np.asarray(_r(a, b, row_radius=3))
  reach = fa.shape[1] - 5 + 1 - 3  # windows i with i + 3 inside the map
  np.testing.assert_allclose(r3[:, :reach], self_ncc[:, :reach], atol=1e-5)
  assert np.all(r3[:, reach:] < self_ncc[:, reach:] - 1e-3)


# --- configuration errors ---

def test_check_map_size_one_line_error():
  with pytest.raises(ValueError) as e:
    ncc.check_map_size(3, 2, 5, "config.input.height/width")
  msg = str(e.value)
  assert msg == ("config.input.height/width give a Pool1 map of 3x2, smaller than the "
                 "5x5 NCC patch (config.loss.ncc_patch)")
  assert "\n" not in msg
  ncc.check_map_size(5, 5, 5, "config.input.height/width")  # exactly one window: fine
  with pytest.raises(ValueError, match="config.loss.ncc_patch >= 2"):
    ncc.check_map_size(8, 8, 1, "config.input.height/width")
  with pytest.raises(ValueError, match="smaller than the 5x5 NCC patch"):
    ncc.ncc_loss(jnp.zeros((2, 4, 9, 3)), jnp.zeros((2, 4, 9, 3)), jnp.ones(2))
  with pytest.raises(ValueError, match="one shape"):
    ncc.ncc_loss(jnp.zeros((2, 9, 9, 3)), jnp.zeros((2, 9, 8, 3)), jnp.ones(2))


# --- transformations ---

def test_jit_vmap_pmap_and_chunks_agree():
  """jax.vmap of pair_scores over groups of pairs (with a pair_chunk of 2 that leaves a
  remainder of 1 of the 3 pairs) and jax.pmap of the loss over 2 devices give each
  group's jitted values."""
  rng = np.random.default_rng(8)
  fa, fb = (_f32(x) for x in _maps(rng, (6, 9, 7, 2)))  # groups shaped as other tests'
  same = jnp.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
  per_group = [_r_loss(fa[g:g + 3], fb[g:g + 3], same[g:g + 3], 0.0, patch=5,
                       row_radius=2) for g in (0, 3)]
  group = lambda x: x.reshape((2, 3) + x.shape[1:])
  scores = jax.jit(jax.vmap(lambda a, b: ncc.pair_scores(a, b, pair_chunk=2)))
  np.testing.assert_allclose(scores(group(fa), group(fb)),
                             [np.mean(r, axis=(1, 2, 3)) for r, _ in per_group], atol=1e-6)
  pmapped = jax.pmap(lambda a, b, s: ncc.ncc_loss(a, b, s)[0], devices=jax.devices()[:2])
  np.testing.assert_allclose(pmapped(group(fa), group(fb), group(same)),
                             [loss for _, (loss, _) in per_group], atol=1e-6)
