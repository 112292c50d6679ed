"""Train/eval loaders: determinism, PK structure, resume, sharding, coverage, tfds path."""

import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from reid_jax.data import pipeline as pl
from reid_jax.data import samplers as smp
from reid_jax.data.common import reid_features

H, W = 32, 16  # Small images keep the tests fast.
AUG = {"erasing_prob": 0.5, "cutout_prob": 0.5, "cutout_ramp_steps": 4}


def _source(n_ids: int = 20, video: bool = False, seed: int = 0) -> list:
  """In-memory records: ids 1..n_ids with 2-7 images each, plus 0/-1 ids."""
  rng = np.random.default_rng(seed)
  recs = []
  ids = [p for p in range(1, n_ids + 1) for _ in range(int(rng.integers(2, 8)))]
  for i, pid in enumerate(ids + [0, 0, -1]):
    rec = {"image": rng.integers(0, 256, (24, 12, 3), np.uint8), "person_id": pid,
           "camera_id": int(rng.integers(0, 4)), "file_name": f"{i}.jpg".encode()}
    if video:
      rec["tracklet_id"] = i // 4
      rec["frame_index"] = i % 4
    recs.append(rec)
  return recs


SRC = _source()


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _train(**kw):
  args = dict(P=4, K=3, height=H, width=W, augment=AUG, seed=7)
  args.update(kw)
  return pl.train_loader(SRC, **args)


def test_pk_batches_shapes_and_structure():
  batch = next(_train())
  assert batch["image"].shape == (12, H, W, 3) and batch["image"].dtype == np.float32
  assert batch["person_id"].dtype == np.int32 and batch["camera_id"].dtype == np.int32
  ids = batch["person_id"].reshape(4, 3)
  assert (ids == ids[:, :1]).all() and len(np.unique(ids[:, 0])) == 4
  assert (ids > 0).all()
  # Normalised ImageNet-style: roughly zero-centred, in [-2.2, 2.7].
  assert -2.2 < batch["image"].min() < 0 < batch["image"].max() < 2.7


def test_labels_match_source_records():
  for batch in _take(_train(), 3):
    pass
  spl = smp.PKSampler(smp.read_labels(SRC)["person_id"], P=4, K=3, seed=7)
  idx = spl[2]["index"]
  np.testing.assert_array_equal(batch["person_id"], [SRC[i]["person_id"] for i in idx])
  np.testing.assert_array_equal(batch["camera_id"], [SRC[i]["camera_id"] for i in idx])


def test_deterministic_for_seed():
  _assert_same(_take(_train(), 3), _take(_train(), 3))
  a, b = next(_train()), next(_train(seed=8))
  assert not np.array_equal(a["image"], b["image"])


def test_uint8_output_when_not_normalized():
  batch = next(_train(normalize=False))
  assert batch["image"].dtype == np.uint8
  from reid_jax.data import augment  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(augment.normalize(batch["image"]), next(_train())["image"])


@pytest.mark.parametrize("read_threads", [0, 2])
def test_resume_from_state_matches_uninterrupted(read_threads):
  full = _take(_train(read_threads=read_threads), 6)
  it = _train(read_threads=read_threads)
  _take(it, 3)
  state = it.get_state()
  assert isinstance(state, bytes)
  fresh = _train(read_threads=read_threads)
  fresh.set_state(state)
  assert fresh.position == 3
  _assert_same(_take(fresh, 3), full[3:])
  it.set_state(state)  # Rewinding a used iterator works too.
  _assert_same(_take(it, 3), full[3:])


def test_set_state_rejects_other_sampler():
  it = _train()
  next(it)
  with pytest.raises(ValueError, match="different sampler"):
    _train(seed=1).set_state(it.get_state())


@pytest.mark.parametrize("sampler,kw", [("pk", {}), ("pairs", {"batch_size": 6}),
                                        ("triplets", {"batch_size": 4})])
def test_two_process_shards_concatenate_to_global_batch(sampler, kw):
  glob = _take(_train(sampler=sampler, **kw), 2)
  parts = [_take(_train(sampler=sampler, process_index=i, process_count=2, **kw), 2)
           for i in range(2)]
  for step in range(2):
    for key, value in glob[step].items():
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), value, err_msg=key)


def test_pairs_and_triplets_outputs():
  batch = next(_train(sampler="pairs", batch_size=9))
  assert batch["image_a"].shape == batch["image_b"].shape == (9, H, W, 3)
  assert batch["same"].sum() == 3
  np.testing.assert_array_equal(batch["same"] == 1,
                                batch["person_id_a"] == batch["person_id_b"])
  batch = next(_train(sampler="triplets", batch_size=5))
  assert {"anchor", "positive", "negative", "person_id_anchor", "camera_id_negative"} <= set(batch)
  assert (batch["person_id_anchor"] == batch["person_id_positive"]).all()
  assert (batch["person_id_anchor"] != batch["person_id_negative"]).all()


def _eval(src, **kw):
  args = dict(height=H, width=W, batch_size=16)
  args.update(kw)
  return pl.eval_loader(src, **args)


def test_eval_covers_every_record_once_in_order():
  batches = list(_eval(SRC))
  assert len(batches) == -(-len(SRC) // 16)
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(index[mask], np.arange(len(SRC)))
  assert (index[~mask] == -1).all() and mask.sum() == len(SRC)
  pids = np.concatenate([b["person_id"] for b in batches])
  np.testing.assert_array_equal(pids[mask], [r["person_id"] for r in SRC])
  from reid_jax.data import augment  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(batches[0]["image"][5],
                                augment.normalize(augment.resize(SRC[5]["image"], H, W)))


def test_eval_two_processes_cover_every_record_once():
  parts = [list(_eval(SRC, process_index=i, process_count=2)) for i in range(2)]
  single = list(_eval(SRC))
  for step, glob in enumerate(single):
    for key in glob:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), glob[key])


def test_eval_video_fields():
  src = _source(video=True)
  batch = next(_eval(src))
  np.testing.assert_array_equal(batch["tracklet_id"], [r["tracklet_id"] for r in src[:16]])
  np.testing.assert_array_equal(batch["frame_index"], [r["frame_index"] for r in src[:16]])


def test_workers_give_same_batches_and_resume_across_worker_counts():
  ref = _take(_train(), 5)
  it = _train(worker_count=2)
  try:
    got = _take(it, 3)
    _assert_same(got, ref[:3])
    state = it.get_state()
  finally:
    it.close()
  fresh = _train(worker_count=0)
  fresh.set_state(state)
  _assert_same(_take(fresh, 2), ref[3:])
  del got


def test_eval_with_workers_matches_in_process():
  it = _eval(SRC, worker_count=1)
  try:
    got = list(it)
  finally:
    it.close()
  _assert_same(got, list(_eval(SRC)))
  assert not got[-1]["image"][~got[-1]["mask"]].any()


def test_orbax_checkpoint_roundtrip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain  # pylint: disable=g-import-not-at-top
  full = _take(_train(), 4)
  it = _train()
  _take(it, 2)
  train_state = {"w": np.arange(3.0)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  restored = _train()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    out = mngr.restore(2, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(train_state),
        data=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(out.state["w"], train_state["w"])
  assert restored.position == 2
  _assert_same(_take(restored, 2), full[2:])


# ---------------------------------------------------------------------------
# A real (tiny) tfds array_record dataset: fast label reading and raw decoding.


class _TinyReid(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """24 JPEG records in the shared re-ID schema."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=reid_features())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(24):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (40, 20, 3), np.uint8)).save(buf, format="JPEG")
      buf.seek(0)
      yield i, {"image": buf, "person_id": i // 4 + 1, "camera_id": i % 3,
                "file_name": f"{i}.jpg"}


@pytest.fixture(scope="module")
def tfds_source(tmp_path_factory):
  builder = _TinyReid(data_dir=str(tmp_path_factory.mktemp("tfds")),
                      file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source("train")


def test_read_labels_tfds_fast_path_and_cache(tfds_source):
  expected = {k: np.array([tfds_source[i][k] for i in range(len(tfds_source))])
              for k in ("person_id", "camera_id")}
  labels = smp.read_labels(tfds_source)
  assert sorted(labels) == ["camera_id", "person_id"]
  for k, v in expected.items():
    np.testing.assert_array_equal(labels[k], v)
  data_dir = tfds_source.dataset_info.data_dir
  caches = [f for f in os.listdir(data_dir) if f.startswith("reid_labels.")]
  assert len(caches) == 1
  cached = smp.read_labels(tfds_source)
  for k, v in expected.items():
    np.testing.assert_array_equal(cached[k], v)


def test_tfds_raw_decode_equals_tfds_decode(tfds_source):
  reader = pl.RecordReader(tfds_source)
  assert reader._fast  # pylint: disable=protected-access
  recs = reader.read([3, 0, 17])
  for rec, i in zip(recs, [3, 0, 17]):
    ref = tfds_source[i]
    assert isinstance(rec["image"], bytes)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image"]))), ref["image"])
    assert rec["person_id"] == ref["person_id"] and rec["camera_id"] == ref["camera_id"]
  batch = next(_eval(tfds_source, batch_size=8))
  slow = next(_eval(list(tfds_source[i] for i in range(8)), batch_size=8))
  np.testing.assert_array_equal(batch["image"], slow["image"])


def test_tfds_source_in_worker_processes(tfds_source):
  it = pl.train_loader(tfds_source, P=3, K=2, height=H, width=W, seed=0, worker_count=1)
  try:
    batch = next(it)
  finally:
    it.close()
  ref = next(pl.train_loader(tfds_source, P=3, K=2, height=H, width=W, seed=0))
  _assert_same([batch], [ref])
