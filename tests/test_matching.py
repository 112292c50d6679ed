"""Matching regions: top dimensions, Grad-CAM against hand and finite-difference numbers, figure."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from reid_jax.evaluation import EvaluationError
from reid_jax.evaluation import matching as mt


def _brute_top(q, d, k):
  """Reference: sort indices by (-q_i * d_i, i) with plain Python."""
  p = [float(a) * float(b) for a, b in zip(q, d)]
  order = sorted(range(len(p)), key=lambda i: (-p[i], i))[:k]
  return order, [p[i] for i in order]


def test_top_dimensions_random_against_brute_force():
  rng = np.random.default_rng(0)
  for trial in range(5):
    q, d = rng.normal(size=32), rng.normal(size=32)
    k = [1, 5, 7, 31, 32][trial]
    dims, prods = mt.top_dimensions(q, d, k)
    ref_dims, ref_prods = _brute_top(q, d, k)
    assert dims.tolist() == ref_dims
    np.testing.assert_allclose(prods, ref_prods, rtol=1e-12)


def test_top_dimensions_ties_by_lower_index():
  q = np.array([1.0, 1.0, 1.0, 1.0, -1.0])
  d = np.array([2.0, 3.0, 3.0, 2.0, -3.0])  # products 2, 3, 3, 2, 3
  dims, prods = mt.top_dimensions(q, d, 4)
  assert dims.tolist() == [1, 2, 4, 0] == _brute_top(q, d, 4)[0]
  assert prods.tolist() == [3.0, 3.0, 3.0, 2.0]


@pytest.mark.parametrize("q, d, k, msg", [
    (np.ones((2, 3)), np.ones((2, 3)), 1, "1-D"),
    (np.ones(3), np.ones(4), 1, "equal length"),
    (np.ones(3), np.ones(3), 4, r"\[1, 3\]"),
    (np.ones(3), np.ones(3), 0, r"\[1, 3\]"),
])
def test_top_dimensions_errors(q, d, k, msg):
  with pytest.raises(EvaluationError, match=msg):
    mt.top_dimensions(q, d, k)


# Hand case: A [1, 2, 2, 2]; channel 0 = [[1, 4], [2, 3]] (max at y0 x1),
# channel 1 = [[5, -1], [0, 2]] (max at y0 x0). Head: global max pooling, then W [2, 3].
A_HAND = np.stack([np.array([[1., 4.], [2., 3.]]), np.array([[5., -1.], [0., 2.]])],
                  axis=-1)[None].astype(np.float32)
W_HAND = np.array([[1., -2., -1.],
                   [2., 1., -1.]], np.float32)


def _gmp_linear(a):
  return jnp.max(a, axis=(1, 2)) @ W_HAND


def test_gradcam_hand_computed():
  # d e_k / dA[y, x, c] = W[c, k] at channel c's argmax, 0 elsewhere, so alpha_c = W[c, k] / 4.
  # dim 0: alpha = (1/4, 2/4):   0.25*A0 + 0.5*A1  = [[2.75, 0.5], [0.5, 1.75]]
  # dim 1: alpha = (-2/4, 1/4): -0.5*A0 + 0.25*A1 = [[0.75, -2.25], [-1, -1]] -> ReLU clips
  # dim 2: alpha = (-1/4, -1/4): -(A0 + A1)/4     = [[-1.5, -0.75], [-0.5, -1.25]] -> all 0
  expected = {0: [[2.75, 0.5], [0.5, 1.75]], 1: [[0.75, 0.0], [0.0, 0.0]],
              2: [[0.0, 0.0], [0.0, 0.0]]}
  maps = mt.gradcam_maps(lambda x: jnp.asarray(A_HAND), _gmp_linear, np.zeros((8, 8, 3)),
                         [2, 0, 1])
  assert maps.shape == (3, 2, 2)
  np.testing.assert_allclose(maps, [expected[2], expected[0], expected[1]], atol=1e-6)
  # Per-map [0, 1] scaling; the all-zero map stays zero (no division by zero).
  norm = mt.normalize_maps(maps)
  np.testing.assert_allclose(norm, [expected[2], [[1, 2 / 11], [2 / 11, 7 / 11]],
                                    [[1, 0], [0, 0]]], atol=1e-6)
  assert np.isfinite(norm).all()


def test_gradcam_one_linearisation_for_all_dims():
  calls = {"features": 0, "head": 0}

  def features(x):
    calls["features"] += 1
    return jnp.asarray(A_HAND)

  def head(a):
    calls["head"] += 1
    return _gmp_linear(a)

  mt.gradcam_maps(features, head, np.zeros((8, 8, 3)), [0, 1, 2])
  assert calls == {"features": 1, "head": 1}


def test_gradcam_l2_head_against_finite_differences():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(1, 3, 3, 4))  # continuous values: no ties in the max
  w = rng.normal(size=(4, 5))

  def head_np(x):
    e = x.max(axis=(1, 2)) @ w
    return e / np.linalg.norm(e, axis=-1, keepdims=True)

  def head_jax(x):
    e = jnp.max(x, axis=(1, 2)) @ jnp.asarray(w, jnp.float32)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  eps = 1e-6
  jac = np.zeros((5,) + a.shape[1:])  # [D, h, w, C]
  for idx in np.ndindex(a.shape[1:]):
    step = np.zeros_like(a)
    step[(0,) + idx] = eps
    jac[(slice(None),) + idx] = (head_np(a + step)[0] - head_np(a - step)[0]) / (2 * eps)
  dims = [4, 1, 3]
  alpha = jac[dims].mean(axis=(1, 2))  # [K, C]
  expected = np.maximum(np.einsum("hwc,kc->khw", a[0], alpha), 0.0)
  assert (expected == 0).any() and (expected > 0).any()  # the check covers clipping
  maps = mt.gradcam_maps(lambda x: jnp.asarray(a, jnp.float32), head_jax, np.zeros((4, 4, 3)),
                         dims)
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6)


def test_upsample_bilinear_half_pixel():
  # 1x2 -> 1x4: output centres at x = -0.25, 0.25, 0.75, 1.25 in input pixels; edges clamp.
  np.testing.assert_allclose(mt.upsample(np.array([[[0.0, 1.0]]]), 1, 4),
                             [[[0.0, 0.25, 0.75, 1.0]]], atol=1e-6)
  np.testing.assert_allclose(mt.upsample(np.full((2, 3, 2), 0.5), 6, 4), np.full((2, 6, 4), 0.5),
                             atol=1e-6)
  # Non-integer ratios against PIL's bilinear resize of float images.
  maps = np.random.default_rng(5).normal(size=(2, 3, 5)).astype(np.float32)
  ref = [np.asarray(Image.fromarray(m).resize((12, 7), Image.BILINEAR)) for m in maps]
  np.testing.assert_allclose(mt.upsample(maps, 7, 12), np.stack(ref), atol=1e-5)


def test_jet_ramp():
  np.testing.assert_allclose(mt.jet(np.array([0.0, 0.25, 0.5, 0.75, 1.0])),
                             [[0, 0, 0.5], [0, 0.5, 1], [0.5, 1, 0.5], [1, 0.5, 0], [0.5, 0, 0]])


def test_matching_figure_pixels_and_size(tmp_path):
  h, w = 20, 10
  img = np.full((h, w, 3), 100, np.uint8)
  zero = np.zeros((2, 3, 2))  # stays 0 after scaling -> jet(0) = (0, 0, 0.5)
  const = np.full((2, 3, 2), 0.7)  # scales to 1 -> jet(1) = (0.5, 0, 0)
  path = str(tmp_path / "a" / "b" / "pair.png")
  out = mt.matching_figure(img, img.astype(np.float32) / 255.0, zero, const, [3, 7],
                           [0.2, 0.1], path, similarity=0.5)
  assert out == path
  assert os.listdir(tmp_path / "a" / "b") == ["pair.png"]  # no temporary left behind
  pic = Image.open(path)
  assert pic.size == ((2 + 1) * (w + mt.PAD) + mt.PAD, mt.CAPTION_H + 2 * (h + mt.PAD) + mt.PAD)
  arr = np.asarray(pic.convert("RGB"))
  centre = lambda row, col: tuple(arr[mt.CAPTION_H + mt.PAD + row * (h + mt.PAD) + h // 2,
                                      mt.PAD + col * (w + mt.PAD) + w // 2])
  assert centre(0, 0) == centre(1, 0) == (100, 100, 100)  # the images themselves
  # 0.5 * 100 + 0.5 * 255 * 0.5 = 113.75 -> 114; 0.5 * 100 = 50.
  assert centre(0, 1) == centre(0, 2) == (50, 50, 114)
  assert centre(1, 1) == centre(1, 2) == (114, 50, 50)
  with pytest.raises(EvaluationError, match="one map per dim"):
    mt.matching_figure(img, img, zero[:1], const, [3, 7], [0.2, 0.1], path)


class _TinyConv(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))


class _Head(nn.Module):

  @nn.compact
  def __call__(self, a):
    e = nn.Dense(6)(jnp.max(a, axis=(1, 2)))
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def _numpy_params(module, x, seed):
  """Variables filled with numpy randoms (random init compiles one RNG kernel per shape)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(scale=0.5, size=s.shape), s.dtype), shapes)


def test_matching_regions_end_to_end(tmp_path):
  rng = np.random.default_rng(2)
  query = rng.uniform(size=(16, 8, 3)).astype(np.float32)
  gallery = rng.uniform(size=(24, 12, 3)).astype(np.float32)
  conv, head = _TinyConv(), _Head()
  conv_vars = _numpy_params(conv, jnp.zeros((1, 16, 8, 3)), 3)
  head_vars = _numpy_params(head, jnp.zeros((1, 8, 4, 4)), 4)
  features = jax.jit(lambda x: conv.apply(conv_vars, x))
  embed = jax.jit(lambda a: head.apply(head_vars, a))

  res = mt.matching_regions(features, embed, query, gallery, k=3)
  q = np.asarray(embed(features(query[None])))[0].astype(np.float64)
  d = np.asarray(embed(features(gallery[None])))[0].astype(np.float64)
  ref_dims, ref_prods = _brute_top(q, d, 3)
  assert res["dims"].tolist() == ref_dims
  np.testing.assert_allclose(res["products"], ref_prods, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(res["similarity"], q @ d, rtol=1e-5, atol=1e-7)
  assert res["query_maps"].shape == (3, 16, 8)
  assert res["gallery_maps"].shape == (3, 24, 12)
  for m in (res["query_maps"], res["gallery_maps"]):
    assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
    peaks = m.max(axis=(1, 2))
    assert np.all(np.isclose(peaks, 1.0) | (peaks == 0.0))
  # Same numbers as the step-by-step functions (maps on the 12x6 grid, then upsampled).
  grid = mt.gradcam_maps(features, embed, gallery, res["dims"])
  assert grid.shape == (3, 12, 6)
  np.testing.assert_allclose(res["gallery_maps"], mt.normalize_maps(mt.upsample(grid, 24, 12)),
                             atol=1e-6)

  path = mt.matching_figure(query, gallery, res["query_maps"], res["gallery_maps"], res["dims"],
                            res["products"], str(tmp_path / "fig" / "m.png"),
                            similarity=res["similarity"])
  assert Image.open(path).size == (4 * (8 + mt.PAD) + mt.PAD,
                                   mt.CAPTION_H + 2 * (16 + mt.PAD) + mt.PAD)
