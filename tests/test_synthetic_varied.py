"""`synthetic_reid` images of varied size and aspect ratio (`size_jitter`, `aspect_range`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from reid_jax.data import common
from reid_jax.data import synthetic
from reid_jax.data import synthetic_render as sr

CONFIGS = {c.name: c for c in synthetic.SyntheticReid.BUILDER_CONFIGS}
DEFAULT, TINY, VARIED = CONFIGS["default"], CONFIGS["tiny"], CONFIGS["varied"]


def _specs(cfg: synthetic.SyntheticReidConfig, n: int = 12) -> list[sr.ImageSpec]:
  """A few images of every split and kind (normal, distractor, junk)."""
  gallery = synthetic.split_specs(cfg, "gallery")
  return (synthetic.split_specs(cfg, "train")[:n] + synthetic.split_specs(cfg, "query")[:4]
          + [s for s in gallery if s.kind == sr.KIND_DISTRACTOR][:2]
          + [s for s in gallery if s.kind == sr.KIND_JUNK][:2])


def test_varied_config_is_the_tiny_layout_with_size_knobs():
  assert (VARIED.size_jitter, VARIED.aspect_range) == (0.3, (0.3, 0.7))
  assert (TINY.size_jitter, TINY.aspect_range) == (DEFAULT.size_jitter, DEFAULT.aspect_range) == (
      0.0, None)
  assert synthetic.split_sizes(VARIED) == synthetic.split_sizes(TINY)
  for split in synthetic.SPLITS:  # Same people and cameras: only the sizes differ.
    assert synthetic.split_specs(VARIED, split) == synthetic.split_specs(TINY, split)


def test_varied_sizes_within_bounds():
  specs = _specs(VARIED)
  images = [sr.render(VARIED, s) for s in specs]
  sizes = [img.shape[:2] for img in images]
  assert len(set(sizes)) >= len(specs) // 2  # Clearly not one size.
  for (h, w), spec, img in zip(sizes, specs, images):
    assert img.dtype == np.uint8 and img.shape[2] == 3
    assert (h, w) == sr.image_size(VARIED, spec)
    assert round(64 * 0.7) <= h <= round(64 * 1.3), (h, w)
    assert 0.3 - 1.0 / h <= w / h <= 0.7 + 1.0 / h, (h, w)  # One pixel of rounding.
  ratios = [w / h for h, w in sizes]
  assert max(ratios) - min(ratios) > 0.15 and max(h for h, _ in sizes) - min(
      h for h, _ in sizes) > 10
  # Over many images the draws cover the ranges.
  many = [sr.image_size(VARIED, s) for s in synthetic.split_specs(VARIED, "train")]
  hs = np.array([h for h, _ in many])
  rs = np.array([w / h for h, w in many])
  assert hs.min() <= 50 and hs.max() >= 78 and rs.min() < 0.35 and rs.max() > 0.65


def test_fixed_size_configs_keep_their_size():
  for cfg in (DEFAULT, TINY):
    for spec in _specs(cfg, n=4):
      assert sr.image_size(cfg, spec) == (cfg.height, cfg.width)
  spec = synthetic.split_specs(DEFAULT, "train")[0]
  assert sr.render(DEFAULT, spec).shape == (128, 64, 3)
  # Jitter alone keeps the config's width/height ratio.
  jitter_only = dataclasses.replace(TINY, name="jitter_only", size_jitter=0.25)
  for s in _specs(jitter_only, n=6):
    h, w = sr.image_size(jitter_only, s)
    assert 48 <= h <= 80 and abs(w - h * 0.5) <= 1, (h, w)


def test_varied_sizes_are_deterministic_and_render_at_size():
  specs = _specs(VARIED, n=6)
  first = [common.encode_png(sr.render(VARIED, s)).getvalue() for s in specs]
  again = [common.encode_png(sr.render(VARIED, s)).getvalue() for s in reversed(specs)][::-1]
  assert first == again
  # Size draws have their own stream: the same person and background draws as the
  # fixed-size config, rendered at another size rather than stretched to it.
  same_size = dataclasses.replace(VARIED, name="varied_same", size_jitter=0.0,
                                  aspect_range=(0.5, 0.5))
  spec = specs[0]
  assert sr.image_size(same_size, spec) == (64, 32)
  np.testing.assert_array_equal(sr.render(same_size, spec), sr.render(TINY, spec))
  other_seed = dataclasses.replace(VARIED, name="varied_seed1", seed=1)
  assert [sr.image_size(other_seed, s) for s in specs] != [sr.image_size(VARIED, s) for s in specs]


def test_size_knob_validation():
  with pytest.raises(common.ReidDataError, match="size_jitter=1.5 must be in"):
    dataclasses.replace(TINY, name="bad", size_jitter=1.5)
  with pytest.raises(common.ReidDataError, match="aspect_range=.0.7, 0.3. must be"):
    dataclasses.replace(TINY, name="bad", aspect_range=(0.7, 0.3))


def test_varied_prepares_with_images_at_their_own_size(tmp_path):
  source = tfds.data_source("synthetic_reid/varied", split="query", data_dir=str(tmp_path))
  specs = synthetic.split_specs(VARIED, "query")
  assert len(source) == len(specs)
  shapes = set()
  for i in range(len(source)):
    rec = source[i]
    name = rec["file_name"].decode() if isinstance(rec["file_name"], bytes) else rec["file_name"]
    spec = specs[int(name.rsplit("_", 1)[1].split(".")[0])]
    np.testing.assert_array_equal(rec["image"], sr.render(VARIED, spec))
    shapes.add(rec["image"].shape)
  assert len(shapes) > 5
