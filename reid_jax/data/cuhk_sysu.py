"""tfds builder for CUHK-SYSU (Xiao et al., CVPR 2017) as a re-ID dataset of person crops.

CUHK-SYSU is a person *search* benchmark: 18,184 scene images (`Image/SSM/s1.jpg` ..)
with boxes, 5,532 training identities and 2,900 test queries. The authors' `dataset.zip`
extracts to `dataset/` holding `Image/SSM/` and `annotation/`; `cuhk_sysu.zip` /
`CUHK-SYSU.zip` (any top folder holding `annotation/`) and the extracted folder work too.

Annotation files (MATLAB v5, read with `scipy.io.loadmat`; layout as the release's README
describes it and the public loaders index it: the authors' ShuangLI59/person_search
`lib/datasets/psdb.py`, SeqNet `datasets/cuhk_sysu.py`). Fields are read by name, so
row/column orientation does not matter. Boxes (`idlocate`) are (x, y, w, h) in pixels.

* `annotation/test/train_test/Train.mat`: `Train`, an N x 1 cell array (5,532 cells),
  each a 1x1 struct with `idname` ('p1234'), `nAppear` and `scene`, a 1 x nAppear
  struct array of `imname` ('s1.jpg'), `idlocate`, `ishard`.
* `annotation/test/train_test/TestG{50,100,...,4000}.mat`: `TestG50` (etc.), a struct
  array of 2,900 queries with `Query` (1x1 struct: `imname`, `idlocate`, `ishard`,
  `idname`) and `Gallery` (1 x 50 struct array: `imname`, `idlocate`, `ishard`; the
  scenes holding the query person first; `idlocate` is empty (1x0, the loaders test
  `size == 0`) when the scene does not hold the person; all zeros is read the same).
* `annotation/Images.mat` (only for the `distractors` config): `Img`, a 1 x 18,184 struct
  array with `imname`, `nAppear` and `box`, a struct array of `idlocate`, `ishard` holding
  every annotated pedestrian of the scene, labelled or not.
  `annotation/pool.mat` (the 6,978 test scenes) and `Person.mat` are not needed.

Records (one per labelled box, cropped from its scene and stored as lossless PNG):

* Crop: rows y..y+h-1 and columns x..x+w-1 (0-based), i.e. the box (x1, y1, x2, y2) =
  (x, y, x + w, y + h) the person-search loaders use; the dataset README's MATLAB formula
  `I(y:y+h, x:x+w)` takes one more row and column. Boxes reaching outside the scene are
  clipped to it; a labelled box of zero width or height, or one wholly outside its
  scene, is an error naming the file (the public loaders drop no labelled box). Scenes are
  decoded as stored (no EXIF rotation: the boxes were drawn on the raw pixels).
* `person_id`: the number of `idname` ('p1234' -> 1234), stable and the same in every
  config; train and test identities are disjoint in the release. 0 = distractor.
* `camera_id`: CUHK-SYSU has no cameras (street snaps and movie frames), so every scene
  is its own camera: `camera_id = n - 1` for scene `s{n}.jpg`. A person appears at most
  once per scene, so the only gallery record that can share a query's person and
  camera is a copy of the query box itself: the evaluation's same-person-same-camera
  rule drops exactly that and keeps every match the search protocol counts.
* `file_name`: `s{n}_{x}_{y}_{w}_{h}.png`, the scene and the (unclipped) box.

Splits:

* `train`: every box of every person of `Train.mat` (all scenes, hard ones included).
* `query`: the 2,900 query boxes of `TestG50.mat`.
* `gallery`: the boxes of each query person in that query's gallery scenes (the
  non-empty `idlocate`s), once per (scene, box) across queries: the ground-truth
  matches of the 50-image protocol. Person search also needs detecting the person
  among the other people of those scenes; a re-ID gallery of crops cannot express
  that, so the default config keeps only the labelled matches.
* Config `distractors` adds every other annotated person (`Images.mat`, boxes of zero
  width or height skipped as the public loaders do) of the gallery scenes: with the
  id of that test person when the box is one of the labelled query/gallery boxes,
  else person_id 0. This puts the people a search model must reject into the gallery.

`CuhkSysuConfig(name=..., gallery_size=100, distractors=True)` reads `TestG100.mat`
instead: its gallery holds more scenes, so only the distractors change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import pathlib
import re
import zipfile
from typing import Any, Iterable, NamedTuple

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from reid_jax.data.common import Archive, ReidBuilder, ReidDataError, encode_png
from reid_jax.data.common import reid_features

_HOMEPAGE = "http://www.ee.cuhk.edu.hk/~xgwang/PS/dataset.html"
_SOURCE = ("request the dataset (dataset.zip) from its authors, see "
           "https://github.com/ShuangLI59/person_search")
#: Archive names and folders accepted in `manual_dir`, the authors' first.
_ZIP_NAMES = ("dataset.zip", "cuhk_sysu.zip", "CUHK-SYSU.zip")
_FOLDERS = ("dataset", "cuhk_sysu", "CUHK-SYSU")
_SCENES = "Image/SSM"
_TRAIN = "annotation/test/train_test/Train.mat"
_IMAGES = "annotation/Images.mat"
_GALLERY_SIZES = (50, 100, 500, 1000, 2000, 4000)
_SCENE_NAME = re.compile(r"s(?P<number>\d+)\.jpg")
_ID_NAME = re.compile(r"p(?P<number>\d+)")

Box = tuple[int, int, int, int]  # x, y, w, h in pixels


@dataclasses.dataclass(eq=False)
class CuhkSysuConfig(tfds.core.BuilderConfig):
  """CUHK-SYSU variant.

  Attributes:
    gallery_size: which `TestG{gallery_size}.mat` protocol defines query and gallery.
    distractors: also put the other people of the gallery scenes in the gallery.
  """

  gallery_size: int = 50
  distractors: bool = False


class Crop(NamedTuple):
  """One box to cut out: its scene, (x, y, w, h), label and where it was annotated."""

  scene: str
  box: Box
  person_id: int
  source: str


def protocol_rel(gallery_size: int) -> str:
  """Path below the archive root of the `TestG{gallery_size}.mat` protocol."""
  return f"annotation/test/train_test/TestG{gallery_size}.mat"


# ------------------------------------------------------------------- .mat parsing


def structs(value: Any, where: str) -> list[np.void]:
  """The struct records of a MATLAB struct array or cell array of them, flattened.

  Reading fields by name (not position) keeps this independent of whether a variable is
  stored 1 x N or N x 1, as a struct array or a cell array of 1x1 structs.
  """
  arr = np.asarray(value)
  if arr.dtype.names:
    return list(arr.reshape(-1))
  if arr.dtype == object:
    return [rec for cell in arr.reshape(-1) for rec in structs(cell, where)]
  if arr.size == 0:
    return []
  raise ReidDataError(f"{where}: wrong layout, expected a struct array, got {arr.dtype}")


def field(record: np.void, name: str, where: str) -> Any:
  """Field `name` of a struct record, or a one-line error naming the file."""
  if name not in (record.dtype.names or ()):
    raise ReidDataError(f"{where}: wrong layout, struct field {name!r} is missing")
  return record[name]


def text(value: Any, where: str) -> str:
  """A MATLAB char array (possibly wrapped in 1x1 cells) as a Python string."""
  arr = np.asarray(value)
  while arr.dtype == object and arr.size == 1:
    arr = np.asarray(arr.reshape(-1)[0])
  if arr.dtype.kind == "U" and arr.size == 1:
    return str(arr.reshape(-1)[0]).strip()
  raise ReidDataError(f"{where}: expected a string, got a {arr.dtype} array of shape {arr.shape}")


def box(value: Any, where: str) -> Box | None:
  """An `idlocate` as integer (x, y, w, h); None when empty or all zeros (no person)."""
  arr = np.asarray(value)
  while arr.dtype == object and arr.size == 1:
    arr = np.asarray(arr.reshape(-1)[0])
  try:
    flat = arr.astype(np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise ReidDataError(f"{where}: idlocate is not numeric ({arr.dtype})") from None
  if flat.size == 0 or not flat.any():
    return None
  if flat.size != 4 or not np.isfinite(flat).all():
    raise ReidDataError(f"{where}: idlocate should be 4 numbers (x, y, w, h), got {flat.tolist()}")
  return tuple(int(v) for v in np.round(flat))


def labelled_box(value: Any, where: str) -> Box:
  """The box of a labelled person: present and of positive size, else an error."""
  b = value if isinstance(value, tuple) else box(value, where)
  if b is None or b[2] <= 0 or b[3] <= 0:
    what = "is empty" if b is None else f"(x, y, w, h) = {b} has no area"
    raise ReidDataError(f"{where}: labelled box {what}; check that it is the complete "
                        "official file (re-extract the archive)")
  return b


def person_number(idname: str, where: str) -> int:
  """'p1234' -> 1234 (ids start at 1; 0 is kept for distractors)."""
  match = _ID_NAME.fullmatch(idname)
  if match is None or int(match["number"]) < 1:
    raise ReidDataError(f"{where}: unexpected idname {idname!r}, expected names like p1234")
  return int(match["number"])


def scene_camera(scene: str, where: str = "") -> int:
  """The camera id of scene `s{n}.jpg`: n - 1 (every scene is its own camera)."""
  match = _SCENE_NAME.fullmatch(scene)
  if match is None or int(match["number"]) < 1:
    raise ReidDataError(f"{where or scene}: unexpected scene name {scene!r}, expected "
                        "names like s1.jpg")
  return int(match["number"]) - 1


def parse_train(train: Any, where: str) -> list[Crop]:
  """Every labelled box of `Train.mat`'s `Train` variable."""
  crops = []
  for i, person in enumerate(structs(train, where), start=1):
    at = f"{where}: Train{{{i}}}"
    pid = person_number(text(field(person, "idname", at), at), at)
    for j, scene in enumerate(structs(field(person, "scene", at), at), start=1):
      sat = f"{at}.scene({j})"
      name = text(field(scene, "imname", sat), sat)
      scene_camera(name, sat)
      crops.append(Crop(name, labelled_box(field(scene, "idlocate", sat), sat), pid, sat))
  return crops


def parse_test(test: Any, where: str) -> tuple[list[Crop], list[Crop], list[str]]:
  """(queries, gallery matches, all gallery scenes) of a `TestG*.mat` protocol."""
  queries, matches, scenes = [], [], []
  for i, item in enumerate(structs(test, where), start=1):
    at = f"{where}: query {i}"
    query = structs(field(item, "Query", at), at)
    if len(query) != 1:
      raise ReidDataError(f"{at}: wrong layout, Query should be one struct, got {len(query)}")
    query = query[0]
    pid = person_number(text(field(query, "idname", at), at), at)
    name = text(field(query, "imname", at), at)
    scene_camera(name, at)
    queries.append(Crop(name, labelled_box(field(query, "idlocate", at), at), pid, at))
    for j, entry in enumerate(structs(field(item, "Gallery", at), at), start=1):
      gat = f"{at}, gallery {j}"
      name = text(field(entry, "imname", gat), gat)
      scene_camera(name, gat)
      scenes.append(name)
      b = box(field(entry, "idlocate", gat), gat)
      if b is not None:  # The query person is in this scene.
        matches.append(Crop(name, labelled_box(b, gat), pid, gat))
  return queries, matches, scenes


def parse_images(images: Any, where: str) -> dict[str, list[Box]]:
  """Scene -> every annotated box of `Images.mat`'s `Img`, zero-size boxes dropped."""
  out = {}
  for i, image in enumerate(structs(images, where), start=1):
    at = f"{where}: Img({i})"
    name = text(field(image, "imname", at), at)
    boxes = []
    for j, entry in enumerate(structs(field(image, "box", at), at), start=1):
      b = box(field(entry, "idlocate", at), f"{at}.box({j})")
      if b is not None and b[2] > 0 and b[3] > 0:
        boxes.append(b)
    out[name] = boxes
  return out


def unique(crops: Iterable[Crop]) -> list[Crop]:
  """`crops` with repeated (scene, box) dropped; one box with two ids is an error."""
  seen: dict[tuple[str, Box], Crop] = {}
  for c in crops:
    first = seen.setdefault((c.scene, c.box), c)
    if first.person_id != c.person_id:
      raise ReidDataError(f"{c.source}: box {c.box} in {c.scene} is person {c.person_id} here "
                          f"but {first.person_id} in {first.source}")
  return list(seen.values())


def add_distractors(gallery: list[Crop], labelled: Iterable[Crop], scenes: Iterable[str],
                    boxes: dict[str, list[Box]], where: str) -> list[Crop]:
  """`gallery` plus every other annotated box of `scenes`.

  A box that is a labelled box of a test person (`labelled`: queries and matches) keeps
  that person's id; any other gets person_id 0.
  """
  known = {(c.scene, c.box): c.person_id for c in labelled}
  have = {(c.scene, c.box) for c in gallery}
  out = list(gallery)
  for scene in dict.fromkeys(scenes):
    if scene not in boxes:
      raise ReidDataError(f"{where}: gallery scene {scene} has no entry; the annotation "
                          "files do not match, re-extract the archive")
    for b in boxes[scene]:
      if (scene, b) not in have:
        have.add((scene, b))
        out.append(Crop(scene, b, known.get((scene, b), 0), f"{where}: {scene}"))
  return out


# ------------------------------------------------------------------- images


def clip(b: Box, height: int, width: int) -> tuple[int, int, int, int] | None:
  """Pixel rows/columns (y0, y1, x0, x1) of box (x, y, w, h) inside the scene, or None."""
  x, y, w, h = b
  x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
  if x1 <= x0 or y1 <= y0:
    return None
  return y0, y1, x0, x1


def decode_scene(data: bytes, where: str) -> np.ndarray:
  """HxWx3 uint8 pixels of a scene file, as stored (no EXIF rotation)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ReidDataError(f"{where}: corrupt or unreadable image ({e})") from None


def crop_name(c: Crop) -> str:
  """`s{n}_{x}_{y}_{w}_{h}.png`: unique per (scene, box)."""
  x, y, w, h = c.box
  return f"{c.scene.rsplit('.', 1)[0]}_{x}_{y}_{w}_{h}.png"


# ------------------------------------------------------------------- archive


def _has_annotation(archive: Archive, prefix: str) -> bool:
  return archive.is_dir(f"{prefix}annotation") and archive.is_dir(f"{prefix}{_SCENES}")


def open_release(manual_dir: pathlib.Path, stack: contextlib.ExitStack
                ) -> tuple[Archive, str]:
  """The release in `manual_dir` and the prefix of its root inside it ('dataset/' ...).

  Looks for one of `_ZIP_NAMES` (any top folder holding `annotation/` and `Image/SSM/`),
  then for an extracted folder `_FOLDERS`, then for `manual_dir` itself being the root.
  """
  for zip_name in _ZIP_NAMES:
    path = manual_dir / zip_name
    if not path.is_file():
      continue
    try:
      zf = stack.enter_context(zipfile.ZipFile(path))
    except (zipfile.BadZipFile, OSError) as e:
      raise ReidDataError(f"{path}: not a readable zip file ({e})") from None
    archive = Archive(str(path), zip_file=zf)
    tops = [d for d in archive.listdir("") if d.endswith("/")] + [""]
    for prefix in tops:
      if _has_annotation(archive, prefix):
        return archive, prefix
    raise ReidDataError(f"{path}: wrong layout, expected a folder holding annotation/ and "
                        f"{_SCENES}/ inside (the authors' dataset.zip holds dataset/)")
  archive = Archive(str(manual_dir), root=manual_dir)
  for prefix in [f"{f}/" for f in _FOLDERS] + [""]:
    if _has_annotation(archive, prefix):
      return archive, prefix
  raise ReidDataError(
      f"Missing CUHK-SYSU in {manual_dir}: put {' or '.join(_ZIP_NAMES)} there (or its "
      f"extracted folder holding annotation/ and {_SCENES}/): {_SOURCE}")


def _exists(archive: Archive, rel: str) -> bool:
  parent, _, name = rel.rpartition("/")
  return archive.is_dir(parent) and name in archive.listdir(parent)


def _fix(archive: Archive) -> str:
  return "download the zip again" if archive.is_zip else "re-extract the archive"


def require(archive: Archive, rel: str) -> None:
  """A one-line error naming `rel` and the fix if the release lacks that file."""
  if not _exists(archive, rel):
    raise ReidDataError(f"{archive.where(rel)}: file is missing; it is part of the CUHK-SYSU "
                        f"release ({_fix(archive)}, or {_SOURCE})")


def load_mat(archive: Archive, rel: str, key: str) -> Any:
  """Variable `key` of the MATLAB v5 file `rel`; missing or unreadable is one line."""
  require(archive, rel)
  where = archive.where(rel)
  try:
    mat = scipy.io.loadmat(io.BytesIO(archive.read(rel)))
  except (ValueError, OSError, NotImplementedError, TypeError, IndexError,
          scipy.io.matlab.MatReadError) as e:
    raise ReidDataError(f"{where}: not a readable MATLAB .mat file ({e})") from None
  if key not in mat:
    raise ReidDataError(f"{where}: wrong layout, variable {key!r} is missing")
  return mat[key]


def check_scenes(archive: Archive, prefix: str, splits: dict[str, list[Crop]]) -> None:
  """Every scene the splits crop from is in `Image/SSM/`; else one line naming one."""
  folder = f"{prefix}{_SCENES}"
  present = set(archive.listdir(folder))
  needed = {c.scene for crops in splits.values() for c in crops}
  missing = sorted(needed - present, key=lambda s: (len(s), s))
  if missing:
    raise ReidDataError(
        f"{archive.where(f'{folder}/{missing[0]}')}: scene image is missing ({len(missing)} "
        f"of the {len(needed)} scenes to crop are); {_fix(archive)}")


class CuhkSysu(ReidBuilder):
  """CUHK-SYSU person crops: 5,532 train identities, 2,900 queries (TestG50 protocol)."""

  name = "cuhk_sysu"
  HAS_DISTRACTORS_AND_JUNK = True  # The `distractors` config labels other people 0.
  BUILDER_CONFIGS = [
      CuhkSysuConfig(name="default", description=(
          "TestG50 protocol; gallery = the query persons' labelled boxes in their "
          "gallery scenes.")),
      CuhkSysuConfig(name="distractors", distractors=True, description=(
          "TestG50 protocol; gallery also holds every other annotated person of the "
          "gallery scenes (person_id 0 unless a labelled test person).")),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the CUHK-SYSU release in `manual_dir`: `dataset.zip` as the authors send it
  ({_SOURCE}), also accepted as `cuhk_sysu.zip` / `CUHK-SYSU.zip`, or its extracted
  folder (`dataset/`, `cuhk_sysu/` or `CUHK-SYSU/` holding `Image/SSM/` and
  `annotation/`; `manual_dir` itself may be that folder).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "CUHK-SYSU person search boxes as re-ID crops. Splits: train (Train.mat), "
            "query (TestG50 queries), gallery (the query persons' boxes in their gallery "
            "scenes). person_id = number of idname, camera_id = scene number - 1."),
        features=reid_features(),
        homepage=_HOMEPAGE,
        citation="""@inproceedings{xiaoli2017joint,
  title={Joint Detection and Identification Feature Learning for Person Search},
  author={Xiao, Tong and Li, Shuang and Wang, Bochao and Lin, Liang and Wang, Xiaogang},
  booktitle={CVPR}, year={2017}}""",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: CuhkSysuConfig = self.builder_config
    if config.gallery_size not in _GALLERY_SIZES:
      raise ReidDataError(f"cuhk_sysu config {config.name!r}: gallery_size must be one of "
                          f"{', '.join(map(str, _GALLERY_SIZES))}")
    manual_dir = self.manual_path(dl_manager, "dataset.zip", _SOURCE)
    archive, root = open_release(manual_dir, self.resources)
    rels = {"train": f"{root}{_TRAIN}", "test": f"{root}{protocol_rel(config.gallery_size)}"}
    if config.distractors:
      rels["images"] = f"{root}{_IMAGES}"
    for rel in rels.values():  # Every file exists before the slow parts.
      require(archive, rel)
    key = f"TestG{config.gallery_size}"
    train = parse_train(load_mat(archive, rels["train"], "Train"), archive.where(rels["train"]))
    where = archive.where(rels["test"])
    query, matches, scenes = parse_test(load_mat(archive, rels["test"], key), where)
    gallery = unique(matches)
    if config.distractors:
      at = archive.where(rels["images"])
      boxes = parse_images(load_mat(archive, rels["images"], "Img"), at)
      gallery = add_distractors(gallery, query + matches, scenes, boxes, at)
    splits = {"train": unique(train), "query": unique(query), "gallery": gallery}
    check_scenes(archive, root, splits)
    return {split: self._generate_examples(archive, root, crops)
            for split, crops in splits.items()}

  def _generate_examples(self, archive: Archive, root: str, crops: list[Crop]):
    """Crops scene by scene (each scene decoded once), in scene-number order."""
    order = sorted(crops, key=lambda c: (scene_camera(c.scene), c.box))
    for scene, group in itertools.groupby(order, key=lambda c: c.scene):
      rel = f"{root}{_SCENES}/{scene}"
      pixels = decode_scene(archive.read(rel), archive.where(rel))
      for c in group:
        rows_cols = clip(c.box, *pixels.shape[:2])
        if rows_cols is None:
          raise ReidDataError(
              f"{c.source}: box {c.box} lies outside scene {archive.where(rel)} "
              f"({pixels.shape[1]}x{pixels.shape[0]}); annotation and image do not match")
        y0, y1, x0, x1 = rows_cols
        name = crop_name(c)
        yield name, {
            "image": encode_png(pixels[y0:y1, x0:x1]),
            "person_id": c.person_id,
            "camera_id": scene_camera(scene),
            "file_name": name,
        }
