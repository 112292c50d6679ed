"""tfds builder `folder`: a user's own person crops as a re-ID dataset (train, query, gallery).

Two inputs, prepared with `python -m reid_jax.prepare folder ...`:

* A folder tree (`--manual_dir=DIR`): `DIR/train/`, `DIR/query/` and `DIR/gallery/`,
  each listed recursively. The regex `--config.pattern` is searched (`re.search`) in every
  file's name (`0002_c1s1_000451_03.jpg`), or, when the pattern holds a `/`, in its path
  below the split folder (`0002/a.jpg`: `^(?P<pid>\d+)/` for one folder per person); its
  named group `pid` gives the person id and the optional group `camid` the camera.
  Default: Market-1501's naming, `DEFAULT_PATTERN`.
* A CSV manifest (`--config.manifest=FILE`, relative to `--manual_dir` or absolute): a
  header row naming the columns `file,person_id,camera_id,split` (any order; `camera_id`
  may be left out or empty for every row), `file` relative to the manifest's folder,
  `split` one of train, query, gallery.

Records: `person_id` is the integer as given (no renumbering); the camera values seen
(any strings) are numbered 0.. in sorted order, numeric when all are integers (Market's
c1..c6 -> 0..5 when all six occur); `file_name` is the path below the split folder (tree)
or the manifest's `file`. Without cameras every record gets camera_id -1
(`UNKNOWN_CAMERA`): evaluation then counts every gallery item as another camera and says
so in one line. Cameras given for some files and not others are an error.

Prepared variants: each set of inputs is its own tfds config, `tree_<hash>` or
`manifest_<hash>`, the hash (10 hex digits of SHA-256) taken over the form, the pattern,
the absolute source folder or manifest path and the manifest's bytes. So two patterns,
two source folders or two manifest versions never share one prepared dataset, and
preparing the same inputs again reuses it. (Images changed inside an unchanged tree are
not detected: prepare into a new `--data_dir` or move the prepared folder away.) Once
prepared, tfds reads `folder/<config>` from its files (configs not in code are loaded
from data_dir), so training takes `--config.dataset.name=folder
--config.dataset.builder_config=<config>` as printed by `prepare`.

Bad input is a one-line `ReidDataError` naming the file or setting and the fix: a name the
pattern does not match, a manifest row naming a missing file, an empty split folder, a
person id that is not an integer, no images at all, a non-image file (only
`common.is_skipped_file` names such as `Thumbs.db` are skipped in a tree).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
from typing import Any, Iterator

import tensorflow_datasets as tfds
from PIL import Image

from reid_jax.data.common import ReidBuilder, ReidDataError, image_file, is_skipped_file
from reid_jax.data.common import reid_features

#: Market-1501's naming: `0002_c1s1_000451_03.jpg` -> person 2, camera 1.
DEFAULT_PATTERN = r"^(?P<pid>-?\d+)_c(?P<camid>\d+)"
#: camera_id stored when the input gives no cameras (`reid_jax.evaluation.metrics`'s).
UNKNOWN_CAMERA = -1
SPLITS = ("train", "query", "gallery")
MANIFEST_COLUMNS = ("file", "person_id", "camera_id", "split")
_USAGE = ("python -m reid_jax.prepare folder --manual_dir=DIR "
          "[--config.pattern=REGEX | --config.manifest=FILE]")


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """One set of inputs of the `folder` builder (build it with `make_config`).

  Attributes:
    form: `tree` (split folders + pattern) or `manifest` (CSV).
    source: absolute path of the tree's root folder or of the manifest file.
    pattern: the file-name regex (tree form; "" for a manifest).
  """

  form: str = "tree"
  source: str = ""
  pattern: str = ""


@dataclasses.dataclass(frozen=True)
class _Item:
  """One image to store."""

  key: str  # record key and file_name: path below the split folder / manifest `file`
  path: pathlib.Path
  person_id: int
  camera: str | None  # the camera value as written, None when not given
  where: str  # how an error names it


def _compile(pattern: str) -> re.Pattern:
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ReidDataError(f"--config.pattern={pattern!r} is not a valid regular expression "
                        f"({e}); fix the pattern") from None
  if "pid" not in rx.groupindex:
    raise ReidDataError(f"--config.pattern={pattern!r} has no named group pid: mark the "
                        r"person id as (?P<pid>\d+) (and the camera as (?P<camid>...))")
  return rx


def make_config(manual_dir: str | os.PathLike | None = None, pattern: str | None = None,
                manifest: str | os.PathLike | None = None) -> FolderConfig:
  """The config of one set of inputs; its name is a hash of them (module docstring)."""
  if pattern and manifest:
    raise ReidDataError("--config.pattern and --config.manifest exclude each other: a "
                        "manifest gives the ids itself; drop one")
  if manifest:
    path = pathlib.Path(os.path.expanduser(os.fspath(manifest)))
    if not path.is_absolute():
      path = pathlib.Path(os.path.expanduser(os.fspath(manual_dir or "."))) / path
    path = path.resolve()
    if not path.is_file():
      raise ReidDataError(f"--config.manifest={os.fspath(manifest)}: no such file ({path}); "
                          "give the CSV's path, absolute or relative to --manual_dir")
    content = hashlib.sha256(path.read_bytes()).hexdigest()
    form, source, pattern = "manifest", str(path), ""
  else:
    if not manual_dir:
      raise ReidDataError("folder: no --manual_dir given; pass the folder holding train/, "
                          f"query/ and gallery/ (usage: {_USAGE})")
    root = pathlib.Path(os.path.expanduser(os.fspath(manual_dir))).resolve()
    if not root.is_dir():
      raise ReidDataError(f"--manual_dir={os.fspath(manual_dir)}: no such folder ({root})")
    pattern = pattern or DEFAULT_PATTERN
    _compile(pattern)
    content, form, source = "", "tree", str(root)
  key = json.dumps({"form": form, "source": source, "pattern": pattern,
                    "manifest_sha256": content}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:10]
  option = (f"--config.manifest={source}" if form == "manifest"
            else f"--manual_dir={source} --config.pattern='{pattern}'")
  return FolderConfig(name=f"{form}_{digest}", form=form, source=source, pattern=pattern,
                      description=f"prepared by: python -m reid_jax.prepare folder {option}")


def _image_suffixes() -> frozenset[str]:
  """File extensions PIL can read (`.jpg`, `.png`, `.bmp`, ...)."""
  return frozenset(ext.lower() for ext in Image.registered_extensions())


def _check_image_name(path: pathlib.Path, where: str, fix: str) -> None:
  if path.suffix.lower() not in _image_suffixes():
    raise ReidDataError(f"{where}: not an image file (extension {path.suffix or 'none'!r}); "
                        f"{fix}")


def _person_id(value: str, where: str, source: str) -> int:
  try:
    return int(value.strip())
  except ValueError:
    raise ReidDataError(f"{where}: person id {value!r} ({source}) is not an integer; "
                        "person ids must be integers") from None


def tree_items(root: pathlib.Path, pattern: str) -> dict[str, list[_Item]]:
  """{split: images} of a split-folder tree, checked (module docstring)."""
  rx = _compile(pattern)
  missing = [s for s in SPLITS if not (root / s).is_dir()]
  if missing:
    raise ReidDataError(
        f"{root}: no {'/, '.join(missing)}/ folder; a folder dataset needs train/, query/ "
        "and gallery/ sub-folders (or pass --config.manifest=FILE)")
  out = {}
  for split in SPLITS:
    items = []
    for path in sorted(p for p in (root / split).rglob("*") if not p.is_dir()):
      if is_skipped_file(path.name):
        continue
      rel = path.relative_to(root / split).as_posix()
      _check_image_name(path, str(path), "remove it or move it out of the split folder "
                        "(only Thumbs.db files are skipped)")
      target = rel if "/" in pattern else path.name
      match = rx.search(target)
      if match is None:
        raise ReidDataError(f"{path}: {target!r} does not match --config.pattern="
                            f"{pattern!r}; rename the file or pass a --config.pattern with "
                            "a named group (?P<pid>...) that matches it")
      camera = match.groupdict().get("camid")
      items.append(_Item(rel, path, _person_id(match["pid"], str(path),
                                               f"group pid of --config.pattern={pattern!r}"),
                         camera, str(path)))
    out[split] = items
  if not any(out.values()):
    raise ReidDataError(f"{root}: no images at all in train/, query/ or gallery/; put the "
                        "crops there (or pass --config.manifest=FILE)")
  for split, items in out.items():
    if not items:
      raise ReidDataError(f"{root / split} holds no images; the {split} split needs at "
                          "least one")
  return out


def _manifest_rows(path: pathlib.Path) -> Iterator[tuple[int, dict[str, str]]]:
  """(line number, {column: value}) of every non-blank row, the header checked."""
  try:
    text = path.read_text(encoding="utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise ReidDataError(f"{path}: cannot read the manifest ({e})") from None
  reader = csv.reader(io.StringIO(text, newline=""))
  header = next(reader, None)
  wanted = ",".join(MANIFEST_COLUMNS)
  if not header or not any(h.strip() for h in header):
    raise ReidDataError(f"{path}: empty manifest; its first row must be the header {wanted}")
  header = [h.strip() for h in header]
  unknown = [h for h in header if h not in MANIFEST_COLUMNS]
  if unknown or len(set(header)) != len(header):
    what = f"unknown column(s) {unknown}" if unknown else "a column given twice"
    raise ReidDataError(f"{path}: header {','.join(header)} has {what}; the columns are "
                        f"{wanted} (camera_id may be left out)")
  for column in ("file", "person_id"):
    if column not in header:
      raise ReidDataError(f"{path}: no {column} column; the header must be {wanted}")
  if "split" not in header:
    raise ReidDataError(f"{path}: no split column; add one to the header ({wanted}) and "
                        "give each row train, query or gallery")
  for row in reader:
    line = reader.line_num
    if not any(v.strip() for v in row):
      continue
    if len(row) != len(header):
      raise ReidDataError(f"{path} line {line}: {len(row)} fields, the header has "
                          f"{len(header)} ({','.join(header)}); fix that row")
    yield line, dict(zip(header, (v.strip() for v in row)))


def manifest_items(path: pathlib.Path) -> dict[str, list[_Item]]:
  """{split: images} of a CSV manifest, checked (module docstring)."""
  out: dict[str, list[_Item]] = {s: [] for s in SPLITS}
  seen: set[tuple[str, str]] = set()
  for line, row in _manifest_rows(path):
    where = f"{path} line {line}"
    if not row["file"]:
      raise ReidDataError(f"{where}: empty file; give the image's path relative to "
                          f"{path.parent}")
    if row["split"] not in SPLITS:
      raise ReidDataError(f"{where}: split {row['split']!r} is not one of "
                          f"{', '.join(SPLITS)}; fix that row")
    image = path.parent / row["file"]
    if not image.is_file():
      raise ReidDataError(f"{where}: file {row['file']} is missing ({image}); fix the path "
                          f"(relative to {path.parent}) or remove the row")
    _check_image_name(image, f"{where}: {image}", "remove the row")
    if (row["split"], row["file"]) in seen:
      raise ReidDataError(f"{where}: {row['file']} is listed twice in the {row['split']} "
                          "split; remove one row")
    seen.add((row["split"], row["file"]))
    camera = row.get("camera_id") or None
    out[row["split"]].append(_Item(row["file"], image,
                                   _person_id(row["person_id"], where, "column person_id"),
                                   camera, where))
  if not any(out.values()):
    raise ReidDataError(f"{path}: no rows, so no images at all; add one row per image "
                        f"({','.join(MANIFEST_COLUMNS)})")
  for split, items in out.items():
    if not items:
      raise ReidDataError(f"{path}: no row has split {split}; every split (train, query, "
                          "gallery) needs at least one image")
  return out


def camera_ids(items: dict[str, list[_Item]], form: str) -> dict[str, int]:
  """Camera value -> 0-based id (sorted; numeric when all are integers); {} for none.

  Cameras given for some images and not for others are a one-line error.
  """
  all_items = [it for split in SPLITS for it in items[split]]
  without = [it for it in all_items if it.camera is None]
  if not without:
    values = {it.camera for it in all_items}
    try:
      order = sorted(values, key=int)
    except ValueError:
      order = sorted(values)
    return {v: i for i, v in enumerate(order)}
  if len(without) == len(all_items):
    return {}
  first = without[0]
  if form == "manifest":
    fix = "give camera_id for every row or leave it empty in all"
  else:
    fix = "the pattern's group camid must match every file or none (drop it for no cameras)"
  raise ReidDataError(f"{first.where}: no camera ({len(without)} of {len(all_items)} images "
                      f"have none, the others have one); {fix}")


class Folder(ReidBuilder):
  """A user's own crops: split folders named by a pattern, or a CSV manifest."""

  name = "folder"
  BUILDER_CONFIGS: list[FolderConfig] = []  # one per set of inputs: `make_config`
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put your crops in `manual_dir/train/`, `query/` and `gallery/` (any sub-folders), named
  so that `--config.pattern` (default Market-1501's `{DEFAULT_PATTERN}`) finds the person
  id (and camera), or list them in a CSV manifest (`--config.manifest=FILE`, columns
  file,person_id,camera_id,split). Prepare with `{_USAGE}`.
  """

  #: `reid_jax.prepare` builds the config from `--manual_dir` and `--config.*` with it.
  config_from_options = staticmethod(make_config)

  def __init__(self, *, config: Any = None, **kwargs: Any):
    if isinstance(config, str):
      where = kwargs.get("data_dir") or "the tfds data_dir"
      raise ReidDataError(
          f"dataset folder/{config} is not prepared in {where}; prepare it with "
          f"`{_USAGE} --data_dir=...`, which prints the config name to use")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "A user's own person crops (split folders + file-name pattern, or a CSV "
            "manifest). person_id as given; cameras numbered 0.. in sorted order, "
            "camera_id -1 when the input gives none (evaluation then treats every "
            "gallery item as another camera)."),
        features=reid_features(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    if cfg is None:
      raise ReidDataError(f"dataset folder needs its inputs: prepare it with `{_USAGE}`")
    source = pathlib.Path(cfg.source)
    if cfg.form == "manifest":
      items = manifest_items(source)
    else:
      items = tree_items(source, cfg.pattern)
    cameras = camera_ids(items, cfg.form)
    return {split: self._generate_examples(items[split], cameras) for split in SPLITS}

  def _generate_examples(self, items: list[_Item], cameras: dict[str, int]):
    for it in items:
      try:
        data = it.path.read_bytes()
      except OSError as e:
        raise ReidDataError(f"{it.where}: cannot read {it.path} ({e.strerror})") from None
      yield it.key, {
          "image": image_file(data, str(it.path)),
          "person_id": it.person_id,
          "camera_id": cameras[it.camera] if cameras else UNKNOWN_CAMERA,
          "file_name": it.key,
      }
