"""tfds builder for MSMT17 (Wei et al., CVPR 2018): 126,441 crops of 4,101 identities, 15 cameras.

Layout of the official archives (zip or extracted folder):

* `MSMT17_V1.zip` -> `MSMT17_V1/` with image folders `train/` and `test/`;
* `MSMT17_V2.zip` -> `MSMT17_V2/` with `mask_train_v2/` and `mask_test_v2/` (the same
  images with faces blurred); folder names are matched case-insensitively;
* both: `list_train.txt`, `list_val.txt` (paths below the train folder),
  `list_query.txt`, `list_gallery.txt` (below the test folder), one image per line as
  `relative/path.jpg PID`, e.g. `0000/0000_000_01_0303morning_0015_0.jpg 0`.

`person_id` is the list's PID as-is (train ids 0..1,040, test ids 0..3,059: the two
number ranges overlap, as in the release). `camera_id` is the third underscore field
of the file name minus one (`..._01_...` -> 0), checked to be within 1..15.
`file_name` is the image's name without its folder.

Splits (configs `v1`, `v2`): `train` = list_train + list_val, the paper's training set
of 32,621 images of 1,041 identities (30,248 + 2,373; TransReID and CLIP-ReID train on
both as well); `query` 11,659 and `gallery` 82,161 images of the 3,060 test identities.
torchreid, fast-reid and reid-strong-baseline train on list_train only by default: configs
`v1_separate_val`, `v2_separate_val` give `train` = list_train and a fourth split `val`
= list_val (its identities are training identities). The version is part of the config
name, so V1 and V2 (different pixels) never share one prepared dataset.

Bad input is a one-line `ReidDataError`: a missing archive, folder or list, a malformed
list line (not `path PID`, a PID that is not an integer, a name without a camera field,
a camera outside 1..15), a listed image missing from the archive, an image listed twice
in one split.
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow_datasets as tfds

from reid_jax.data.common import Archive, ReidBuilder, ReidDataError, image_file
from reid_jax.data.common import reid_features

_HOMEPAGE = "http://www.pkuvmc.com/publications/msmt17.html"
_HINT = (f"request it from the MSMT17 page ({_HOMEPAGE}, signed release agreement), then "
         "put the zip (or its extracted folder) there")
_NUM_CAMERAS = 15
#: Split folders per version (lower case; the archive's own spelling is found).
_FOLDERS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
_LINE = re.compile(r"(?P<path>\S+\.jpg)\s+(?P<pid>\d+)", re.IGNORECASE)
_NAME = re.compile(r"\d+_\d+_(?P<camera>\d+)_[^/]*\.jpg", re.IGNORECASE)
_EXAMPLE = "0000/0000_000_01_0303morning_0015_0.jpg 0"


@dataclasses.dataclass(eq=False)
class Msmt17Config(tfds.core.BuilderConfig):
  """MSMT17 variant.

  Attributes:
    release: `V1` (original images) or `V2` (faces blurred).
    separate_val: keep list_val as split `val` instead of adding it to `train`.
  """

  release: str = "V2"
  separate_val: bool = False

  @property
  def top(self) -> str:
    return f"MSMT17_{self.release}"


def _configs() -> list[Msmt17Config]:
  out = []
  for release in ("V1", "V2"):
    out.append(Msmt17Config(
        name=release.lower(), release=release,
        description=f"MSMT17_{release}: train = list_train + list_val, query, gallery."))
    out.append(Msmt17Config(
        name=f"{release.lower()}_separate_val", release=release, separate_val=True,
        description=f"MSMT17_{release}: train = list_train, val = list_val, query, gallery."))
  return out


def parse_list(text: str, where: str) -> list[tuple[str, int, int, int]]:
  """(path, person id, 0-based camera, line number) of every line of an MSMT17 list.

  Blank lines are ignored; anything else that is not `relative/path.jpg PID` with a
  camera field 1..15 in the name is a one-line error naming `where` and the line.
  """
  out = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    match = _LINE.fullmatch(line.strip())
    name = match["path"].rsplit("/", 1)[-1] if match else ""
    camera = _NAME.fullmatch(name) if match else None
    if camera is None:
      raise ReidDataError(f"{where} line {number}: malformed line {line.strip()[:80]!r}; "
                          f"expected `relative/path.jpg PID` as in `{_EXAMPLE}` (the camera "
                          "is the name's third field); fix or re-extract the list")
    cam = int(camera["camera"])
    if not 1 <= cam <= _NUM_CAMERAS:
      raise ReidDataError(f"{where} line {number}: camera {cam} of {name} is outside "
                          f"1..{_NUM_CAMERAS}; fix or re-extract the list")
    out.append((match["path"], int(match["pid"]), cam - 1, number))
  return out


def _files_below(archive: Archive, folder: str) -> set[str]:
  """Paths of all files below `folder`, relative to it."""
  out, todo = set(), [""]
  while todo:
    sub = todo.pop()
    for entry in archive.listdir(f"{folder}/{sub}" if sub else folder):
      rel = f"{sub}/{entry}" if sub else entry
      if entry.endswith("/"):
        todo.append(rel.rstrip("/"))
      else:
        out.add(rel)
  return out


class Msmt17(ReidBuilder):
  """MSMT17: 4,101 identities, 15 cameras (V1 or V2 release)."""

  name = "msmt17"
  BUILDER_CONFIGS = _configs()
  DEFAULT_BUILDER_CONFIG_NAME = "v2"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put `MSMT17_V2.zip` (config `v2`, the default) or `MSMT17_V1.zip` (config `v1`),
  obtained from {_HOMEPAGE} after signing the release agreement, in `manual_dir` as
  downloaded; the extracted folder (`MSMT17_V2/` with `mask_train_v2/`, `mask_test_v2/`
  and the `list_*.txt` files, or `MSMT17_V1/` with `train/` and `test/`) works too.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "MSMT17 person re-identification (15 cameras). Splits: train (list_train + "
            "list_val: 32,621 images, 1,041 ids; *_separate_val configs: list_train only "
            "plus split val), query (11,659 images), gallery (82,161 images), 3,060 test "
            "ids. person_id is the list's PID; camera_id the name's camera field minus 1."),
        features=reid_features(),
        homepage=_HOMEPAGE,
        citation="""@inproceedings{wei2018person,
  title={Person Transfer GAN to Bridge Domain Gap for Person Re-Identification},
  author={Wei, Longhui and Zhang, Shiliang and Gao, Wen and Tian, Qi},
  booktitle={CVPR}, year={2018}}""",
    )

  def _open(self, dl_manager) -> Archive:
    cfg = self.builder_config
    zip_name = f"{cfg.top}.zip"
    manual_dir = self.manual_path(dl_manager, zip_name, _HINT)
    if not (manual_dir / zip_name).is_file() and not (manual_dir / cfg.top).is_dir():
      other = "V1" if cfg.release == "V2" else "V2"
      if (manual_dir / f"MSMT17_{other}.zip").is_file() or (
          manual_dir / f"MSMT17_{other}").is_dir():
        raise ReidDataError(
            f"Missing {zip_name} (or {cfg.top}/) in {manual_dir}, which holds MSMT17_{other}: "
            f"prepare msmt17/{other.lower()} (or msmt17/{other.lower()}_separate_val) instead")
    return Archive.open(manual_dir, zip_name, cfg.top, _HINT, self.resources)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    archive = self._open(dl_manager)
    entries = {e.rstrip("/").lower(): e.rstrip("/") for e in archive.listdir(cfg.top)}
    folders = []
    for want in _FOLDERS[cfg.release]:
      if want not in entries:
        raise ReidDataError(f"{archive.where(cfg.top)}: wrong layout, no {want}/ folder "
                            f"(MSMT17_{cfg.release} has {'/, '.join(_FOLDERS[cfg.release])}/); "
                            "download the zip again or re-extract it")
      folders.append(f"{cfg.top}/{entries[want]}")
    train_dir, test_dir = folders
    lists = {name: self._read_list(archive, f"{cfg.top}/list_{name}.txt")
             for name in ("train", "val", "query", "gallery")}
    if cfg.separate_val:
      splits = {"train": [("train", train_dir)], "val": [("val", train_dir)]}
    else:
      splits = {"train": [("train", train_dir), ("val", train_dir)]}
    splits.update(query=[("query", test_dir)], gallery=[("gallery", test_dir)])
    # Check every split (lines, files, duplicates) before writing anything.
    files = {d: _files_below(archive, d) for d in folders}
    items = {split: self._items(archive, parts, lists, files) for split, parts in splits.items()}
    return {split: self._generate_examples(archive, its) for split, its in items.items()}

  def _read_list(self, archive: Archive, rel: str) -> list[tuple[str, int, int, int]]:
    try:
      text = archive.read(rel).decode("utf-8")
    except UnicodeDecodeError as e:
      raise ReidDataError(f"{archive.where(rel)}: not a text file ({e})") from None
    return parse_list(text, archive.where(rel))

  def _items(self, archive: Archive, parts, lists, files) -> list[tuple[str, str, int, int]]:
    """(record key, archive path, person id, camera) of one split, checked."""
    out, seen = [], {}
    for list_name, folder in parts:
      where = archive.where(f"{folder.split('/')[0]}/list_{list_name}.txt")
      for path, pid, cam, line in lists[list_name]:
        if path not in files[folder]:
          raise ReidDataError(f"{where} line {line}: {path} is missing from "
                              f"{archive.where(folder)}; download the zip again or "
                              "re-extract it")
        if path in seen:
          raise ReidDataError(f"{where} line {line}: {path} is listed twice in the split "
                              f"(first by {seen[path]}); remove one line")
        seen[path] = f"list_{list_name}.txt line {line}"
        out.append((path, f"{folder}/{path}", pid, cam))
    if not out:
      names = " + ".join(f"list_{n}.txt" for n, _ in parts)
      raise ReidDataError(f"{archive.where(parts[0][1].split('/')[0])}: {names} list no "
                          "images; download the zip again or re-extract it")
    return out

  def _generate_examples(self, archive: Archive, items):
    for key, rel, pid, cam in items:
      yield key, {
          "image": image_file(archive.read(rel), archive.where(rel)),
          "person_id": pid,
          "camera_id": cam,
          "file_name": key.rsplit("/", 1)[-1],
      }
