"""Augmentations against hand-computed cases."""

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from reid_jax.data import augment as aug


def _ramp_2x2() -> np.ndarray:
  """2x2 RGB image whose columns are 0 and 100 in every channel."""
  img = np.zeros((2, 2, 3), np.uint8)
  img[:, 1] = 100
  return img


def _draws(seed: int, *highs: int) -> list[int]:
  """The integers a fresh default_rng(seed) gives for successive integers(0, high)."""
  r = np.random.default_rng(seed)
  return [int(r.integers(0, h)) for h in highs]


def test_resize_bilinear_hand_computed():
  # PIL bilinear upsampling 2 -> 4 samples at x = 0.25, 0.75, 1.25, 1.75 (pixel
  # centres at 0.5, 1.5) with edge renormalisation: 0, 25, 75, 100.
  out = aug.resize(_ramp_2x2(), 2, 4)
  assert out.shape == (2, 4, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(out[..., 0], [[0, 25, 75, 100]] * 2, atol=1)
  assert (out[..., 0] == out[..., 2]).all()


def test_resize_float_image_stays_float():
  img = _ramp_2x2().astype(np.float32) / 100
  out = aug.resize(img, 2, 4)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, :, 0], [0, 0.25, 0.75, 1.0], atol=1e-6)


def test_resize_accepts_encoded_bytes():
  img = np.random.default_rng(0).integers(0, 256, (8, 4, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  np.testing.assert_array_equal(aug.resize(buf.getvalue(), 16, 8), aug.resize(img, 16, 8))


@pytest.mark.parametrize("seed", range(6))
def test_resize_random_crop_hand_computed(seed):
  # scale 2: the 2x2 ramp becomes 4x4 with columns v = 0, 25, 75, 100; a 2x2 crop at
  # (top, left) (top drawn first, each in 0..2) is [v[left], v[left + 1]] on each row.
  top, left = _draws(seed, 3, 3)
  del top
  v = [0, 25, 75, 100]
  out = aug.resize_random_crop(_ramp_2x2(), 2, 2, np.random.default_rng(seed), scale=2.0)
  np.testing.assert_allclose(out[..., 1], [[v[left], v[left + 1]]] * 2, atol=1)


def test_resize_random_crop_matches_resize_then_slice():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (128, 64, 3), np.uint8)
  for seed in range(5):
    top, left = _draws(seed, 288 - 256 + 1, 144 - 128 + 1)
    full = aug.resize(img, 288, 144).astype(int)
    out = aug.resize_random_crop(img, 256, 128, np.random.default_rng(seed))
    assert out.shape == (256, 128, 3)
    # One box resize instead of resize + slice: PIL's fixed-point weights may differ.
    assert np.abs(out - full[top:top + 256, left:left + 128]).max() <= 2


def test_pad_crop_hand_computed():
  img = np.array([[1, 2], [3, 4]], np.uint8)[..., None].repeat(3, -1)
  padded = np.array([[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 0]])
  for seed in range(8):
    top, left = _draws(seed, 3, 3)
    out = aug.pad_crop(img, np.random.default_rng(seed), pad=1)
    np.testing.assert_array_equal(out[..., 0], padded[top:top + 2, left:left + 2])
  np.testing.assert_array_equal(aug.pad_crop(img, np.random.default_rng(0), pad=0), img)


def test_horizontal_flip():
  img = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(aug.horizontal_flip(img, rng, prob=1.0),
                                [[[3, 4, 5], [0, 1, 2]]])
  np.testing.assert_array_equal(aug.horizontal_flip(img, rng, prob=0.0), img)
  np.testing.assert_array_equal(img, np.arange(6).reshape(1, 2, 3))  # Input untouched.
  # prob 0.5 follows the single uniform draw.
  for seed in range(6):
    flipped = np.random.default_rng(seed).random() < 0.5
    out = aug.horizontal_flip(img, np.random.default_rng(seed), prob=0.5)
    np.testing.assert_array_equal(out, img[:, ::-1] if flipped else img)


def test_random_erasing_hand_computed_square():
  # Area fraction 0.16 of 10x10 with aspect 1: a 4x4 square of the fill value.
  img = np.zeros((10, 10, 3), np.uint8)
  out = aug.random_erasing(img, np.random.default_rng(3), prob=1.0, area=(0.16, 0.16),
                           aspect=(1.0, 1.0), fill=(7, 8, 9))
  changed = (out != 0).any(-1)
  rows, cols = np.nonzero(changed)
  assert changed.sum() == 16
  assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
  assert (out[changed] == [7, 8, 9]).all()
  assert not img.any()  # Input untouched.


def test_random_erasing_placement_follows_rng():
  img = np.zeros((10, 10, 3), np.uint8)
  r = np.random.default_rng(5)
  r.random(), r.uniform(0.16, 0.16), r.uniform(1.0, 1.0)
  top, left = int(r.integers(0, 7)), int(r.integers(0, 7))
  out = aug.random_erasing(img, np.random.default_rng(5), prob=1.0, area=(0.16, 0.16),
                           aspect=(1.0, 1.0), fill=(1, 1, 1))
  expected = np.zeros((10, 10), bool)
  expected[top:top + 4, left:left + 4] = True
  np.testing.assert_array_equal(out[..., 0] == 1, expected)


def test_random_erasing_mean_fill_random_fill_and_no_op_cases():
  img = np.full((20, 10, 3), 50, np.uint8)
  out = aug.random_erasing(img, np.random.default_rng(0), prob=1.0,
                           fill=aug.IMAGENET_MEAN_UINT8)
  erased = (out != 50).any(-1)
  assert erased.any()
  assert (out[erased] == aug.IMAGENET_MEAN_UINT8).all()
  noisy = aug.random_erasing(img, np.random.default_rng(0), prob=1.0, fill="random")
  assert len(np.unique(noisy[(noisy != 50).any(-1)])) > 10
  np.testing.assert_array_equal(
      aug.random_erasing(img, np.random.default_rng(0), prob=0.0), img)
  # A rectangle that can never fit strictly inside: unchanged after all attempts.
  np.testing.assert_array_equal(
      aug.random_erasing(img, np.random.default_rng(0), prob=1.0, area=(0.99, 0.99),
                         aspect=(1.0, 1.0)), img)


def test_cutout_schedule_hand_computed():
  assert aug.cutout_schedule(0, max_fraction=0.5, ramp_steps=10000) == 0.0
  assert aug.cutout_schedule(5000, max_fraction=0.5, ramp_steps=10000) == 0.25
  assert aug.cutout_schedule(20000, max_fraction=0.5, ramp_steps=10000) == 0.5
  assert aug.cutout_schedule(1000, max_fraction=0.4, ramp_steps=1000, start_step=500) == 0.2
  assert aug.cutout_schedule(100, max_fraction=0.4, ramp_steps=1000, start_step=500) == 0.0
  assert aug.cutout_schedule(3, max_fraction=0.3, ramp_steps=0) == 0.3


def test_progressive_cutout_grows_with_step():
  img = np.zeros((16, 8, 3), np.uint8)
  kw = dict(max_fraction=0.5, ramp_steps=100, prob=1.0)
  np.testing.assert_array_equal(
      aug.progressive_cutout(img, np.random.default_rng(0), 0, **kw), img)
  for seed in range(10):
    out = aug.progressive_cutout(img, np.random.default_rng(seed), 100, **kw)
    rows, cols = np.nonzero((out != 0).any(-1))
    assert len(rows)
    assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 4  # <= 0.5 x side.
  # Half-way through the ramp the sides are at most 0.25 x 16 = 4 and 0.25 x 8 = 2.
  for seed in range(10):
    out = aug.progressive_cutout(img, np.random.default_rng(seed), 50, **kw)
    rows, cols = np.nonzero((out != 0).any(-1))
    if len(rows):
      assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 2


def test_upscale_longer_side():
  img = np.full((2, 1, 3), 9, np.uint8)
  out = aug.upscale_longer_side(img, 8)
  assert out.shape == (8, 4, 3) and (out == 9).all()
  big = np.zeros((20, 10, 3), np.uint8)
  assert aug.upscale_longer_side(big, 8).shape == (20, 10, 3)
  assert aug.upscale_longer_side(big, 8, allow_downscale=True).shape == (8, 4, 3)


def test_resize_keep_aspect_pads_with_fill():
  img = np.full((2, 2, 3), 200, np.uint8)
  out = aug.resize_keep_aspect(img, 4, 2, fill=(1, 2, 3))
  assert out.shape == (4, 2, 3)
  np.testing.assert_array_equal(out[1:3], img)
  np.testing.assert_array_equal(out[0], [[1, 2, 3]] * 2)
  np.testing.assert_array_equal(out[3], [[1, 2, 3]] * 2)


def test_normalize_hand_computed():
  x = np.array([[[0, 255, 124]]], np.uint8)
  expected = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (124 / 255 - 0.406) / 0.225]
  out = aug.normalize(x)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aug.normalize(x.astype(np.float32) / 255)[0, 0], expected,
                             atol=1e-6)


def test_normalize_lookup_equals_arithmetic_on_batches():
  x = np.random.default_rng(0).integers(0, 256, (3, 70, 40, 3), np.uint8)
  scale = (1 / (255 * np.float32(aug.IMAGENET_STD))).astype(np.float32)
  offset = (np.float32(aug.IMAGENET_MEAN) / np.float32(aug.IMAGENET_STD)).astype(np.float32)
  np.testing.assert_array_equal(aug.normalize(x), x.astype(np.float32) * scale - offset)


def test_image_rng_depends_only_on_seed_and_position():
  a = aug.image_rng(7, 123).random(4)
  np.testing.assert_array_equal(a, aug.image_rng(7, 123).random(4))
  assert not np.array_equal(a, aug.image_rng(7, 124).random(4))
  assert not np.array_equal(a, aug.image_rng(8, 123).random(4))


def test_augment_config_options():
  cfg = aug.AugmentConfig.from_options(ml_collections.ConfigDict(
      {"erasing_prob": 0.5, "erasing_area": [0.1, 0.2], "erasing_fill": "mean"}))
  assert cfg.erasing_prob == 0.5 and cfg.erasing_area == (0.1, 0.2)
  assert cfg.erasing_fill_values() == aug.IMAGENET_MEAN_UINT8
  assert aug.AugmentConfig.from_options(None) == aug.AugmentConfig()
  with pytest.raises(ValueError, match="Unknown augment options"):
    aug.AugmentConfig.from_options({"erasing_prb": 0.5})


@pytest.mark.parametrize("as_bytes", [False, True])
def test_train_transform_equals_chained_functions(as_bytes):
  img = np.random.default_rng(0).integers(0, 256, (40, 20, 3), np.uint8)
  src = img
  if as_bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    src = buf.getvalue()
  cfg = aug.AugmentConfig(resize_scale=1.125, pad=3, flip_prob=0.5, erasing_prob=0.7,
                          cutout_prob=0.8, cutout_ramp_steps=10)
  for seed in range(8):
    got = aug.train_transform(src, np.random.default_rng(seed), 32, 16, cfg, step=7)
    r = np.random.default_rng(seed)
    x = aug.resize_random_crop(img, 32, 16, r, scale=1.125)
    x = aug.pad_crop(x, r, 3)
    x = aug.horizontal_flip(x, r, 0.5)
    x = aug.random_erasing(x, r, 0.7, cfg.erasing_area, cfg.erasing_aspect, "random")
    x = aug.progressive_cutout(x, r, 7, max_fraction=0.5, ramp_steps=10, prob=0.8)
    np.testing.assert_array_equal(got, x)


def test_train_transform_plain_resize_and_keep_aspect():
  img = np.random.default_rng(0).integers(0, 256, (40, 20, 3), np.uint8)
  cfg = aug.AugmentConfig(resize_scale=1.0, flip_prob=0.0)
  np.testing.assert_array_equal(
      aug.train_transform(img, np.random.default_rng(0), 32, 16, cfg), aug.resize(img, 32, 16))
  cfg = aug.AugmentConfig(resize_scale=1.0, flip_prob=0.0, keep_aspect=True)
  np.testing.assert_array_equal(
      aug.train_transform(img, np.random.default_rng(0), 32, 32, cfg),
      aug.resize_keep_aspect(img, 32, 32))
