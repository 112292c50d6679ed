"""Tiny fake copies of the official re-ID archives, in their exact layouts, for tests.

Every `make_*` function writes the archive into a manual directory, either as the
official zip (`form="zip"`) or as the folder it extracts to (`form="folder"`), and
returns what the builder should produce: `{split: {file_name: Expected}}`. Each fake
image has its own colour (or pixel pattern), so tests can check pixels end to end.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import pathlib
import zipfile

import h5py
import numpy as np
import scipy.io
from PIL import Image


@dataclasses.dataclass
class Expected:
  """What one record should hold."""

  person_id: int
  camera_id: int
  pixels: np.ndarray  # HxWx3 uint8
  exact: bool = True  # False for JPEG (lossy): compare with a tolerance.
  tracklet_id: int | None = None
  frame_index: int | None = None


def colour(i: int) -> tuple[int, int, int]:
  """A distinct, JPEG-stable colour per index."""
  return (40 + (i * 37) % 180, 40 + (i * 71) % 180, 40 + (i * 113) % 180)


def solid(i: int, h: int = 16, w: int = 8) -> np.ndarray:
  return np.broadcast_to(np.array(colour(i), np.uint8), (h, w, 3)).copy()


def pattern(i: int, h: int = 6, w: int = 4) -> np.ndarray:
  """A non-symmetric image (catches transposed or flipped pixels) unique to `i`."""
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  img = np.stack([ys * 20 + i % 50, xs * 30 + 2 * i % 50, ys * xs + 3 * i % 100], -1)
  return img.astype(np.uint8)


def jpeg_bytes(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def png_bytes(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def write_tree(manual_dir: pathlib.Path, files: dict[str, bytes], form: str,
               zip_name: str | None = None) -> None:
  """Writes `files` (archive paths -> bytes) as a zip in `manual_dir` or extracted there."""
  manual_dir.mkdir(parents=True, exist_ok=True)
  if form == "zip":
    with zipfile.ZipFile(manual_dir / zip_name, "w") as zf:
      for rel, data in files.items():
        zf.writestr(rel, data)
  elif form == "folder":
    for rel, data in files.items():
      path = manual_dir / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
  else:
    raise ValueError(form)


# --------------------------------------------------------------------------- Market / Duke

MARKET_TOP = "Market-1501-v15.09.15"
MARKET_ZIP = "Market-1501-v15.09.15.zip"
MARKET_FILES = {
    "train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s2_012345_02.jpg"],
    "query": ["0002_c6s1_000451_00.jpg", "0007_c1s1_000100_00.jpg.jpg"],
    "gallery": ["0002_c2s1_000126_01.jpg", "0007_c4s3_000200_01.jpg",
                "0000_c1s1_000151_01.jpg", "0000_c5s2_000151_02.jpg",
                "-1_c1s1_000401_03.jpg", "-1_c3s1_000401_03.jpg.jpg"],
}
_MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query",
                   "gallery": "bounding_box_test"}

DUKE_TOP = "DukeMTMC-reID"
DUKE_ZIP = "DukeMTMC-reID.zip"
DUKE_FILES = {
    "train": ["0001_c2_f0046182.jpg", "0001_c8_f0000001.jpg"],
    "query": ["0005_c1_f0100000.jpg"],
    "gallery": ["0005_c7_f0100020.jpg", "0009_c3_f0000500.jpg"],
}


def _bounding_box_archive(manual_dir, form, top, zip_name, files, extra=None):
  tree, expected, i = {f"{top}/readme.txt": b"fake readme"}, {}, 0
  for split, names in files.items():
    folder = f"{top}/{_MARKET_FOLDERS[split]}"
    tree[f"{folder}/Thumbs.db"] = b"\x00not an image"
    expected[split] = {}
    for name in names:
      img = solid(i)
      tree[f"{folder}/{name}"] = jpeg_bytes(img)
      person, cam = name.split("_")[:2]
      expected[split][name] = Expected(int(person), int(cam[1]) - 1, img, exact=False)
      i += 1
  tree.update(extra or {})
  write_tree(manual_dir, tree, form, zip_name)
  return expected


def make_market(manual_dir: pathlib.Path, form: str = "zip",
                extra: dict[str, bytes] | None = None):
  """Fake `Market-1501-v15.09.15.zip`; `extra` adds or replaces archive files."""
  return _bounding_box_archive(manual_dir, form, MARKET_TOP, MARKET_ZIP, MARKET_FILES, extra)


def make_duke(manual_dir: pathlib.Path, form: str = "zip"):
  """Fake `DukeMTMC-reID.zip`."""
  return _bounding_box_archive(manual_dir, form, DUKE_TOP, DUKE_ZIP, DUKE_FILES)


# --------------------------------------------------------------------------------- CUHK03

# People per camera pair; cells (pair, person, column) that are empty in both kinds.
CUHK03_PEOPLE = (3, 2, 1, 1, 1)
CUHK03_EMPTY = {(1, 2, 4), (1, 2, 9), (2, 1, 5), (4, 1, 8), (4, 1, 9), (4, 1, 10)}
# Test sets of the classic protocol (normally 20 x 100 people), as [pair, person] rows.
CUHK03_TESTSETS = [[(1, 1 + k % 3), (2 + k % 4, 1)] for k in range(20)]
# New protocol: test identities, their query columns (one per view); the rest train.
CUHK03_NEW_TEST = {(1, 2): (1, 6), (3, 1): (2, 10)}


def cuhk03_image(kind: str, pair: int, person: int, column: int) -> np.ndarray:
  """The fake image in cell {pair}{person, column} of `kind`, distinct per cell and kind."""
  index = (pair * 10 + person) * 10 + column + (0 if kind == "labeled" else 500)
  return pattern(index, h=6 + column % 3, w=4)


def cuhk03_cells(kind: str):
  """All non-empty (pair, person, column) of a kind, in release order."""
  for pair, n in enumerate(CUHK03_PEOPLE, start=1):
    for person in range(1, n + 1):
      for column in range(1, 11):
        if (pair, person, column) not in CUHK03_EMPTY:
          yield pair, person, column


def write_cuhk03_mat(path: pathlib.Path) -> None:
  """Writes a MATLAB v7.3-style `cuhk-03.mat`: HDF5 with cell arrays as object references.

  Like MATLAB, arrays are stored transposed: the 5x1 `labeled`/`detected` cells as 1x5,
  each pair's N x 10 cell array as 10 x N, each HxWx3 image as 3xWxH, each 100x2 test set
  as 2x100; empty cells are (2,) uint64 zeros flagged `MATLAB_empty`.
  """
  counter = itertools.count()
  with h5py.File(path, "w") as f:
    refs = f.create_group("#refs#")

    def put(data, matlab_class):
      ds = refs.create_dataset(f"r{next(counter)}", data=data)
      ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
      return ds

    def empty():
      ds = put(np.zeros(2, np.uint64), "double")
      ds.attrs["MATLAB_empty"] = np.uint8(1)
      return ds.ref

    for kind in ("labeled", "detected"):
      pair_refs = []
      for pair, n in enumerate(CUHK03_PEOPLE, start=1):
        grid = np.empty((n, 10), dtype=h5py.ref_dtype)
        for person in range(1, n + 1):
          for column in range(1, 11):
            if (pair, person, column) in CUHK03_EMPTY:
              grid[person - 1, column - 1] = empty()
            else:
              img = cuhk03_image(kind, pair, person, column)
              grid[person - 1, column - 1] = put(np.ascontiguousarray(img.T), "uint8").ref
        pair_refs.append(put(grid.T, "cell").ref)
      ds = f.create_dataset(kind, data=np.array([pair_refs], dtype=h5py.ref_dtype))
      ds.attrs["MATLAB_class"] = np.bytes_("cell")
    test_refs = [put(np.asarray(t, np.float64).T, "double").ref for t in CUHK03_TESTSETS]
    ds = f.create_dataset("testsets", data=np.array([test_refs], dtype=h5py.ref_dtype))
    ds.attrs["MATLAB_class"] = np.bytes_("cell")


def cuhk03_name(pair, person, column):
  return f"{pair}_{person:03d}_{1 if column <= 5 else 2}_{column:02d}.png"


def write_cuhk03_protocol(path: pathlib.Path, kind: str, filelist_override=None) -> dict:
  """Writes `cuhk03_new_protocol_config_{kind}.mat` (MATLAB v5) and returns its splits.

  Labels are 1..K in order of appearance, as a relabelling of (pair, person).
  """
  cells = list(cuhk03_cells(kind))
  names = [cuhk03_name(*c) for c in cells]
  if filelist_override:
    names = [filelist_override.get(n, n) for n in names]
  label_of = {}
  for pair, person, _ in cells:
    label_of.setdefault((pair, person), len(label_of) + 1)
  splits = {"train": [], "query": [], "gallery": []}
  for i, (pair, person, column) in enumerate(cells):
    test = CUHK03_NEW_TEST.get((pair, person))
    if test is None:
      splits["train"].append(i)
    else:
      splits["query" if column in test else "gallery"].append(i)
  filelist = np.empty((len(names), 1), dtype=object)
  for i, n in enumerate(names):
    filelist[i, 0] = n
  scipy.io.savemat(path, {
      "filelist": filelist,
      "labels": np.array([[label_of[(p, q)]] for p, q, _ in cells], np.float64),
      "camId": np.array([[1 if c <= 5 else 2] for _, _, c in cells], np.float64),
      **{f"{s}_idx": np.array([[i + 1] for i in idx], np.float64) for s, idx in splits.items()},
  })
  return {s: [cells[i] for i in idx] for s, idx in splits.items()}


def cuhk03_expected(kind: str, cells) -> dict:
  return {
      cuhk03_name(p, q, c): Expected(p * 1000 + q, (p - 1) * 2 + (0 if c <= 5 else 1),
                                     cuhk03_image(kind, p, q, c))
      for p, q, c in cells
  }


def make_cuhk03(manual_dir: pathlib.Path, form: str = "zip", protocol_files: bool = True
               ) -> dict:
  """Fake `cuhk03_release.zip` (+ new-protocol .mat files); returns expected splits.

  Keys of the result: `labeled`/`detected` (new protocol splits) and
  `classic_labeled`/`classic_detected` (`train_k`/`test_k`).
  """
  manual_dir.mkdir(parents=True, exist_ok=True)
  mat = manual_dir / "cuhk-03.mat.tmp"
  write_cuhk03_mat(mat)
  tree = {"cuhk03_release/cuhk-03.mat": mat.read_bytes(),
          "cuhk03_release/README.md": b"fake readme"}
  mat.unlink()
  write_tree(manual_dir, tree, form, "cuhk03_release.zip")
  out = {}
  for kind in ("labeled", "detected"):
    if protocol_files:
      splits = write_cuhk03_protocol(
          manual_dir / f"cuhk03_new_protocol_config_{kind}.mat", kind)
      out[kind] = {s: cuhk03_expected(kind, cells) for s, cells in splits.items()}
    classic = {}
    for k, test in enumerate(CUHK03_TESTSETS):
      test = set(test)
      cells = list(cuhk03_cells(kind))
      classic[f"train_{k}"] = cuhk03_expected(kind, [c for c in cells if c[:2] not in test])
      classic[f"test_{k}"] = cuhk03_expected(kind, [c for c in cells if c[:2] in test])
    out[f"classic_{kind}"] = classic
  return out


# ----------------------------------------------------------------------------------- MARS

# Tracks: (part, person text, camera, tracklet, frames). Person "00-1" is junk (-1).
MARS_TRACKS = {
    "train": [("0001", 1, 1, 3), ("0001", 2, 2, 2), ("0003", 1, 1, 2)],
    "test": [("0002", 1, 1, 2), ("0002", 3, 2, 3), ("0000", 2, 3, 1), ("00-1", 4, 4, 2),
             ("0004", 1, 1, 1), ("0004", 5, 2, 2), ("0002", 6, 5, 1)],
}
MARS_QUERY_ROWS = [5, 1]  # 1-based rows of the test tracks used as queries (unsorted).


def make_mars(manual_dir: pathlib.Path, form: str = "zip", info_in_subdir: bool = True,
              skip: tuple[str, ...] = ()) -> dict:
  """Fake `bbox_train.zip`, `bbox_test.zip` and `info/` files; returns expected splits.

  `skip` lists info files not to write (for the missing-file tests).
  """
  manual_dir.mkdir(parents=True, exist_ok=True)
  info_dir = manual_dir / "info" if info_in_subdir else manual_dir
  info_dir.mkdir(parents=True, exist_ok=True)
  expected = {"train": {}, "query": {}, "gallery": {}}
  i = 0
  for part, tracks in MARS_TRACKS.items():
    names, rows, tree = [], [], {}
    for row, (person, camera, tracklet, frames) in enumerate(tracks):
      start = len(names) + 1
      pid = -1 if person == "00-1" else int(person)
      split = "train" if part == "train" else (
          "query" if row + 1 in MARS_QUERY_ROWS else "gallery")
      for f in range(frames):
        name = f"{person}C{camera}T{tracklet:04d}F{f + 1:03d}.jpg"
        names.append(name)
        img = solid(i)
        i += 1
        tree[f"bbox_{part}/{person}/{name}"] = jpeg_bytes(img)
        expected[split][name] = Expected(pid, camera - 1, img, exact=False,
                                         tracklet_id=row, frame_index=f)
      rows.append([start, len(names), pid, camera])
    write_tree(manual_dir, tree, form, f"bbox_{part}.zip")
    if f"{part}_name.txt" not in skip:
      (info_dir / f"{part}_name.txt").write_text("\n".join(names) + "\n")
    if f"tracks_{part}_info.mat" not in skip:
      scipy.io.savemat(info_dir / f"tracks_{part}_info.mat",
                       {f"track_{part}_info": np.array(rows, np.float64)})
  if "query_IDX.mat" not in skip:
    scipy.io.savemat(info_dir / "query_IDX.mat",
                     {"query_IDX": np.array([MARS_QUERY_ROWS], np.float64)})
  return expected


# --------------------------------------------------------------------------------- CUHK01

CUHK01_PEOPLE = 6


def make_cuhk01(manual_dir: pathlib.Path, form: str = "zip") -> dict:
  """Fake `CUHK01.zip` (`campus/0001001.png` ...); returns {file_name: Expected}."""
  tree, expected = {}, {}
  for person in range(1, CUHK01_PEOPLE + 1):
    for image in range(1, 5):
      name = f"{person:04d}{image:03d}.png"
      img = pattern(person * 4 + image, h=8, w=5)
      tree[f"campus/{name}"] = png_bytes(img)
      expected[name] = Expected(person, (image - 1) // 2, img)
  tree["campus/Thumbs.db"] = b"\x00not an image"
  write_tree(manual_dir, tree, form, "CUHK01.zip")
  return expected


# --------------------------------------------------------------------------------- MSMT17

# (list, person id, image index, camera 1..15) of the fake MSMT17 lists; list_val's
# identities are training identities, as in the release.
MSMT17_LISTS = {
    "train": [(0, 0, 1), (0, 1, 15), (1, 0, 3), (2, 0, 2)],
    "val": [(0, 2, 7), (2, 1, 2)],
    "query": [(0, 0, 4), (1, 0, 9)],
    "gallery": [(0, 1, 5), (0, 2, 4), (1, 1, 11), (2, 0, 6)],
}
MSMT17_TIMES = ("0303morning", "0113noon", "0302afternoon")


def msmt17_name(pid: int, index: int, camera: int) -> str:
  """`0000_000_01_0303morning_0015_0.jpg`-style name: pid, index, camera, time, frame, box."""
  return (f"{pid:04d}_{index:03d}_{camera:02d}_{MSMT17_TIMES[index % 3]}_"
          f"{index * 7 + 15:04d}_{index % 2}.jpg")


def make_msmt17(manual_dir: pathlib.Path, form: str = "zip", release: str = "V1",
                lines: dict[str, list[str]] | None = None,
                drop: tuple[str, ...] = ()) -> dict:
  """Fake `MSMT17_V1.zip` (`train/`, `test/`) or `MSMT17_V2.zip` (`mask_train_v2/`, ...).

  `lines` replaces a list's lines (e.g. {"query": ["bad line"]}); `drop` leaves out the
  images at those paths (relative to their split folder). Returns {list name:
  {file_name: Expected}}.
  """
  top = f"MSMT17_{release}"
  train_dir, test_dir = ("train", "test") if release == "V1" else ("mask_train_v2",
                                                                   "mask_test_v2")
  tree, expected, i = {}, {}, 0
  for list_name, rows in MSMT17_LISTS.items():
    folder = train_dir if list_name in ("train", "val") else test_dir
    text, expected[list_name] = [], {}
    for pid, index, camera in rows:
      name = msmt17_name(pid, index, camera)
      rel = f"{pid:04d}/{name}"
      img = pattern(i, h=8, w=4)
      i += 1
      if rel not in drop:
        tree[f"{top}/{folder}/{rel}"] = png_bytes(img)
      text.append(f"{rel} {pid}")
      expected[list_name][name] = Expected(pid, camera - 1, img)
    text = (lines or {}).get(list_name, text)
    tree[f"{top}/list_{list_name}.txt"] = ("\n".join(text) + "\n").encode()
  write_tree(manual_dir, tree, form, f"{top}.zip")
  return expected
