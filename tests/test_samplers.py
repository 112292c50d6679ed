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
  with pytest.raises(ValueError, match="at least P=4"):
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
