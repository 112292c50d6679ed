"""`synthetic_video_reid`: a tiny rendered video re-ID set (tracklets of frames, no download).

The `synthetic_reid` renderer's pedestrians grouped into tracklets, MARS-style: one record
per frame with `tracklet_id` and `frame_index` (`common.reid_features(video=True)`). Every
identity has one tracklet per camera it is seen by (`cameras`), each of a length drawn
uniformly in `frames` (some shorter than a typical T, so padding is exercised); frame j of
a tracklet is the renderer's image j of that (identity, camera). `train` holds identities
1..num_train_ids; each test identity's tracklet on its first camera is a `query`, the
others are `gallery`, which also holds `num_distractors` one-tracklet people with
person_id 0. Tracklet ids count the train tracklets, and the test tracklets (query and
gallery together, as MARS numbers its test tracks), from 0.

It exists so that video training is tested on a second builder besides MARS.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from reid_jax.data import common
from reid_jax.data import synthetic
from reid_jax.data import synthetic_render as sr
from reid_jax.data.synthetic_render import ImageSpec

SPLITS = ("train", "query", "gallery")


@dataclasses.dataclass(eq=False)
class SyntheticVideoConfig(synthetic.SyntheticReidConfig):
  """The renderer's knobs (`SyntheticReidConfig`) plus the tracklet layout."""

  frames: tuple[int, int] = (2, 6)    # min, max frames per tracklet
  cameras: tuple[int, int] = (2, 3)   # min, max cameras (= tracklets) per identity
  num_video_distractors: int = 2      # gallery tracklets of unseen people (person_id 0)


TINY = dict(synthetic.TINY, num_train_ids=8, num_test_ids=6)


@dataclasses.dataclass(frozen=True)
class Tracklet:
  person_id: int
  appearance: int
  camera_id: int
  length: int
  kind: int = sr.KIND_NORMAL


def plan(cfg: SyntheticVideoConfig) -> dict[str, list[tuple[int, Tracklet]]]:
  """{split: [(tracklet_id, Tracklet)]}, deterministic in the config."""
  lo, hi = cfg.frames

  def tracks(pid: int, tag: int) -> list[Tracklet]:
    r = sr.rng_for(cfg, sr.TAG_PLAN, 10 + tag, pid)
    k = int(r.integers(cfg.cameras[0], cfg.cameras[1] + 1))
    cams = np.sort(r.choice(sr.NUM_CAMERAS, k, replace=False))
    return [Tracklet(pid, pid, int(c), int(r.integers(lo, hi + 1))) for c in cams]

  out = {s: [] for s in SPLITS}
  for pid in cfg.train_ids:
    for t in tracks(pid, 0):
      out["train"].append((len(out["train"]), t))
  test_id = 0
  for pid in cfg.test_ids:
    for j, t in enumerate(tracks(pid, 1)):
      out["query" if j == 0 else "gallery"].append((test_id, t))
      test_id += 1
  r = sr.rng_for(cfg, sr.TAG_PLAN, 12)
  first_new = cfg.num_train_ids + cfg.num_test_ids + 1
  for k in range(cfg.num_video_distractors):
    t = Tracklet(0, first_new + k, int(r.integers(sr.NUM_CAMERAS)), int(r.integers(lo, hi + 1)),
                 sr.KIND_DISTRACTOR)
    out["gallery"].append((test_id, t))
    test_id += 1
  return out


class SyntheticVideoReid(common.ReidBuilder):
  """Rendered pedestrians as tracklets on 6 cameras; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  HAS_DISTRACTORS_AND_JUNK = True
  BUILDER_CONFIGS = [
      SyntheticVideoConfig(name="tiny", description="8 train / 6 test ids, tracklets of "
                           "2-6 frames at 64x32, for tests.", **TINY),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "tiny"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=common.reid_features(video=True))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    layout = plan(self.builder_config)
    return {split: self._generate_examples(layout[split]) for split in SPLITS}

  def _generate_examples(self, tracklets: list[tuple[int, Tracklet]]):
    cfg = self.builder_config
    for tid, t in tracklets:
      for f in range(t.length):
        spec = ImageSpec(t.person_id, t.appearance, t.camera_id, f, t.kind)
        name = f"{max(t.person_id, 0):04d}C{t.camera_id + 1}T{tid:04d}F{f + 1:03d}.png"
        yield name, {"image": common.encode_png(sr.render(cfg, spec)),
                     "person_id": t.person_id, "camera_id": t.camera_id,
                     "file_name": name, "tracklet_id": tid, "frame_index": f}
