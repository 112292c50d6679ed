"""Tests of the Market-1501 attribute reader, table lookup and fake-file writer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.io

from reid_jax.data import attributes as attr
from reid_jax.data.common import ReidDataError

REAL_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets",
                         "attributes", "market_attribute.mat")

TRAIN_IDS = [2, 7, 10, 11, 12, 20, 22, 23, 1500]
TEST_IDS = [1, 3, 4, 5, 6, 1501]


def _expected(rows: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Sorted ids and 0-based labels of a {id: 1-based vector} dict, computed by hand."""
  ids = sorted(rows)
  return np.asarray(ids), np.stack([np.asarray(rows[i]) - 1 for i in ids])


def _raw_part(ids: list[int], values: np.ndarray, drop: str | None = None) -> dict:
  """A part struct written independently of the module, allowing broken contents."""
  index = np.empty((1, len(ids)), dtype=object)
  for i, pid in enumerate(ids):
    index[0, i] = f"{pid:04d}"
  part = {name: np.asarray(values[:, j], np.uint8).reshape(1, -1)
          for j, name in enumerate(attr.ATTRIBUTES) if name != drop}
  if drop != "image_index":
    part["image_index"] = index
  return part


def _good_values(n: int) -> np.ndarray:
  return np.stack([v for v in attr.synthetic_attributes(range(1, n + 1)).values()])


def _check_one_line(exc: pytest.ExceptionInfo, path: str) -> None:
  msg = str(exc.value)
  assert "\n" not in msg
  assert str(path) in msg


def test_attribute_names_and_classes():
  assert len(attr.ATTRIBUTES) == 27 == len(set(attr.ATTRIBUTES))
  assert attr.num_classes("age") == 4
  assert all(attr.num_classes(a) == 2 for a in attr.ATTRIBUTES if a != "age")
  with pytest.raises(ValueError, match="unknown attribute"):
    attr.num_classes("shoes")


def test_synthetic_attributes_deterministic_and_in_range():
  a = attr.synthetic_attributes([3, 1, 2], seed=5)
  b = attr.synthetic_attributes([2], seed=5)
  np.testing.assert_array_equal(a[2], b[2])  # Depends on (seed, id) only.
  assert not all(np.array_equal(a[2], v) for v in attr.synthetic_attributes([2], seed=6).values())
  for vec in a.values():
    assert vec.shape == (27,)
    for j, name in enumerate(attr.ATTRIBUTES):
      assert 1 <= vec[j] <= attr.num_classes(name)
  with pytest.raises(ValueError, match="no attributes"):
    attr.synthetic_attributes([0])


@pytest.mark.parametrize("shuffle", [True, False])
def test_round_trip(tmp_path, shuffle):
  train = attr.synthetic_attributes(TRAIN_IDS, seed=1)
  test = attr.synthetic_attributes(TEST_IDS, seed=2)
  path = str(tmp_path / "fake.mat")
  attr.write_fake_market_attributes(path, train, test, shuffle_test_fields=shuffle)

  raw = scipy.io.loadmat(path)["market_attribute"][0, 0]
  train_fields = raw["train"][0, 0].dtype.names
  test_fields = raw["test"][0, 0].dtype.names
  assert set(train_fields) == set(test_fields) == set(attr.ATTRIBUTES) | {"image_index"}
  assert (train_fields != test_fields) == shuffle

  for part, rows in (("train", train), ("test", test)):
    table = attr.read_market_attributes(path, part)
    ids, labels = _expected(rows)
    assert table.names == attr.ATTRIBUTES
    assert table.person_ids.dtype == np.int32 and table.labels.dtype == np.int32
    np.testing.assert_array_equal(table.person_ids, ids)
    np.testing.assert_array_equal(table.labels, labels)


def test_lookup_matches_brute_force():
  rows = attr.synthetic_attributes(TRAIN_IDS, seed=3)
  ids, labels = _expected(rows)
  perm = np.random.default_rng(0).permutation(len(ids))  # Table sorts unsorted input.
  table = attr.AttributeTable(attr.ATTRIBUTES, ids[perm], labels[perm])
  query = [0, -1, 2, 1500, 3, 7, 7, 1501, 2, -1, 9999, 10, 0, 1]
  got, valid = table.lookup(np.asarray(query))
  assert got.shape == (len(query), 27) and got.dtype == np.int32 and valid.dtype == bool
  for b, pid in enumerate(query):
    if pid in rows:
      assert valid[b]
      np.testing.assert_array_equal(got[b], np.asarray(rows[pid]) - 1)
    else:
      assert not valid[b]
      assert (got[b] == -1).all()
  # Empty query, empty table.
  got, valid = table.lookup([])
  assert got.shape == (0, 27) and valid.shape == (0,)
  empty = attr.AttributeTable(attr.ATTRIBUTES, np.zeros(0, np.int32), np.zeros((0, 27)))
  got, valid = empty.lookup([1, 0])
  assert (got == -1).all() and not valid.any()


def test_table_is_read_only_and_rejects_duplicates():
  rows = attr.synthetic_attributes([1, 2])
  ids, labels = _expected(rows)
  table = attr.AttributeTable(attr.ATTRIBUTES, ids, labels)
  with pytest.raises(ValueError):
    table.labels[0, 0] = 3
  with pytest.raises(ValueError, match="more than once"):
    attr.AttributeTable(attr.ATTRIBUTES, np.asarray([1, 1]), labels)


def test_missing_file(tmp_path):
  path = str(tmp_path / "nope.mat")
  with pytest.raises(ReidDataError, match=r"attribute file not found; download") as e:
    attr.read_market_attributes(path, "train")
  _check_one_line(e, path)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a MATLAB file\n" * 20])
def test_not_a_mat_file(tmp_path, content):
  path = tmp_path / "bad.mat"
  path.write_bytes(content)
  with pytest.raises(ReidDataError, match=r"not a readable MATLAB \.mat file") as e:
    attr.read_market_attributes(str(path), "train")
  _check_one_line(e, str(path))


def test_missing_struct(tmp_path):
  path = str(tmp_path / "other.mat")
  scipy.io.savemat(path, {"gallery": np.zeros((2, 2))})
  with pytest.raises(ReidDataError, match=r"no struct 'market_attribute' \(found gallery\)") as e:
    attr.read_market_attributes(path, "train")
  _check_one_line(e, path)


def test_unknown_and_missing_part(tmp_path):
  path = str(tmp_path / "train_only.mat")
  scipy.io.savemat(path, {"market_attribute": {"train": _raw_part([1, 2], _good_values(2))}})
  assert len(attr.read_market_attributes(path, "train")) == 2
  with pytest.raises(ReidDataError, match=r"market_attribute\.test is missing") as e:
    attr.read_market_attributes(path, "test")
  _check_one_line(e, path)
  with pytest.raises(ReidDataError, match=r"unknown part 'query'"):
    attr.read_market_attributes(path, "query")


@pytest.mark.parametrize("field", ["gender", "age", "downbrown", "image_index"])
def test_missing_field(tmp_path, field):
  path = str(tmp_path / "no_field.mat")
  part = _raw_part([1, 2], _good_values(2), drop=field)
  scipy.io.savemat(path, {"market_attribute": {"train": part, "test": part}})
  with pytest.raises(ReidDataError, match=rf"market_attribute\.test lacks field '{field}'") as e:
    attr.read_market_attributes(path, "test")
  _check_one_line(e, path)


@pytest.mark.parametrize("field,value", [("age", 5), ("age", 0), ("gender", 3), ("upred", 0)])
def test_label_out_of_range(tmp_path, field, value):
  train = attr.synthetic_attributes([1, 2, 3])
  train[2] = train[2].copy()
  train[2][attr.ATTRIBUTES.index(field)] = value
  path = str(tmp_path / "range.mat")
  attr.write_fake_market_attributes(path, train, attr.synthetic_attributes([4]))
  k = attr.num_classes(field)
  with pytest.raises(ReidDataError,
                     match=rf"train\.{field} has label {value} for identity 0002, outside 1\.\.{k}"
                     ) as e:
    attr.read_market_attributes(path, "train")
  _check_one_line(e, path)
  assert len(attr.read_market_attributes(path, "test")) == 1  # The other part is fine.


def test_duplicate_identity(tmp_path):
  path = str(tmp_path / "dup.mat")
  part = _raw_part([1, 5, 3, 5], _good_values(4))
  scipy.io.savemat(path, {"market_attribute": {"train": part, "test": part}})
  with pytest.raises(ReidDataError, match=r"image_index lists identity 0005 2 times") as e:
    attr.read_market_attributes(path, "train")
  _check_one_line(e, path)


def test_length_mismatch(tmp_path):
  path = str(tmp_path / "short.mat")
  part = _raw_part([1, 2, 3], _good_values(3))
  part["hat"] = part["hat"][:, :2]
  scipy.io.savemat(path, {"market_attribute": {"train": part, "test": part}})
  with pytest.raises(ReidDataError, match=r"train\.hat has 2 uint8 values for 3 identities"):
    attr.read_market_attributes(path, "train")


@pytest.mark.skipif(not os.path.isfile(REAL_FILE),
                    reason=f"real attribute file absent at {REAL_FILE}")
def test_real_file():
  raw = scipy.io.loadmat(REAL_FILE)["market_attribute"][0, 0]
  for part, n in (("train", 751), ("test", 750)):
    table = attr.read_market_attributes(REAL_FILE, part)
    assert len(table) == n and table.labels.shape == (n, 27)
    for j, name in enumerate(attr.ATTRIBUTES):
      col = table.labels[:, j]
      assert col.min() >= 0 and col.max() < attr.num_classes(name)
    assert set(np.unique(table.labels[:, attr.ATTRIBUTES.index("age")])) == {0, 1, 2, 3}

    # Independent check against the raw struct, field by field (ids sorted in the file).
    fields = raw[part][0, 0]
    raw_ids = np.asarray([int(c[0]) for c in fields["image_index"][0]])
    np.testing.assert_array_equal(table.person_ids, raw_ids)
    for name in ("gender", "age", "upred", "downblue"):
      np.testing.assert_array_equal(table.labels[:, attr.ATTRIBUTES.index(name)],
                                    fields[name][0].astype(np.int32) - 1)

  train = attr.read_market_attributes(REAL_FILE, "train")
  test = attr.read_market_attributes(REAL_FILE, "test")
  assert not set(train.person_ids) & set(test.person_ids)
  # Hand-read from loadmat: train identity '0002' has gender 1, age 2, upred 2 (file
  # values); test identity '0001' has gender 2.
  gi, ai, ri = (attr.ATTRIBUTES.index(a) for a in ("gender", "age", "upred"))
  labels, valid = train.lookup([2, 0, -1, 1])
  assert valid.tolist() == [True, False, False, False]
  assert (labels[0, gi], labels[0, ai], labels[0, ri]) == (0, 1, 1)
  labels, valid = test.lookup([1])
  assert valid[0] and labels[0, gi] == 1
