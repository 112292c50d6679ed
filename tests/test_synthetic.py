"""Tests of the embedded `synthetic_reid` dataset: determinism, split layout, tfds loading."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from reid_jax.data import common
from reid_jax.data import synthetic
from reid_jax.data import synthetic_render as sr

CONFIGS = {c.name: c for c in synthetic.SyntheticReid.BUILDER_CONFIGS}
DEFAULT, TINY = CONFIGS["default"], CONFIGS["tiny"]


def _png(cfg: synthetic.SyntheticReidConfig, spec: sr.ImageSpec) -> bytes:
  return common.encode_png(sr.render(cfg, spec)).getvalue()


def _expected_sizes(cfg: synthetic.SyntheticReidConfig) -> dict[str, int]:
  return {
      "train": cfg.num_train_ids * cfg.images_per_train_id,
      "query": cfg.num_test_ids * cfg.queries_per_test_id,
      "gallery": cfg.num_test_ids * cfg.gallery_per_test_id + cfg.num_distractors + cfg.num_junk,
  }


def test_render_is_deterministic_and_seeded():
  specs = [sr.ImageSpec(3, 3, 1, 0), sr.ImageSpec(3, 3, 4, 2), sr.ImageSpec(0, 40, 5, 0, sr.KIND_DISTRACTOR),
           sr.ImageSpec(-1, 17, 2, 1, sr.KIND_JUNK)]
  first = [_png(DEFAULT, s) for s in specs]
  again = [_png(DEFAULT, s) for s in reversed(specs)][::-1]  # order does not matter
  assert first == again
  other_seed = dataclasses.replace(DEFAULT, name="seed1", seed=1)
  assert all(_png(other_seed, s) != b for s, b in zip(specs, first))
  assert len(set(first)) == len(first)
  img = sr.render(DEFAULT, specs[0])
  assert img.shape == (DEFAULT.height, DEFAULT.width, 3) and img.dtype == np.uint8
  assert sr.render(TINY, specs[0]).shape == (TINY.height, TINY.width, 3)


def test_worker_pool_renders_the_same_bytes_in_order(monkeypatch):
  specs = synthetic.split_specs(TINY, "gallery")[:40]
  monkeypatch.setattr(synthetic, "MIN_IMAGES_FOR_POOL", 1)
  monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 2)
  pooled = [f.getvalue() for f in synthetic._render_pngs(TINY, specs)]
  assert pooled == [_png(TINY, s) for s in specs]


def test_split_plan_is_deterministic():
  for split in synthetic.SPLITS:
    assert synthetic.split_specs(DEFAULT, split) == synthetic.split_specs(DEFAULT, split)


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_split_layout(name):
  cfg = CONFIGS[name]
  specs = {s: synthetic.split_specs(cfg, s) for s in synthetic.SPLITS}
  assert {s: len(v) for s, v in specs.items()} == _expected_sizes(cfg) == synthetic.split_sizes(cfg)
  train, query, gallery = specs["train"], specs["query"], specs["gallery"]
  for s in train + query + gallery:
    assert 0 <= s.camera_id < 6

  # Train: ids 1..N, each with images_per_train_id images over >= 2 cameras.
  train_ids = collections.Counter(s.person_id for s in train)
  assert sorted(train_ids) == list(range(1, cfg.num_train_ids + 1))
  assert set(train_ids.values()) == {cfg.images_per_train_id}
  for pid in train_ids:
    cams = {s.camera_id for s in train if s.person_id == pid}
    assert cfg.train_cameras[0] <= len(cams) <= cfg.train_cameras[1]

  # Test ids: disjoint from train, N+1..N+M.
  test_ids = sorted({s.person_id for s in query})
  assert test_ids == list(range(cfg.num_train_ids + 1, cfg.num_train_ids + cfg.num_test_ids + 1))
  assert not set(test_ids) & set(train_ids)
  assert {s.person_id for s in gallery} == set(test_ids) | {0, -1}

  # Queries: one per (id, camera) on queries_per_test_id cameras.
  assert len({(s.person_id, s.camera_id) for s in query}) == len(query)
  assert set(collections.Counter(s.person_id for s in query).values()) == {cfg.queries_per_test_id}

  # Gallery: gallery_per_test_id images per test id over >= 2 cameras, covering every
  # query camera; each query has a true match in another camera and same-camera junk.
  per_id = collections.defaultdict(list)
  for s in gallery:
    if s.person_id > 0:
      per_id[s.person_id].append(s)
  assert {len(v) for v in per_id.values()} == {cfg.gallery_per_test_id}
  gallery_keys = {(s.appearance, s.camera_id, s.index, s.kind) for s in gallery}
  for q in query:
    cams = {s.camera_id for s in per_id[q.person_id]}
    assert cfg.test_cameras[0] <= len(cams) <= cfg.test_cameras[1]
    assert cams - {q.camera_id}, "no cross-camera match"
    assert q.camera_id in cams, "no same-camera junk"
    assert (q.appearance, q.camera_id, q.index, q.kind) not in gallery_keys  # distinct images

  # Distractors (unseen people) and junk (occluded crops of test ids).
  distractors = [s for s in gallery if s.person_id == 0]
  junk = [s for s in gallery if s.person_id == -1]
  assert len(distractors) == cfg.num_distractors and len(junk) == cfg.num_junk
  assert all(s.kind == sr.KIND_DISTRACTOR and s.appearance > max(test_ids) for s in distractors)
  assert len({s.appearance for s in distractors}) == cfg.num_distractors
  assert all(s.kind == sr.KIND_JUNK and s.appearance in test_ids for s in junk)


def test_config_validation():
  with pytest.raises(common.ReidDataError, match="test_cameras"):
    dataclasses.replace(TINY, name="bad", test_cameras=(1, 3))
  with pytest.raises(common.ReidDataError, match="palette_size"):
    dataclasses.replace(TINY, name="bad", palette_size=99)
  with pytest.raises(common.ReidDataError, match="unknown split"):
    synthetic.split_specs(TINY, "test")


def test_tiny_prepares_and_loads_with_data_source(tmp_path):
  sources = {s: tfds.data_source("synthetic_reid/tiny", split=s, data_dir=str(tmp_path))
             for s in synthetic.SPLITS}
  assert {s: len(v) for s, v in sources.items()} == _expected_sizes(TINY)
  for split, src in sources.items():
    recs = [src[i] for i in range(len(src))]
    specs = synthetic.split_specs(TINY, split)
    assert sorted((int(r["person_id"]), int(r["camera_id"])) for r in recs) == sorted(
        (s.person_id, s.camera_id) for s in specs)
    names = [r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"] for r in recs]
    assert len(set(names)) == len(names)
    for r in recs[:5]:
      assert r["image"].shape == (TINY.height, TINY.width, 3) and r["image"].dtype == np.uint8
  # Stored images are exactly the rendered ones (PNG is lossless).
  rec = sources["query"][0]
  name = rec["file_name"].decode() if isinstance(rec["file_name"], bytes) else rec["file_name"]
  position = int(name.rsplit("_", 1)[1].split(".")[0])
  spec = synthetic.split_specs(TINY, "query")[position]
  np.testing.assert_array_equal(rec["image"], sr.render(TINY, spec))
  builder = tfds.builder("synthetic_reid/tiny", data_dir=str(tmp_path))
  assert builder.info.file_format.value == "array_record" and builder.HAS_DISTRACTORS_AND_JUNK
