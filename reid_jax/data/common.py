"""Shared pieces of every re-ID tfds builder: record features, image encoding, errors.

Besides the record schema this module holds what the real-dataset builders share:
`ReidBuilder` (array_record by default, resources closed after preparing),
`Archive` (an official archive read either as the downloaded zip or as the folder it
extracts to) and `image_file` (checks an image decodes before it is stored), and what
readers of a prepared dataset share: `check_prepared` (its shard files match the
metadata) and `guard_reads` (a damaged record is a one-line error).
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import shutil
import tempfile
import zipfile
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

#: Storage format of every re-ID builder; `tfds.data_source` needs random access.
FILE_FORMAT = "array_record"

#: Names of non-image files that official archives carry and builders skip.
_SKIPPED_FILES = frozenset({"thumbs.db"})

#: The message tfds's writer fails with when a split generator yields nothing.
_EMPTY_SPLIT = re.compile(r'split "(?P<split>[^"]+)": No examples were yielded')


class ReidDataError(ValueError):
  """A one-line, user-facing data error that names the file or setting and the fix."""


def reid_features(video: bool = False) -> tfds.features.FeaturesDict:
  """Record schema shared by all re-ID datasets.

  `person_id` keeps the dataset's own id (Market/Duke: 0 = distractor, -1 = junk);
  `camera_id` is 0-based. Video datasets add `tracklet_id` and `frame_index`.
  Images are stored as the encoded bytes we are given (no TensorFlow needed).
  """
  feats = {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "person_id": np.int32,
      "camera_id": np.int32,
      "file_name": tfds.features.Text(),
  }
  if video:
    feats["tracklet_id"] = np.int32
    feats["frame_index"] = np.int32
  return tfds.features.FeaturesDict(feats)


def encode_png(image: np.ndarray) -> io.BytesIO:
  """PNG-encodes a uint8 HxWx3 array (lossless) as a file object tfds accepts without TF."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  buf.seek(0)
  return buf


def image_file(data: bytes, where: str) -> io.BytesIO:
  """Returns encoded image bytes ready for `tfds.features.Image`, after checking they decode.

  RGB JPEG/PNG bytes pass through unchanged (fast and lossless). Anything else PIL can
  read (grayscale, palette, other formats) is converted to RGB and stored as PNG, because
  the reader decodes with PIL and the schema promises HxWx3. Undecodable data raises a
  `ReidDataError` naming `where`.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Full decode: catches truncated files that `verify()` lets through.
      if im.mode == "RGB" and im.format in ("JPEG", "PNG"):
        return io.BytesIO(data)
      rgb = np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ReidDataError(f"{where}: corrupt or unreadable image ({e})") from None
  return encode_png(rgb)


def is_skipped_file(name: str) -> bool:
  """True for the non-image files official archives ship (e.g. `Thumbs.db`)."""
  return name.lower() in _SKIPPED_FILES


class Archive:
  """One official archive, read from the downloaded zip or from its extracted folder.

  Paths are relative to the archive root and use `/`: the zip's own member names, or, for
  an extracted archive, paths below the manual directory (the zip's top folder is then
  a folder in `manual_dir`). Directory listings give sub-folders a trailing `/`.
  """

  def __init__(self, label: str, *, zip_file: zipfile.ZipFile | None = None,
               root: pathlib.Path | None = None):
    self.label = label
    self._zip = zip_file
    self._root = root
    self._tree: dict[str, set[str]] | None = None

  @classmethod
  def open(cls, manual_dir: pathlib.Path, zip_name: str, top: str, hint: str,
           stack: contextlib.ExitStack) -> Archive:
    """Finds `zip_name` (or its extracted folder `top`) in `manual_dir`.

    Args:
      manual_dir: the folder the user put the downloads in.
      zip_name: file name of the official zip, e.g. `Market-1501-v15.09.15.zip`.
      top: the folder the zip extracts to (its top-level folder), e.g.
        `Market-1501-v15.09.15`.
      hint: where the file comes from, appended to the "missing" message.
      stack: closes the zip once preparing is over.
    """
    zip_path = manual_dir / zip_name
    if zip_path.is_file():
      try:
        zf = stack.enter_context(zipfile.ZipFile(zip_path))
      except (zipfile.BadZipFile, OSError) as e:
        raise ReidDataError(f"{zip_path}: not a readable zip file ({e})") from None
      archive = cls(str(zip_path), zip_file=zf)
      if not archive.is_dir(top):
        raise ReidDataError(
            f"{zip_path}: wrong layout, expected a top-level folder {top}/ inside")
      return archive
    if (manual_dir / top).is_dir():
      return cls(str(manual_dir), root=manual_dir)
    raise ReidDataError(
        f"Missing {zip_name} (or its extracted folder {top}/) in {manual_dir}: {hint}")

  @property
  def is_zip(self) -> bool:
    """True when read from the zip itself, False for an extracted folder."""
    return self._zip is not None

  def where(self, rel: str) -> str:
    """Human-readable location of `rel` for error messages."""
    if self._zip is not None:
      return f"{self.label}:{rel}"
    return str(self._root / rel)

  def _index(self) -> dict[str, set[str]]:
    """Folder -> child names, built once from the zip's member list."""
    if self._tree is None:
      tree: dict[str, set[str]] = {}
      for name in self._zip.namelist():
        parts = [p for p in name.split("/") if p]
        is_dir = name.endswith("/")
        for i in range(len(parts)):
          parent = "/".join(parts[:i])
          child = parts[i] + ("/" if i < len(parts) - 1 or is_dir else "")
          tree.setdefault(parent, set()).add(child)
          if child.endswith("/"):
            tree.setdefault("/".join(parts[:i + 1]), set())
      self._tree = tree
    return self._tree

  def is_dir(self, rel: str) -> bool:
    rel = rel.strip("/")
    if self._zip is not None:
      return rel in self._index()
    return (self._root / rel).is_dir()

  def listdir(self, rel: str) -> list[str]:
    """Sorted entries directly inside folder `rel` (sub-folders end in `/`)."""
    rel = rel.strip("/")
    if not self.is_dir(rel):
      raise ReidDataError(f"{self.where(rel)}: wrong layout, folder {rel}/ is missing")
    if self._zip is not None:
      return sorted(self._index()[rel])
    with os.scandir(self._root / rel) as entries:
      return sorted(e.name + ("/" if e.is_dir() else "") for e in entries)

  def local_path(self, rel: str, stack: contextlib.ExitStack, scratch: pathlib.Path
                ) -> pathlib.Path:
    """A real file path for `rel` (libraries like h5py need one).

    An extracted archive gives its own file; a zip member is copied into a temporary
    folder under `scratch` that `stack` deletes when preparing ends.
    """
    if self._zip is None:
      path = self._root / rel
      if not path.is_file():
        raise ReidDataError(f"{self.where(rel)}: file is missing")
      return path
    try:
      info = self._zip.getinfo(rel)
    except KeyError:
      raise ReidDataError(f"{self.where(rel)}: file is missing from the archive") from None
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(dir=scratch)))
    path = tmp / pathlib.PurePosixPath(rel).name
    try:
      with self._zip.open(info) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, OSError) as e:
      raise ReidDataError(f"{self.where(rel)}: cannot extract ({e})") from None
    return path

  def read(self, rel: str) -> bytes:
    """Bytes of file `rel`; a missing file raises a `ReidDataError` naming it."""
    try:
      if self._zip is not None:
        return self._zip.read(rel)
      return (self._root / rel).read_bytes()
    except KeyError:
      raise ReidDataError(f"{self.where(rel)}: file is missing from the archive") from None
    except FileNotFoundError:
      raise ReidDataError(f"{self.where(rel)}: file is missing") from None
    except (zipfile.BadZipFile, OSError) as e:
      raise ReidDataError(f"{self.where(rel)}: cannot read ({e})") from None


def find_file(manual_dir: pathlib.Path, name: str, subdirs: tuple[str, ...], hint: str
             ) -> pathlib.Path:
  """Path of `name` in `manual_dir` or one of its `subdirs`, else a one-line error."""
  for sub in ("",) + subdirs:
    path = manual_dir / sub / name
    if path.is_file():
      return path
  places = " or ".join(str(manual_dir / s) for s in ("",) + subdirs)
  raise ReidDataError(f"Missing {name} in {places}: {hint}")


class ReidBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the real-dataset builders.

  Writes `array_record` unless told otherwise, so `tfds.data_source` can read the result,
  and keeps files opened while preparing (zips, HDF5 files, temporary extractions) in an
  exit stack that is closed once all splits are written or preparing fails.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  #: True when person_id 0 marks distractors and -1 junk (the CLI reports both).
  HAS_DISTRACTORS_AND_JUNK = False

  def __init__(self, *, file_format: Any = None, **kwargs: Any):
    super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)
    self._stack: contextlib.ExitStack | None = None

  def _download_and_prepare(self, dl_manager, download_config):
    with contextlib.ExitStack() as stack:
      self._stack = stack
      try:
        return super()._download_and_prepare(
            dl_manager=dl_manager, download_config=download_config)
      except AssertionError as e:
        error = _empty_split_error(self.name, e, download_config.manual_dir)
        if error is None:
          raise
        raise error from None
      finally:
        self._stack = None

  @property
  def resources(self) -> contextlib.ExitStack:
    """Exit stack of the prepare run in progress."""
    if self._stack is None:
      raise RuntimeError("resources can only be opened while preparing")
    return self._stack

  def manual_path(self, dl_manager: tfds.download.DownloadManager, expected: str,
                  source: str) -> pathlib.Path:
    """The user's manual directory; none given (or an empty one) is a one-line error.

    Args:
      dl_manager: the download manager tfds passes to `_split_generators`.
      expected: the main file the folder should hold, named in the error.
      source: where to get it (e.g. "download it from URL"), also in the error.
    """
    try:
      path = pathlib.Path(os.fspath(dl_manager.manual_dir))
    except AssertionError:
      given = getattr(dl_manager, "_manual_dir", None)
      where = f"{given} does not exist or is empty" if given else "no manual_dir given"
      raise ReidDataError(
          f"Missing {expected} ({where}): {source}, then pass the folder holding it as "
          "--manual_dir") from None
    return path


def iter_split_folder(archive: Archive, folder: str) -> Iterator[str]:
  """Names of the files in `folder`, skipping only the archives' `Thumbs.db` files."""
  for name in archive.listdir(folder):
    if not is_skipped_file(name):
      yield name


def split_images(archive: Archive, folder: str, split: str, suffix: str) -> list[str]:
  """Names in split folder `folder` (as `iter_split_folder`); no `suffix` file is an error.

  An empty folder (a partly extracted archive, say) would otherwise only fail once the
  other splits are written, as tfds's bare `AssertionError: No examples were yielded`.
  """
  names = list(iter_split_folder(archive, folder))
  if not any(n.lower().endswith(suffix) for n in names):
    fix = "download the zip again" if archive.is_zip else "re-extract the archive"
    raise ReidDataError(f"{archive.where(folder)} holds no {suffix} images; the {split} "
                        f"split needs the official images ({fix})")
  return names


def _empty_split_error(name: str, error: AssertionError, manual_dir: Any
                      ) -> ReidDataError | None:
  """tfds's "No examples were yielded" as a one-line `ReidDataError` (None for others).

  Builders that check their split folders (`split_images`) never get here; this covers
  the ones whose splits come from index files (MARS, CUHK03).
  """
  match = _EMPTY_SPLIT.search(str(error))
  if match is None:
    return None
  where = f"the files in {manual_dir}" if manual_dir else "its inputs"
  return ReidDataError(f"{name}: the {match['split']} split came out empty: {where} give "
                       "it no images; check that they are the complete official files")


# ------------------------------------------------------------------ prepared datasets

#: (path, mtime_ns, size) -> records in that array_record file (None: unreadable).
_RECORD_COUNTS: dict[tuple[str, int, int], int | None] = {}
#: Reader options for footer/index reads only: no read-ahead, no thread pool.
_INDEX_ONLY = "readahead_buffer_size:0,max_parallelism:0"


def full_name(builder: tfds.core.DatasetBuilder) -> str:
  """'market1501' or 'cuhk03/labeled': the name `python -m reid_jax.prepare` takes."""
  config = builder.builder_config
  return f"{builder.name}/{config.name}" if config else builder.name


def rebuild_command(builder: tfds.core.DatasetBuilder) -> str:
  """The `python -m reid_jax.prepare ...` command that writes `builder`'s data again."""
  manual = " --manual_dir=DIR" if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else ""
  return (f"python -m reid_jax.prepare {full_name(builder)}{manual} "
          f"--data_dir={builder.data_dir_root}")


def _damaged_where(builder: tfds.core.DatasetBuilder) -> tuple[str, str, str]:
  """(name, prepared folder, rebuild command) of `builder`, as `damaged_error` names them."""
  return full_name(builder), os.fspath(builder.data_dir), rebuild_command(builder)


def damaged_error(where: tfds.core.DatasetBuilder | tuple[str, str, str], problem: str
                 ) -> ReidDataError:
  """One line: which prepared folder is damaged, how (`problem`), and how to rebuild it.

  The folder is never deleted for the user, only named: moving it away keeps their data
  in case the cause is elsewhere (a full disk, a flaky mount).
  """
  name, folder, command = where if isinstance(where, tuple) else _damaged_where(where)
  return ReidDataError(f"prepared dataset {name} in {folder} is damaged ({problem}); "
                       f"move that folder away and run `{command}`")


def _num_records(path: str, stat: os.stat_result) -> int | None:
  """Records in array_record file `path`, from its footer and index only (None: unreadable).

  Cached per (path, mtime, size), since every `open_split` of a run checks every shard.
  """
  key = (path, stat.st_mtime_ns, stat.st_size)
  if key not in _RECORD_COUNTS:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    try:
      reader = array_record_module.ArrayRecordReader(path, _INDEX_ONLY)
      try:
        _RECORD_COUNTS[key] = reader.num_records() if reader.ok() else None
      finally:
        reader.close()
    except (RuntimeError, OSError, ValueError):
      _RECORD_COUNTS[key] = None
  return _RECORD_COUNTS[key]


def _shard_problem(path: str, expected: int) -> str | None:
  """What is wrong with one shard file holding `expected` records, or None."""
  name = os.path.basename(path)
  try:
    stat = os.stat(path)
  except FileNotFoundError:
    return f"{name}: missing, metadata says {expected:,} records"
  except OSError as e:
    return f"{name}: cannot read ({e.strerror}), metadata says {expected:,} records"
  found = _num_records(path, stat)
  if found is None:
    return f"{name}: truncated or corrupt, metadata says {expected:,} records"
  if found != expected:
    return f"{name}: {found:,} records, metadata says {expected:,}"
  return None


def check_prepared(builder: tfds.core.DatasetBuilder) -> None:
  """Raises a one-line `ReidDataError` if a shard file of a prepared builder is damaged.

  Each array_record shard named by the metadata must exist and hold as many records as
  the metadata says (a truncated copy or an interrupted `rsync` leaves fewer, or an
  unreadable index). Only footers are read; non-local and non-array_record data pass.
  """
  info = builder.info
  if getattr(info.file_format, "value", info.file_format) != FILE_FORMAT:
    return
  for split_info in info.splits.values():
    paths = [os.fspath(p) for p in split_info.filepaths]
    lengths = list(split_info.shard_lengths)
    if len(paths) != len(lengths):
      continue
    for path, expected in zip(paths, lengths):
      if "://" in path:
        return
      problem = _shard_problem(path, int(expected))
      if problem:
        raise damaged_error(builder, problem)


class _GuardedRecords:
  """A tfds source's raw array_record reader whose Riegeli read errors are one line.

  A shard whose footer is sound can still hold a damaged chunk; array_record then
  raises `RuntimeError: Corrupted Riegeli/records file ...` from deep in a data loader.
  Everything else is passed through to the wrapped reader.
  """

  def __init__(self, raw: Any, shards: list[tuple[str, int]], where: tuple[str, str, str]):
    self._raw = raw
    self._shards = shards  # (file name, records read from it), in index order
    self._where = where  # as `damaged_error` takes it; plain strings, so it pickles

  def __len__(self) -> int:
    return len(self._raw)

  def __getitem__(self, key: int) -> Any:
    try:
      return self._raw[key]
    except RuntimeError as e:
      error = self._damaged(e, [key])
      if error is None:
        raise
      raise error from None

  def __getitems__(self, keys: Sequence[int]) -> Sequence[Any]:
    try:
      if hasattr(self._raw, "__getitems__"):
        return self._raw.__getitems__(keys)
      return [self._raw[k] for k in keys]
    except RuntimeError as e:
      error = self._damaged(e, keys)
      if error is None:
        raise
      raise error from None

  def __getattr__(self, name: str) -> Any:
    raw = self.__dict__.get("_raw")
    if raw is None or name.startswith("__"):
      raise AttributeError(name)
    return getattr(raw, name)

  def _shard_of(self, key: int) -> str | None:
    """Name of the shard file holding record `key` of this source (None if unknown)."""
    for name, count in self._shards:
      if 0 <= key < count:
        return name
      key -= count
    return None

  def _damaged(self, error: RuntimeError, keys: Sequence[int]) -> ReidDataError | None:
    """The one-line error for a Riegeli read failure (None for other runtime errors)."""
    text = (str(error).strip().splitlines() or [""])[0]
    if "riegeli" not in text.lower():
      return None
    names = {self._shard_of(int(k)) for k in keys}
    where = names.pop() if len(names) == 1 and None not in names else "a shard file"
    if len(keys) == 1:
      where = f"{where}, record {int(keys[0]):,}"
    return damaged_error(self._where, f"{where}: {text}")


def guard_reads(source: Any, builder: tfds.core.DatasetBuilder, split: str) -> Any:
  """`source` (from `tfds.data_source`) with damaged-record errors turned into one line.

  The raw reader is wrapped in place, so code that reads `source.data_source` directly
  (reid_jax.data.pipeline, samplers) gets the same one-line error.
  """
  raw = getattr(source, "data_source", None)
  if raw is None or isinstance(raw, _GuardedRecords):
    return source
  try:
    shards = [(os.path.basename(os.fspath(f.filename)), int(f.take))
              for f in builder.info.splits[split].file_instructions]
  except (KeyError, ValueError, TypeError, AttributeError):
    shards = []
  source.data_source = _GuardedRecords(raw, shards, _damaged_where(builder))
  return source
