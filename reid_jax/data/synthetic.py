"""`synthetic_reid`: an embedded, procedurally rendered re-ID dataset (no download).

Market-1501-like protocol on 6 cameras: `train` holds identities 1..N_train; `query`
and `gallery` hold the disjoint test identities N_train+1..N_train+N_test. Every test
identity is seen by >= 2 cameras (`test_cameras`); it has one query per camera for
`queries_per_test_id` of its cameras, and `gallery_per_test_id` gallery images spread
over all of its cameras (>= 1 each), so every query has matches in other cameras plus
same-camera images that the evaluation treats as junk. The gallery also holds
`num_distractors` images of unseen people with person_id 0 (half of them badly cropped)
and `num_junk` heavily occluded crops of test identities with person_id -1.

Prepare with `tfds.data_source("synthetic_reid", split="train", data_dir=...)` (or
"synthetic_reid/tiny"); nothing is downloaded. Images are rendered by
`synthetic_render.render` and are identical bytes on every run for a given config.

Difficulty knobs (fields of `SyntheticReidConfig`, all have defaults):
  palette_size: clothing/clutter colours drawn from the first k of 14 palette colours;
    smaller = more identities share colours, colour histograms get weaker.
  colour_jitter: per-identity std of the RGB offset from its palette colour (0..1 units);
    larger makes colour more identity-specific (easier for colour histograms).
  cast_strength: per-camera per-channel gain in 1 +/- cast_strength (colour cast).
  cast_offset: per-camera per-channel additive offset in +/- cast_offset.
  brightness_jitter: per-camera brightness factor in 1 +/- brightness_jitter.
  gamma_jitter: per-camera gamma in exp(+/- gamma_jitter).
  view_bias: extra probability of each camera's dominant view (cameras 0/3 front,
    1/4 back, 2/5 side); 0 = views uniform, 1 = each camera always sees one view.
  crop_jitter: horizontal/vertical placement jitter of the person (fraction of width).
  scale_jitter: relative jitter of the person's height in the crop.
  blur_min, blur_max: per-camera Gaussian blur radius range in pixels at 128 px height.
  noise: maximum per-camera Gaussian noise std (0..1 units; cameras get 30-100% of it).
  background_muting: camera walls, floors and fixtures are palette colours mixed this far
    towards grey (1 = grey scenes; lower = colourful, camera-specific backgrounds).
  clutter: mean number of random palette-coloured rectangles in the background.
  clutter_muting: clutter colours are mixed towards grey by up to this fraction.
  occlusion_prob: probability of a passer-by / object / pole in front of the person.
Image size knobs (off by default: every image is `height` x `width`):
  size_jitter: relative jitter of each image's height, e.g. 0.3 -> heights in
    height * [0.7, 1.3], uniform.
  aspect_range: (min, max) width/height ratio of each image, uniform; None keeps
    width / height. The scene and person are rendered at the drawn size (the person
    scaled to the height), and each size is a pure function of the config and image
    (`synthetic_render.image_size`). Config `varied` is the tiny one with both set.
Changing a knob changes the data: give the modified config a new `name` (or delete the
prepared folder), since tfds reuses a prepared `synthetic_reid/<name>/<version>`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from reid_jax.data import common
from reid_jax.data import synthetic_render as sr
from reid_jax.data.synthetic_render import ImageSpec

SPLITS = ("train", "query", "gallery")


@dataclasses.dataclass(eq=False)
class SyntheticReidConfig(tfds.core.BuilderConfig):
  """Sizes, split layout and difficulty knobs of a `synthetic_reid` variant."""

  seed: int = 0
  height: int = 128
  width: int = 64
  # Split layout. 600 train ids, not fewer: with 300 ids x 16 images (same image count)
  # the README main job reached fused mAP 0.893 instead of 0.921 (benchmarks/RESULTS.md).
  num_train_ids: int = 600
  images_per_train_id: int = 8
  train_cameras: tuple[int, int] = (2, 6)  # min, max cameras per train identity
  num_test_ids: int = 200
  queries_per_test_id: int = 3  # one per camera, on this many of the id's cameras
  gallery_per_test_id: int = 8
  test_cameras: tuple[int, int] = (3, 6)  # min, max cameras per test identity
  num_distractors: int = 300  # person_id 0
  num_junk: int = 100  # person_id -1
  # Difficulty knobs (see the module docstring).
  palette_size: int = 12
  colour_jitter: float = 0.03
  cast_strength: float = 0.2
  cast_offset: float = 0.03
  brightness_jitter: float = 0.1
  gamma_jitter: float = 0.1
  view_bias: float = 0.5
  crop_jitter: float = 0.05
  scale_jitter: float = 0.1
  blur_min: float = 0.0
  blur_max: float = 0.8
  noise: float = 0.02
  background_muting: float = 0.85
  clutter: float = 1.5
  clutter_muting: float = 0.5
  occlusion_prob: float = 0.1
  # Image size knobs (see the module docstring); the defaults keep every image at
  # height x width and draw nothing, so fixed-size configs are unchanged.
  size_jitter: float = 0.0
  aspect_range: tuple[float, float] | None = None

  def __post_init__(self):
    lo, hi = self.train_cameras
    if not 2 <= lo <= hi <= sr.NUM_CAMERAS or self.images_per_train_id < hi:
      raise common.ReidDataError(
          f"synthetic_reid/{self.name}: train_cameras={self.train_cameras} must satisfy "
          f"2 <= min <= max <= {sr.NUM_CAMERAS} and max <= images_per_train_id={self.images_per_train_id}.")
    lo, hi = self.test_cameras
    if not max(2, self.queries_per_test_id) <= lo <= hi <= sr.NUM_CAMERAS or self.gallery_per_test_id < hi:
      raise common.ReidDataError(
          f"synthetic_reid/{self.name}: test_cameras={self.test_cameras} must satisfy "
          f"max(2, queries_per_test_id) <= min <= max <= {sr.NUM_CAMERAS} and "
          f"max <= gallery_per_test_id={self.gallery_per_test_id}.")
    if not 2 <= self.palette_size <= len(sr.PALETTE):
      raise common.ReidDataError(
          f"synthetic_reid/{self.name}: palette_size={self.palette_size} must be in 2..{len(sr.PALETTE)}.")
    if not 0.0 <= self.size_jitter < 1.0:
      raise common.ReidDataError(
          f"synthetic_reid/{self.name}: size_jitter={self.size_jitter} must be in [0, 1).")
    if self.aspect_range is not None and not (
        len(self.aspect_range) == 2 and 0.0 < self.aspect_range[0] <= self.aspect_range[1]):
      raise common.ReidDataError(
          f"synthetic_reid/{self.name}: aspect_range={self.aspect_range} must be (min, max) "
          "width/height ratios with 0 < min <= max, or None.")

  @property
  def train_ids(self) -> range:
    return range(1, self.num_train_ids + 1)

  @property
  def test_ids(self) -> range:
    return range(self.num_train_ids + 1, self.num_train_ids + self.num_test_ids + 1)


TINY = dict(height=64, width=32, num_train_ids=12, images_per_train_id=6, train_cameras=(2, 4),
            num_test_ids=8, queries_per_test_id=2, gallery_per_test_id=5, test_cameras=(2, 4),
            num_distractors=6, num_junk=3)
# The tiny layout with images of varied size and shape: heights 45..83 px, width/height
# 0.3..0.7 (widths 13..58 px), for tests of training on images at their own size.
VARIED = dict(TINY, size_jitter=0.3, aspect_range=(0.3, 0.7))


def split_sizes(cfg: SyntheticReidConfig) -> dict[str, int]:
  """Number of images per split, in closed form."""
  return {
      "train": cfg.num_train_ids * cfg.images_per_train_id,
      "query": cfg.num_test_ids * cfg.queries_per_test_id,
      "gallery": cfg.num_test_ids * cfg.gallery_per_test_id + cfg.num_distractors + cfg.num_junk,
  }


def _spread(r: np.random.Generator, n_images: int, cams: np.ndarray) -> np.ndarray:
  """Images per camera: one each, the rest at random."""
  return 1 + r.multinomial(n_images - len(cams), np.full(len(cams), 1.0 / len(cams)))


def _cameras(r: np.random.Generator, lo_hi: tuple[int, int]) -> np.ndarray:
  k = int(r.integers(lo_hi[0], lo_hi[1] + 1))
  return np.sort(r.choice(sr.NUM_CAMERAS, k, replace=False))


def split_specs(cfg: SyntheticReidConfig, split: str) -> list[ImageSpec]:
  """The images of a split, in a fixed order (deterministic in the config)."""
  specs = []
  if split == "train":
    for pid in cfg.train_ids:
      r = sr.rng_for(cfg, sr.TAG_PLAN, 0, pid)
      cams = _cameras(r, cfg.train_cameras)
      for cam, n in zip(cams, _spread(r, cfg.images_per_train_id, cams)):
        specs += [ImageSpec(pid, pid, int(cam), j) for j in range(n)]
    return specs
  if split not in ("query", "gallery"):
    raise common.ReidDataError(f"synthetic_reid: unknown split {split!r}; use one of {SPLITS}.")
  for pid in cfg.test_ids:
    r = sr.rng_for(cfg, sr.TAG_PLAN, 1, pid)
    cams = _cameras(r, cfg.test_cameras)
    query_cams = set(r.choice(cams, cfg.queries_per_test_id, replace=False).tolist())
    for cam, n in zip(cams, _spread(r, cfg.gallery_per_test_id, cams)):
      cam, first = int(cam), int(cam in query_cams)  # image 0 of a query camera is the query
      if split == "query" and first:
        specs.append(ImageSpec(pid, pid, cam, 0))
      elif split == "gallery":
        specs += [ImageSpec(pid, pid, cam, first + j) for j in range(n)]
  if split == "gallery":
    r = sr.rng_for(cfg, sr.TAG_PLAN, 2)
    first_new = cfg.num_train_ids + cfg.num_test_ids + 1  # unseen people
    cams = r.integers(sr.NUM_CAMERAS, size=cfg.num_distractors + cfg.num_junk)
    junk_ids = r.choice(np.asarray(cfg.test_ids), cfg.num_junk)
    specs += [ImageSpec(0, first_new + k, int(cams[k]), 0, sr.KIND_DISTRACTOR) for k in range(cfg.num_distractors)]
    specs += [ImageSpec(-1, int(a), int(c), k, sr.KIND_JUNK)
              for k, (a, c) in enumerate(zip(junk_ids, cams[cfg.num_distractors:]))]
  return specs


def file_name(spec: ImageSpec, position: int) -> str:
  """Market-style name: <pid>_c<camera 1..6>_<position in split>.png."""
  return f"{spec.person_id:04d}_c{spec.camera_id + 1}_{position:06d}.png"


class SyntheticReid(common.ReidBuilder):
  """Procedural pedestrians on 6 cameras, Market-1501 protocol; see the module docstring."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "palette_size 8 -> 12: identities are easier to tell apart for a trained "
               "network; colour-histogram mAP stays ~0.13 (benchmarks/RESULTS.md). "
               "Rendered by one worker process per core.",
  }
  HAS_DISTRACTORS_AND_JUNK = True
  BUILDER_CONFIGS = [
      SyntheticReidConfig(name="default", description="600 train / 200 test ids (+300 distractors, 100 junk) at 128x64."),
      SyntheticReidConfig(name="tiny", description="12 train / 8 test ids at 64x32, for tests.", **TINY),
      SyntheticReidConfig(name="varied", description="The tiny layout at varied sizes: "
                          "heights 64 +/- 30%, width/height 0.3..0.7, for tests.", **VARIED),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=common.reid_features())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    specs = split_specs(cfg, split)
    for i, (spec, png) in enumerate(zip(specs, _render_pngs(cfg, specs))):
      yield i, {
          "image": png,
          "person_id": spec.person_id,
          "camera_id": spec.camera_id,
          "file_name": file_name(spec, i),
      }


# Splits with fewer images than this render in-process (a worker pool costs ~1 s to start).
MIN_IMAGES_FOR_POOL = 256


def _render_png(args: tuple[SyntheticReidConfig, ImageSpec]):
  return common.encode_png(sr.render(*args))


def _render_pngs(cfg: SyntheticReidConfig, specs: list[ImageSpec]) -> Iterator:
  """PNG file objects of `specs`, in order; rendered by one process per core.

  Rendering and encoding are ~70% of the preparation time and every image depends only
  on (cfg, spec), so the bytes do not depend on the number of workers. "spawn" workers,
  because forking a process that has started JAX's threads can deadlock.
  """
  workers = min(os.cpu_count() or 1, 8)
  if workers == 1 or len(specs) < MIN_IMAGES_FOR_POOL:
    yield from (_render_png((cfg, spec)) for spec in specs)
    return
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield from pool.imap(_render_png, [(cfg, spec) for spec in specs], chunksize=32)
