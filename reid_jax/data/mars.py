"""tfds builder for MARS (Zheng et al., ECCV 2016), a video re-ID set, as frame records.

Source files: `bbox_train.zip` and `bbox_test.zip` (frames stored as
`bbox_train/0001/0001C1T0001F001.jpg`: person 0001, camera 1, tracklet 0001, frame 001;
distractors are person `0000`, junk `00-1` = -1) and the `info/` files of the official
evaluation code (github.com/liangzheng06/MARS-evaluation): `train_name.txt` and
`test_name.txt` list the frame names in order; `tracks_train_info.mat`
(`track_train_info`) and `tracks_test_info.mat` (`track_test_info`) hold one row per
tracklet, `[start, end, person_id, camera]`, 1-based inclusive ranges into the name lists;
`query_IDX.mat` (`query_IDX`) lists the 1-based rows of the test tracks used as queries.

Splits follow the official protocol: `train` = every train track; `query` = the test
tracks in `query_IDX` (1,980); `gallery` = all other test tracks (distractor and junk
tracks included). The official MATLAB code ranks all test tracks, queries included, but
a query's own track has the query's id and camera, so it is excluded as a same-camera
match anyway; leaving the queries out of `gallery` (as torchreid does) gives the same
scores. Junk tracks (person_id -1) are kept, as the official evaluation keeps them (and
ignores them when scoring); torchreid drops them, which scores the same, so its gallery
count (9,330 tracks) is smaller than ours.

Records are frames. `tracklet_id` is the 0-based row of the track in its info file (train
rows for `train`, test rows for `query`/`gallery`, so query and gallery ids never
collide), `frame_index` the 0-based position of the frame within its track, `person_id`
the dataset's id (0 distractor, -1 junk) and `camera_id` the camera minus one (0..5).
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from reid_jax.data.common import Archive, ReidBuilder, ReidDataError, find_file, image_file
from reid_jax.data.common import reid_features

_HOMEPAGE = "https://zheng-lab.cecs.anu.edu.au/Project/project_mars.html"
_INFO_URL = "https://github.com/liangzheng06/MARS-evaluation/tree/master/info"
_FRAME_NAME = re.compile(
    r"(?P<person>\d{4}|00-1)C(?P<camera>\d)T(?P<tracklet>\d{4})F(?P<frame>\d{3})\.jpg")
_NUM_CAMERAS = 6


def _person(text: str) -> int:
  """Person id of a frame name's first four characters (`00-1` is junk, -1)."""
  return -1 if text == "00-1" else int(text)


def _load_mat_var(path: pathlib.Path, key: str) -> np.ndarray:
  """Variable `key` of a MATLAB v5 file as an int64 array."""
  try:
    mat = scipy.io.loadmat(path)
  except (ValueError, OSError, NotImplementedError, TypeError) as e:
    raise ReidDataError(f"{path}: not a readable MATLAB .mat file ({e})") from None
  if key not in mat:
    raise ReidDataError(f"{path}: wrong layout, variable {key!r} is missing")
  values = np.asarray(mat[key])
  try:
    ints = values.astype(np.int64)
  except (TypeError, ValueError):
    raise ReidDataError(f"{path}: variable {key!r} is not numeric") from None
  if not np.array_equal(ints, values):
    raise ReidDataError(f"{path}: variable {key!r} holds non-integer values")
  return ints


def _load_names(path: pathlib.Path) -> list[str]:
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise ReidDataError(f"{path}: cannot read ({e})") from None
  return [line.strip() for line in text.splitlines() if line.strip()]


def _load_tracks(path: pathlib.Path, key: str, names: list[str], names_file: str
                ) -> np.ndarray:
  """Track rows [start, end, person, camera], checked against the name list."""
  tracks = _load_mat_var(path, key)
  if tracks.ndim != 2 or tracks.shape[1] != 4:
    raise ReidDataError(f"{path}: {key!r} should have 4 columns, has shape {tracks.shape}")
  for row, (start, end, person, camera) in enumerate(tracks.tolist()):
    bad = f"{path}: {key} row {row + 1}"
    if not 1 <= start <= end <= len(names):
      raise ReidDataError(f"{bad}: frames {start}..{end} outside {names_file} (1..{len(names)})")
    if not 1 <= camera <= _NUM_CAMERAS:
      raise ReidDataError(f"{bad}: camera {camera} outside 1..{_NUM_CAMERAS}")
    for name in names[start - 1:end]:
      match = _FRAME_NAME.fullmatch(name)
      if match is None:
        raise ReidDataError(
            f"{names_file}: unexpected frame name {name!r}, expected names like "
            "0001C1T0001F001.jpg")
      if _person(match["person"]) != person or int(match["camera"]) != camera:
        raise ReidDataError(f"{bad}: frame {name} is not person {person}, camera {camera}")
  return tracks


class Mars(ReidBuilder):
  """MARS: 1,261 identities, 6 cameras, 20,478 tracklets (frames as records)."""

  name = "mars"
  HAS_DISTRACTORS_AND_JUNK = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put in `manual_dir`:
  * `bbox_train.zip` and `bbox_test.zip` from the MARS page {_HOMEPAGE}
    (Google Drive/Baidu links; the extracted folders `bbox_train/` and `bbox_test/` work too).
  * The `info/` folder of the official evaluation code, {_INFO_URL}:
    `train_name.txt`, `test_name.txt`, `tracks_train_info.mat`, `tracks_test_info.mat`,
    `query_IDX.mat` (as `manual_dir/info/...` or directly in `manual_dir`).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "MARS video person re-identification, one record per frame. Splits: train "
            "(8,298 tracklets, 625 ids), query (1,980 tracklets), gallery (all other test "
            "tracklets; person_id 0 = distractor, -1 = junk). tracklet_id is the track's "
            "0-based row in the official info file; frame_index its 0-based frame."),
        features=reid_features(video=True),
        homepage=_HOMEPAGE,
        citation="""@inproceedings{zheng2016mars,
  title={MARS: A Video Benchmark for Large-Scale Person Re-identification},
  author={Zheng, Liang and Bie, Zhi and Sun, Yifan and Wang, Jingdong and Su, Chi
    and Wang, Shengjin and Tian, Qi},
  booktitle={ECCV}, year={2016}}""",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = self.manual_path(dl_manager, "bbox_train.zip", f"download it from {_HOMEPAGE}")
    hint = f"download it from {_INFO_URL}"
    info = {name: find_file(manual_dir, name, ("info",), hint) for name in (
        "train_name.txt", "test_name.txt", "tracks_train_info.mat", "tracks_test_info.mat",
        "query_IDX.mat")}
    archives = {
        part: Archive.open(manual_dir, f"bbox_{part}.zip", f"bbox_{part}",
                           f"download it from {_HOMEPAGE}", self.resources)
        for part in ("train", "test")
    }
    names = {part: _load_names(info[f"{part}_name.txt"]) for part in ("train", "test")}
    tracks = {
        part: _load_tracks(info[f"tracks_{part}_info.mat"], f"track_{part}_info",
                           names[part], str(info[f"{part}_name.txt"]))
        for part in ("train", "test")
    }
    query = _load_mat_var(info["query_IDX.mat"], "query_IDX").reshape(-1)
    num_test = tracks["test"].shape[0]
    if query.size and (query.min() < 1 or query.max() > num_test):
      raise ReidDataError(
          f"{info['query_IDX.mat']}: query_IDX has rows outside 1..{num_test}")
    if np.unique(query).size != query.size:
      raise ReidDataError(f"{info['query_IDX.mat']}: query_IDX repeats rows")
    query_rows = sorted(int(q) - 1 for q in query)
    query_set = set(query_rows)
    gallery_rows = [r for r in range(num_test) if r not in query_set]
    return {
        "train": self._generate_examples(
            archives["train"], "bbox_train", names["train"], tracks["train"],
            range(tracks["train"].shape[0])),
        "query": self._generate_examples(
            archives["test"], "bbox_test", names["test"], tracks["test"], query_rows),
        "gallery": self._generate_examples(
            archives["test"], "bbox_test", names["test"], tracks["test"], gallery_rows),
    }

  def _generate_examples(self, archive: Archive, top: str, names: list[str],
                         tracks: np.ndarray, rows):
    for row in rows:
      start, end, person, camera = (int(v) for v in tracks[row])
      for frame, name in enumerate(names[start - 1:end]):
        rel = f"{top}/{name[:4]}/{name}"
        yield f"{row}/{name}", {
            "image": image_file(archive.read(rel), archive.where(rel)),
            "person_id": person,
            "camera_id": camera - 1,
            "file_name": name,
            "tracklet_id": row,
            "frame_index": frame,
        }
