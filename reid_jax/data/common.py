"""Shared pieces of every re-ID tfds builder: record features, image encoding, errors.

Besides the record schema this module holds what the real-dataset builders share:
`ReidBuilder` (array_record by default, resources closed after preparing),
`Archive` (an official archive read either as the downloaded zip or as the folder it
extracts to) and `image_file` (checks an image decodes before it is stored).
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import tempfile
import zipfile
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

#: Storage format of every re-ID builder; `tfds.data_source` needs random access.
FILE_FORMAT = "array_record"

#: Names of non-image files that official archives carry and builders skip.
_SKIPPED_FILES = frozenset({"thumbs.db"})


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
