"""Samplers, sharding and label reading on in-memory sources."""

import pickle

import numpy as np
import pytest

from reid_jax.data import samplers as smp


def _labels(num_ids: int = 30, seed: int = 0):
  """person_id/camera_id arrays: ids 1..num_ids with 1-9 images, plus junk and distractors."""
  rng = np.random.default_rng(seed)
  pids, cams = [], []
  for pid in range(1, num_ids + 1):
    n = int(rng.integers(1, 10))
    pids += [pid] * n
    cams += list(rng.integers(0, 6, n))
  pids += [0] * 5 + [-1] * 4
  cams += [0] * 9
  order = rng.permutation(len(pids))
  return np.array(pids)[order], np.array(cams)[order]


class _Source:
  """Minimal random-access source: only __len__ and __getitem__."""

  def __init__(self, records):
    self._records = records

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    return self._records[i]


def _records(pids, cams):
  return [{"image": np.zeros((4, 2, 3), np.uint8), "person_id": np.int32(p),
           "camera_id": int(c), "file_name": b"f.jpg", "tracklet_id": i // 3}
          for i, (p, c) in enumerate(zip(pids, cams))]


@pytest.mark.parametrize("wrap", [list, _Source])
def test_read_labels_in_memory(wrap):
  pids, cams = _labels()
  labels = smp.read_labels(wrap(_records(pids, cams)))
  assert sorted(labels) == ["camera_id", "person_id", "tracklet_id"]
  np.testing.assert_array_equal(labels["person_id"], pids)
  np.testing.assert_array_equal(labels["camera_id"], cams)
  assert all(v.dtype == np.int32 for v in labels.values())


def test_pk_structure_and_exclusions():
  pids, _ = _labels()
  s = smp.PKSampler(pids, P=6, K=4, seed=1)
  for step in range(12):
    idx = s[step]["index"]
    assert idx.shape == (24,)
    ids = pids[idx].reshape(6, 4)
    assert (ids == ids[:, :1]).all()            # Blocks of K of one identity.
    assert len(np.unique(ids[:, 0])) == 6       # P distinct identities.
    assert (ids > 0).all()                      # No distractors (0) or junk (-1).


def test_pk_small_identities_use_all_images_then_replacement():
  pids = np.array([1] * 2 + [2] * 10 + [3] * 10)
  s = smp.PKSampler(pids, P=3, K=4, seed=0)
  idx = s[0]["index"].reshape(3, 4)
  row = idx[pids[idx[:, 0]] == 1][0]
  assert set(row) == {0, 1}                       # Both images, then repeats.
  for r in idx[pids[idx[:, 0]] != 1]:
    assert len(set(r)) == 4                       # Enough images: no repeats.


def test_pk_epoch_covers_each_identity_once():
  pids, _ = _labels()
  s = smp.PKSampler(pids, P=6, K=2, seed=3)
  assert s.batches_per_epoch == 5
  firsts = np.concatenate([pids[s[i]["index"][::2]] for i in range(5)])
  assert len(np.unique(firsts)) == 30


def test_pk_deterministic_random_access():
  pids, _ = _labels()
  a = smp.PKSampler(pids, P=6, K=4, seed=5)
  b = smp.PKSampler(pids, P=6, K=4, seed=5)
  order = [7, 0, 3, 7, 12]
  got = [b[i]["index"] for i in order]
  for i, g in zip(order, got):
    np.testing.assert_array_equal(a[i]["index"], g)
  assert not np.array_equal(a[0]["index"], smp.PKSampler(pids, P=6, K=4, seed=6)[0]["index"])
  c = pickle.loads(pickle.dumps(a))
  np.testing.assert_array_equal(c[9]["index"], a[9]["index"])


def test_pk_needs_p_identities():
  with pytest.raises(ValueError, match=r"config.input.P=4: PK sampling needs at least P "
                                       r"identities .* which has 2; lower --config.input.P"):
    smp.PKSampler(np.array([1, 1, 2, 2, 0]), P=4, K=2, seed=0)


def test_sequential_covers_every_record_once_with_padding():
  s = smp.SequentialSampler(10, 4)
  assert s.num_batches == 3
  batches = [s[i]["index"] for i in range(3)]
  np.testing.assert_array_equal(np.concatenate(batches), list(range(10)) + [-1, -1])
  with pytest.raises(IndexError):
    s[3]  # pylint: disable=pointless-statement


def test_pairs_ratio_and_validity():
  pids, cams = _labels()
  s = smp.PairSampler(pids, cams, batch_size=12, neg_per_pos=2.0, seed=0)
  for step in range(10):
    plan = s[step]
    a, b = plan["index"].T
    same = plan["same"].astype(bool)
    assert same.sum() == 4                       # 2:1 negatives to positives.
    np.testing.assert_array_equal(pids[a] == pids[b], same)
    assert (a != b).all()
    assert (pids[a] > 0).all() and (pids[b] > 0).all()
    for x, y in zip(a[same], b[same]):
      other_cam = (pids == pids[x]) & (cams != cams[x])
      if other_cam.any():
        assert cams[y] != cams[x]                # Other camera preferred.


def test_pairs_anchor_epoch_and_determinism():
  pids, cams = _labels()
  s = smp.PairSampler(pids, cams, batch_size=10, seed=4, neg_per_pos=1.0)
  pool = [i for i in range(len(pids)) if pids[i] > 0 and (pids == pids[i]).sum() >= 2]
  n_batches = len(pool) // 10
  anchors = np.concatenate([s[i]["index"][:, 0] for i in range(n_batches)])
  assert len(np.unique(anchors)) == len(anchors)  # No repeats within an epoch.
  assert set(anchors) <= set(pool)
  s2 = smp.PairSampler(pids, cams, batch_size=10, seed=4, neg_per_pos=1.0)
  np.testing.assert_array_equal(s2[3]["index"], s[3]["index"])


def test_triplets_validity():
  pids, cams = _labels()
  s = smp.TripletSampler(pids, cams, batch_size=16, seed=2)
  for step in range(10):
    a, p, n = s[step]["index"].T
    assert (pids[a] == pids[p]).all() and (a != p).all()
    assert (pids[a] != pids[n]).all()
    assert (pids[n] > 0).all()


@pytest.mark.parametrize("count", [2, 3])
def test_shard_batch_concatenates_to_global(count):
  pids, cams = _labels()
  s = smp.PairSampler(pids, cams, batch_size=12, seed=0)
  plan = s[5]
  parts = [smp.shard_batch(plan, i, count) for i in range(count)]
  for key in plan:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), plan[key])
  with pytest.raises(ValueError, match="divisible"):
    smp.process_slice(12, 0, 5)


# ---------------------------------------------------------------------------
# ShuffleSampler and the PairSampler ratio schedule, against independent references.


def _shuffle_reference(pids, batch_size, seed, step, min_person_id=1):
  """Batch `step` recomputed by brute force: epoch e's order is the pool (eligible
  records in index order) permuted by default_rng([tag, seed, e]), epochs concatenated."""
  pool = np.array([i for i in range(len(pids)) if pids[i] >= min_person_id])
  out = []
  for pos in range(step * batch_size, (step + 1) * batch_size):
    epoch, offset = divmod(pos, len(pool))
    perm = np.random.default_rng([0x736801, seed, epoch]).permutation(len(pool))
    out.append(pool[perm[offset]])
  return np.array(out, np.int64)


def test_shuffle_epoch_covers_each_eligible_record_once():
  pids, _ = _labels()
  eligible = np.flatnonzero(pids > 0)
  s = smp.ShuffleSampler(pids, batch_size=7, seed=3)
  assert s.batches_per_epoch == -(-len(eligible) // 7)
  assert s.num_identities == len(np.unique(pids[eligible]))
  batches = [s[i]["index"] for i in range(s.batches_per_epoch)]
  assert all(b.shape == (7,) and b.dtype == np.int64 for b in batches)
  stream = np.concatenate(batches)
  np.testing.assert_array_equal(np.sort(stream[:len(eligible)]), eligible)  # Once each.
  assert (pids[stream] > 0).all()                  # Never distractors (0) or junk (-1).


def test_shuffle_batches_span_epoch_boundaries():
  pids = np.array([3, 0, 1, -1, 2, 2, 1, 0, 3, 4])     # 7 eligible records.
  eligible = {0, 2, 4, 5, 6, 8, 9}
  s = smp.ShuffleSampler(pids, batch_size=3, seed=11)
  assert s.batches_per_epoch == 3 and s.num_identities == 4
  stream = np.concatenate([s[i]["index"] for i in range(7)])  # 21 positions = 3 epochs.
  for e in range(3):
    assert set(stream[7 * e:7 * (e + 1)]) == eligible         # Each epoch once each.
    assert len(set(stream[7 * e:7 * (e + 1)])) == 7
  # Batch 2 holds the last position of epoch 0 and the first two of epoch 1.
  np.testing.assert_array_equal(s[2]["index"], stream[6:9])
  assert not np.array_equal(stream[:7], stream[7:14])          # Epochs reshuffled.


@pytest.mark.parametrize("step", [0, 1, 4, 9, 23])
def test_shuffle_matches_brute_force_reference(step):
  pids, _ = _labels()
  s = smp.ShuffleSampler(pids, batch_size=32, seed=5)
  np.testing.assert_array_equal(s[step]["index"], _shuffle_reference(pids, 32, 5, step))
  s2 = smp.ShuffleSampler(pids, batch_size=32, seed=5, min_person_id=0)
  np.testing.assert_array_equal(s2[step]["index"], _shuffle_reference(pids, 32, 5, step, 0))
  assert (pids[s2[step]["index"]] >= 0).all()


def test_shuffle_deterministic_and_seeded():
  pids, _ = _labels()
  a = smp.ShuffleSampler(pids, batch_size=16, seed=2)
  b = smp.ShuffleSampler(pids, batch_size=16, seed=2)
  order = [6, 0, 3, 6, 15]
  got = [b[i]["index"] for i in order]             # Any access order, same batches.
  for i, g in zip(order, got):
    np.testing.assert_array_equal(a[i]["index"], g)
  assert not np.array_equal(a[0]["index"],
                            smp.ShuffleSampler(pids, batch_size=16, seed=3)[0]["index"])
  c = pickle.loads(pickle.dumps(a))
  np.testing.assert_array_equal(c[8]["index"], a[8]["index"])
  assert repr(a) == repr(b) != repr(smp.ShuffleSampler(pids, batch_size=16, seed=3))
  pool = int((pids > 0).sum())
  assert repr(a) == (f"ShuffleSampler(num_records={len(pids)}, pool={pool}, "
                     "batch_size=16, seed=2, min_person_id=1)")


def test_shuffle_rejects_empty_pool_and_bad_batch():
  with pytest.raises(ValueError, match="no records"):
    smp.ShuffleSampler(np.array([0, -1, 0]), batch_size=2, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    smp.ShuffleSampler(np.array([1, 2]), batch_size=0, seed=0)
  with pytest.raises(IndexError):
    _ = smp.ShuffleSampler(np.array([1, 2]), batch_size=1, seed=0)[-1]


def test_pairs_ratio_schedule_counts():
  pids, cams = _labels()
  # 1:1 -> 1:4 over 10 steps, B = 20. r(step) = 1 + 3 * step / 10 by hand:
  expected = {0: 10,    # r = 1.0: 20 / 2.0 = 10
              3: 7,     # r = 1.9: 20 / 2.9 = 6.90
              5: 6,     # r = 2.5: 20 / 3.5 = 5.71
              8: 5,     # r = 3.4: 20 / 4.4 = 4.55
              10: 4,    # r = 4.0: 20 / 5.0 = 4
              37: 4}    # After the ramp: stays at r = 4.
  s = smp.PairSampler(pids, cams, batch_size=20, seed=1, neg_per_pos=1.0,
                      neg_per_pos_end=4.0, neg_ramp_steps=10)
  assert s.num_positive == 10
  for step, n in expected.items():
    plan = s[step]
    a, b = plan["index"].T
    assert plan["same"].sum() == n, step
    np.testing.assert_array_equal(pids[a] == pids[b], plan["same"].astype(bool))
  np.testing.assert_allclose([s.ratio(k) for k in (0, 3, 5, 8, 10, 37)],
                             [1.0, 1.9, 2.5, 3.4, 4.0, 4.0])
  assert "neg_per_pos_end=4.0" in repr(s) and "neg_ramp_steps=10" in repr(s)


def test_pairs_schedule_keeps_a_positive_and_default_is_unchanged():
  pids, cams = _labels()
  s = smp.PairSampler(pids, cams, batch_size=4, seed=0, neg_per_pos=1.0,
                      neg_per_pos_end=20.0, neg_ramp_steps=2)
  assert s[5]["same"].sum() == 1                   # round(4 / 21) = 0, kept at 1.
  plain = smp.PairSampler(pids, cams, batch_size=12, seed=3, neg_per_pos=2.0)
  flat = smp.PairSampler(pids, cams, batch_size=12, seed=3, neg_per_pos=2.0,
                         neg_per_pos_end=2.0, neg_ramp_steps=5)
  assert plain.ratio(0) == plain.ratio(100) == 2.0
  assert repr(plain) == ("PairSampler(num_records=" + str(len(pids)) + ", batch_size=12, "
                         "neg_per_pos=2.0, seed=3, min_person_id=1)")
  for step in (0, 4, 9):                           # A flat schedule samples the same pairs.
    for key in ("index", "same"):
      np.testing.assert_array_equal(plain[step][key], flat[step][key])


def test_train_loader_shuffle_and_pair_schedule():
  from reid_jax.data import pipeline as pl  # pylint: disable=g-import-not-at-top
  pids, cams = _labels(num_ids=12)
  src = _records(pids, cams)                       # In-memory list of dicts.
  it = pl.train_loader(src, sampler="shuffle", batch_size=8, height=8, width=4, seed=2)
  batches = [next(it) for _ in range(3)]
  ref = smp.ShuffleSampler(pids, batch_size=8, seed=2)
  for step, batch in enumerate(batches):
    assert sorted(batch) == ["camera_id", "image", "person_id"]
    assert batch["image"].shape == (8, 8, 4, 3) and batch["image"].dtype == np.float32
    assert batch["person_id"].shape == batch["camera_id"].shape == (8,)
    assert batch["person_id"].dtype == batch["camera_id"].dtype == np.int32
    idx = ref[step]["index"]
    np.testing.assert_array_equal(batch["person_id"], pids[idx])
    np.testing.assert_array_equal(batch["camera_id"], cams[idx])
  assert "ShuffleSampler(" in it.get_state().decode()
  with pytest.raises(ValueError, match="needs batch_size"):
    pl.train_loader(src, sampler="shuffle", height=8, width=4)
  with pytest.raises(ValueError, match="'shuffle'"):
    pl.train_loader(src, sampler="nope", height=8, width=4)
  it = pl.train_loader(src, sampler="pairs", batch_size=10, neg_per_pos=1.0,
                       neg_per_pos_end=4.0, neg_ramp_steps=2, height=8, width=4, seed=0)
  assert [int(next(it)["same"].sum()) for _ in range(3)] == [5, 3, 2]  # r = 1, 2.5, 4.
