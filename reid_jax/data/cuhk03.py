"""tfds builder for CUHK03 (Li et al., CVPR 2014): new 767/700 protocol and classic 20 splits.

Source files:

* `cuhk03_release.zip` -> `cuhk03_release/cuhk-03.mat`, a MATLAB v7.3 (HDF5) file.
  `labeled` and `detected` are 5x1 cell arrays, one cell per camera pair; each holds an
  N_pair x 10 cell array of images (columns 1-5: first camera of the pair, 6-10: second;
  empty cells are missing images). HDF5 stores MATLAB arrays transposed, so an image
  reads as 3xWxH and is transposed back to HxWx3. `testsets` is a 20x1 cell array of
  100x2 [pair, person] lists (1-based): the classic protocol's test identities.
* `cuhk03_new_protocol_config_{labeled,detected}.mat` (Zhong et al., CVPR 2017; MATLAB
  v5): `filelist` names every image as `{pair}_{person:03d}_{view}_{column:02d}.png`
  (e.g. `1_001_2_06.png`: pair 1, person 1, view 2, column 6 of the cell row), `labels`
  and `camId` (1 or 2, the view) per entry, and 1-based `train_idx` (767 ids),
  `query_idx` and `gallery_idx` (700 ids) into `filelist`.

Id and camera conventions (the same for every config, so records can be compared):

* `person_id = pair * 1000 + person` (pair 1-5, person 1-based within its pair), e.g. 3017
  is person 17 of camera pair 3. People are numbered per pair in the release, so the
  pair is part of the identity; this keeps ids unique, stable across configs and
  readable from `file_name`. The new protocol's own `labels` are checked to be a
  one-to-one relabelling of these ids.
* `camera_id = (pair - 1) * 2 + (view - 1)`, 0..9: each of the 10 camera views gets its
  own id. The pairs' physical cameras are not published, so views of different pairs
  are never assumed equal; images of one person always come from one pair, so
  same-camera filtering at evaluation (same id and same camera_id) is exactly the
  protocol's same-view rule.
* `file_name` is the new protocol's `filelist` name (built the same way for classic
  configs); images are stored as lossless PNG.

Configs:

* `detected` (default), `labeled`: new protocol, splits `train`, `query`, `gallery`
  (detected: 7,365 / 1,400 / 5,332 images; labeled: 7,368 / 1,400 / 5,328).
* `classic_detected`, `classic_labeled`: the 20 random splits of Li et al. shipped in
  `testsets`; split `train_k` holds all images of the identities outside test set k
  and `test_k` all images of its 100 test identities, for k in 0..19 (test set k is
  cell k+1 of `testsets`). Use `test_k` as both query and gallery with same-camera
  matches excluded (as torchreid does), or split it into query/gallery by view
  (`camera_id % 2`) for the original single-shot protocol. These configs store each
  image once per split, about 20 times the size of the new-protocol configs; build a
  `Cuhk03Config(..., classic_splits=(0,))` for fewer.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import h5py
import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from reid_jax.data.common import Archive, ReidBuilder, ReidDataError, encode_png
from reid_jax.data.common import find_file, reid_features

_HOMEPAGE = "https://www.ee.cuhk.edu.hk/~xgwang/CUHK_identification.html"
_NEW_PROTOCOL_URL = (
    "https://github.com/zhunzhong07/person-re-ranking/tree/master/evaluation/data/CUHK03")
_ZIP_NAME = "cuhk03_release.zip"
_TOP = "cuhk03_release"
_MAT_REL = f"{_TOP}/cuhk-03.mat"
_NUM_PAIRS = 5
_NUM_COLUMNS = 10
_NUM_CLASSIC_SPLITS = 20
_FILELIST_NAME = re.compile(
    r"(?P<pair>\d)_(?P<person>\d{3})_(?P<view>[12])_(?P<column>\d{2})\.png")
_PROTOCOL_KEYS = ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx")


@dataclasses.dataclass(eq=False)
class Cuhk03Config(tfds.core.BuilderConfig):
  """CUHK03 variant.

  Attributes:
    images: `labeled` (hand-drawn boxes) or `detected` (DPM detector boxes).
    protocol: `new` (Zhong et al. 767/700 split) or `classic` (Li et al. 20 splits).
    classic_splits: which of the 20 classic test sets to write (classic protocol only).
  """

  images: str = "detected"
  protocol: str = "new"
  classic_splits: tuple[int, ...] = tuple(range(_NUM_CLASSIC_SPLITS))


def image_name(pair: int, person: int, column: int) -> str:
  """The new protocol's file name of an image: `{pair}_{person:03d}_{view}_{column:02d}.png`."""
  view = 1 if column <= 5 else 2
  return f"{pair}_{person:03d}_{view}_{column:02d}.png"


def person_id(pair: int, person: int) -> int:
  """Dataset-wide identity of person `person` (1-based) of camera pair `pair` (1-5)."""
  return pair * 1000 + person


def camera_id(pair: int, view: int) -> int:
  """0-based id of view `view` (1 or 2) of camera pair `pair` (1-5): 0..9."""
  return (pair - 1) * 2 + (view - 1)


class _Release:
  """Read access to the images and test sets of `cuhk-03.mat` (MATLAB v7.3 = HDF5)."""

  def __init__(self, path: pathlib.Path, where: str):
    self.where = where
    try:
      self._file = h5py.File(path, "r")
    except OSError as e:
      raise ReidDataError(f"{where}: not a MATLAB v7.3 (HDF5) .mat file ({e})") from None
    self._pairs: dict[str, list[np.ndarray]] = {}

  def close(self) -> None:
    self._file.close()

  def _cell_vector(self, key: str, length: int) -> np.ndarray:
    """References of a MATLAB cell vector variable, checked for length."""
    if key not in self._file:
      raise ReidDataError(f"{self.where}: wrong layout, variable {key!r} is missing")
    refs = np.asarray(self._file[key][()]).reshape(-1)
    if refs.dtype != h5py.ref_dtype or refs.size != length:
      raise ReidDataError(
          f"{self.where}: wrong layout, {key!r} should be a cell array of {length} cells")
    return refs

  def pairs(self, kind: str) -> list[np.ndarray]:
    """Per camera pair, the N x 10 array of image references of `kind`."""
    if kind not in self._pairs:
      pairs = []
      for p, ref in enumerate(self._cell_vector(kind, _NUM_PAIRS), start=1):
        cells = np.asarray(self._file[ref][()])
        if cells.ndim != 2 or cells.shape[0] != _NUM_COLUMNS or cells.dtype != h5py.ref_dtype:
          raise ReidDataError(
              f"{self.where}: wrong layout, {kind}{{{p}}} should be an N x 10 cell array")
        if cells.shape[1] >= 1000:
          raise ReidDataError(f"{self.where}: {kind}{{{p}}} has {cells.shape[1]} people, >999")
        pairs.append(cells.T)  # HDF5 holds MATLAB's N x 10 transposed.
      self._pairs[kind] = pairs
    return self._pairs[kind]

  def num_people(self, kind: str, pair: int) -> int:
    return self.pairs(kind)[pair - 1].shape[0]

  def _cell(self, kind: str, pair: int, person: int, column: int) -> h5py.Dataset | None:
    """The HDF5 dataset of cell {pair}{person, column} (1-based), or None if empty."""
    cells = self.pairs(kind)[pair - 1]
    if not (1 <= person <= cells.shape[0] and 1 <= column <= _NUM_COLUMNS):
      return None
    data = self._file[cells[person - 1, column - 1]]
    if data.attrs.get("MATLAB_empty", 0) or data.ndim != 3:
      return None  # MATLAB writes empty cells as a (2,) array of zeros flagged empty.
    if data.dtype != np.uint8 or data.shape[0] != 3:
      raise ReidDataError(
          f"{self.where}: {kind}{{{pair}}}{{{person},{column}}} is not a uint8 colour image "
          f"(shape {data.shape}, {data.dtype})")
    return data

  def has_image(self, kind: str, pair: int, person: int, column: int) -> bool:
    return self._cell(kind, pair, person, column) is not None

  def image(self, kind: str, pair: int, person: int, column: int) -> np.ndarray:
    """HxWx3 uint8 image at a non-empty cell {pair}{person, column} (1-based)."""
    data = self._cell(kind, pair, person, column)
    return np.ascontiguousarray(np.asarray(data[()]).T)  # 3xWxH -> HxWx3.

  def columns(self, kind: str, pair: int, person: int) -> list[int]:
    """Columns (1-10) of the non-empty image cells of one person."""
    return [c for c in range(1, _NUM_COLUMNS + 1) if self.has_image(kind, pair, person, c)]

  def testsets(self, kind: str) -> list[set[tuple[int, int]]]:
    """The classic protocol's 20 test sets as sets of (pair, person), 1-based."""
    sets = []
    for k, ref in enumerate(self._cell_vector("testsets", _NUM_CLASSIC_SPLITS), start=1):
      rows = np.asarray(self._file[ref][()]).T  # MATLAB 100 x 2, stored 2 x 100.
      if rows.ndim != 2 or rows.shape[1] != 2:
        raise ReidDataError(f"{self.where}: wrong layout, testsets{{{k}}} should be K x 2")
      members = set()
      for pair, person in rows.tolist():
        pair, person = int(pair), int(person)
        if not (1 <= pair <= _NUM_PAIRS and 1 <= person <= self.num_people(kind, pair)):
          raise ReidDataError(
              f"{self.where}: testsets{{{k}}} names person {person} of pair {pair}, "
              "which does not exist")
        members.add((pair, person))
      sets.append(members)
    return sets


def _scalar_ints(values: np.ndarray, key: str, where: str) -> np.ndarray:
  """Flattens a numeric .mat variable to int64, rejecting non-integral values."""
  flat = np.asarray(values).reshape(-1)
  try:
    ints = flat.astype(np.int64)
  except (TypeError, ValueError):
    raise ReidDataError(f"{where}: variable {key!r} is not numeric") from None
  if not np.array_equal(ints, flat):
    raise ReidDataError(f"{where}: variable {key!r} holds non-integer values")
  return ints


class _Protocol:
  """The new protocol file (`cuhk03_new_protocol_config_*.mat`), parsed and checked."""

  def __init__(self, path: pathlib.Path, release: _Release, kind: str):
    where = str(path)
    try:
      mat = scipy.io.loadmat(path)
    except (ValueError, OSError, NotImplementedError, TypeError) as e:
      raise ReidDataError(f"{where}: not a readable MATLAB .mat file ({e})") from None
    for key in _PROTOCOL_KEYS:
      if key not in mat:
        raise ReidDataError(f"{where}: wrong layout, variable {key!r} is missing")
    names = []
    for entry in np.asarray(mat["filelist"], dtype=object).reshape(-1):
      entry = np.asarray(entry).reshape(-1)
      names.append(str(entry[0]) if entry.size == 1 else "")
    labels = _scalar_ints(mat["labels"], "labels", where)
    cams = _scalar_ints(mat["camId"], "camId", where)
    if not len(names) == labels.size == cams.size:
      raise ReidDataError(f"{where}: filelist, labels and camId differ in length")
    self.entries = []  # (name, pair, person, view, column) per filelist entry.
    label_of, person_of = {}, {}
    for i, name in enumerate(names):
      match = _FILELIST_NAME.fullmatch(name)
      bad = f"{where}: filelist entry {i + 1} {name!r}"
      if match is None:
        raise ReidDataError(f"{bad}: unexpected name, expected names like 1_001_1_01.png")
      pair, person, view, column = (int(match[k]) for k in ("pair", "person", "view", "column"))
      if not (1 <= pair <= _NUM_PAIRS and 1 <= column <= _NUM_COLUMNS):
        raise ReidDataError(f"{bad}: pair must be 1-5 and column 1-10")
      if view != (1 if column <= 5 else 2) or cams[i] != view:
        raise ReidDataError(f"{bad}: view {view}, column {column} and camId {cams[i]} disagree")
      if not release.has_image(kind, pair, person, column):
        raise ReidDataError(f"{bad}: no such {kind} image in {release.where}")
      ident = (pair, person)
      if label_of.setdefault(ident, labels[i]) != labels[i] or (
          person_of.setdefault(labels[i], ident) != ident):
        raise ReidDataError(f"{bad}: label {labels[i]} does not match one person only")
      self.entries.append((name, pair, person, view, column))
    self.splits = {}
    for split in ("train", "query", "gallery"):
      idx = _scalar_ints(mat[f"{split}_idx"], f"{split}_idx", where)
      if idx.size and (idx.min() < 1 or idx.max() > len(names)):
        raise ReidDataError(f"{where}: {split}_idx has indices outside 1..{len(names)}")
      self.splits[split] = (idx - 1).tolist()


class Cuhk03(ReidBuilder):
  """CUHK03: 1,467 identities over 5 camera pairs, labeled and detected boxes."""

  name = "cuhk03"
  BUILDER_CONFIGS = [
      Cuhk03Config(name="detected", images="detected", protocol="new",
                   description="New protocol (767/700 ids), detected boxes."),
      Cuhk03Config(name="labeled", images="labeled", protocol="new",
                   description="New protocol (767/700 ids), hand-labeled boxes."),
      Cuhk03Config(name="classic_detected", images="detected", protocol="classic",
                   description="Classic 20 splits (1,367/100 ids), detected boxes."),
      Cuhk03Config(name="classic_labeled", images="labeled", protocol="classic",
                   description="Classic 20 splits (1,367/100 ids), hand-labeled boxes."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "detected"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put these files in `manual_dir`:
  * `cuhk03_release.zip` from the CUHK03 page {_HOMEPAGE}
    (request form; the extracted folder `cuhk03_release/` holding `cuhk-03.mat` works too).
  * For the `labeled`/`detected` (new protocol) configs also
    `cuhk03_new_protocol_config_labeled.mat` and `cuhk03_new_protocol_config_detected.mat`
    from {_NEW_PROTOCOL_URL}
    (directly in `manual_dir` or inside `cuhk03_release/`).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "CUHK03 person re-identification. person_id = pair * 1000 + person, camera_id "
            "= (pair - 1) * 2 + view - 1 (0..9). New-protocol configs have splits "
            "train/query/gallery; classic configs train_k/test_k for the 20 test sets."),
        features=reid_features(),
        homepage=_HOMEPAGE,
        citation="""@inproceedings{li2014deepreid,
  title={DeepReID: Deep Filter Pairing Neural Network for Person Re-identification},
  author={Li, Wei and Zhao, Rui and Xiao, Tong and Wang, Xiaogang},
  booktitle={CVPR}, year={2014}}
@inproceedings{zhong2017re,
  title={Re-ranking Person Re-identification with k-reciprocal Encoding},
  author={Zhong, Zhun and Zheng, Liang and Cao, Donglin and Li, Shaozi},
  booktitle={CVPR}, year={2017}}""",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: Cuhk03Config = self.builder_config
    if config.images not in ("labeled", "detected") or config.protocol not in ("new", "classic"):
      raise ReidDataError(
          f"cuhk03 config {config.name!r}: images must be labeled/detected and protocol "
          "new/classic")
    manual_dir = self.manual_path(dl_manager, _ZIP_NAME, f"request it from {_HOMEPAGE}")
    protocol_name = f"cuhk03_new_protocol_config_{config.images}.mat"
    protocol_path = None
    if config.protocol == "new":  # Check every needed file exists before the slow parts.
      protocol_path = find_file(manual_dir, protocol_name, (_TOP,),
                                f"download it from {_NEW_PROTOCOL_URL}")
    archive = Archive.open(manual_dir, _ZIP_NAME, _TOP,
                           f"request it from {_HOMEPAGE}", self.resources)
    mat_path = archive.local_path(_MAT_REL, self.resources,
                                  pathlib.Path(dl_manager.download_dir))
    release = _Release(mat_path, archive.where(_MAT_REL))
    self.resources.callback(release.close)
    kind = config.images
    if config.protocol == "new":
      protocol = _Protocol(protocol_path, release, kind)
      return {
          split: self._generate_examples(release, kind, protocol, indices)
          for split, indices in protocol.splits.items()
      }
    testsets = release.testsets(kind)
    everyone = [(pair, person) for pair in range(1, _NUM_PAIRS + 1)
                for person in range(1, release.num_people(kind, pair) + 1)]
    cache: dict[tuple[int, int, int], bytes] = {}  # Each image is PNG-encoded once.
    splits = {}
    for k in config.classic_splits:
      if not 0 <= k < _NUM_CLASSIC_SPLITS:
        raise ReidDataError(f"cuhk03 config {config.name!r}: classic split {k} is not in 0..19")
      test = testsets[k]
      splits[f"train_{k}"] = self._generate_classic(
          release, kind, [p for p in everyone if p not in test], cache)
      splits[f"test_{k}"] = self._generate_classic(
          release, kind, [p for p in everyone if p in test], cache)
    return splits

  def _generate_examples(self, release: _Release, kind: str, protocol: _Protocol, indices):
    for i in indices:
      name, pair, person, view, column = protocol.entries[i]
      yield name, {
          "image": encode_png(release.image(kind, pair, person, column)),
          "person_id": person_id(pair, person),
          "camera_id": camera_id(pair, view),
          "file_name": name,
      }

  def _generate_classic(self, release: _Release, kind: str, people, cache):
    for pair, person in people:
      columns = release.columns(kind, pair, person)
      for column in columns:
        key = (pair, person, column)
        if key not in cache:
          cache[key] = encode_png(release.image(kind, pair, person, column)).getvalue()
        name = image_name(pair, person, column)
        yield name, {
            "image": cache[key],
            "person_id": person_id(pair, person),
            "camera_id": camera_id(pair, 1 if column <= 5 else 2),
            "file_name": name,
        }
