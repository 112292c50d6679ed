"""Reads PyTorch state-dict files (`.pth`) as numpy arrays without importing torch.

A `.pth` file is a pickle whose tensors point at raw storages: in a zip archive
(`<name>/data.pkl` + `<name>/data/<key>`, torch >= 1.6) or, in the legacy format
(e.g. torchvision's 2017 `densenet201-c1103571.pth`), appended after the pickle. The
unpickler here is restricted: it builds only ordered dicts, tensors and parameters
(`torch._utils._rebuild_tensor[_v2]`, `_rebuild_parameter`) over typed storages, and
refuses every other global, so a file cannot run code while being read. Layouts follow
`torch/serialization.py` (`_load`, `_legacy_load`).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsupportedPickle(ValueError):
  """The file holds something other than a plain state dict of tensors."""


class _StorageType:
  """Stand-in for `torch.FloatStorage` & co.: only its element type matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]

  @property
  def itemsize(self) -> int:
    return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _Storage:
  """A storage whose bytes are read after unpickling (legacy files put them last)."""

  def __init__(self, kind: _StorageType, key: str, numel: int, offset: int = 0):
    self.kind, self.key, self.numel, self.offset = kind, key, numel, offset
    self.data: np.ndarray | None = None  # the root storage's elements, set by the reader


class _Tensor:
  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialise(self, roots: Mapping[str, np.ndarray]) -> np.ndarray:
    """Copies the strided view out of its storage (as torch does on `.numpy()`)."""
    data = roots[self.storage.key]
    start = self.storage.offset + self.offset
    if not self.size:
      return data[start].copy()
    item = data.itemsize
    return np.lib.stride_tricks.as_strided(
        data[start:], shape=self.size, strides=[s * item for s in self.stride]).copy()


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """Accepts only what a state dict of tensors needs (see the module docstring)."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsupportedPickle(f"refuses to unpickle {module}.{name} (not part of a plain "
                            "state dict of tensors)")

  def persistent_load(self, saved_id: Any) -> _Storage:
    # zip: ('storage', type, key, location, numel); legacy adds view_metadata.
    if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
      raise UnsupportedPickle(f"unknown persistent id {saved_id!r:.60}")
    kind, key, _, numel = saved_id[1:5]
    if not isinstance(kind, _StorageType):
      raise UnsupportedPickle(f"storage of unknown type {kind!r:.60}")
    view = saved_id[5] if len(saved_id) > 5 else None
    root = self.storages.setdefault(str(key), _Storage(kind, str(key), numel))
    if view is None:
      return root
    _, view_offset, view_size = view  # a view into a larger root storage (old torch)
    return _Storage(kind, str(key), view_size, offset=view_offset)


def _from_bytes(raw: bytes, kind: _StorageType) -> np.ndarray:
  """Little-endian storage bytes -> a flat array; bfloat16 widened to float32."""
  if kind.dtype == "bfloat16":
    return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
  return np.frombuffer(raw, np.dtype(kind.dtype).newbyteorder("<"))


def _collect(obj: Any, roots: Mapping[str, np.ndarray]) -> Any:
  """Replaces every _Tensor in a (nested) dict/list by its numpy array."""
  if isinstance(obj, _Tensor):
    return obj.materialise(roots)
  if isinstance(obj, Mapping):
    return {k: _collect(v, roots) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_collect(v, roots) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise UnsupportedPickle("a torch zip archive holds exactly one data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    names = set(zf.namelist())
    if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
      raise UnsupportedPickle("big-endian torch archives are not supported")
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
    roots = {key: _from_bytes(zf.read(f"{prefix}data/{key}"), s.kind)
             for key, s in storages.items()}
  return _collect(obj, roots)


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    magic = pickle.load(f)
    if magic != LEGACY_MAGIC:
      raise UnsupportedPickle("not a torch file (no zip archive, no legacy magic number)")
    pickle.load(f)  # protocol version
    pickle.load(f)  # sys info (endianness, type sizes)
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(f, storages).load()
    keys = pickle.load(f)
    roots = {}
    for key in keys:  # each: int64 element count, then the raw elements
      kind = storages[str(key)].kind
      (numel,) = struct.unpack("<q", f.read(8))
      raw = f.read(numel * kind.itemsize)
      if len(raw) != numel * kind.itemsize:
        raise UnsupportedPickle(f"storage {key} is truncated")
      roots[str(key)] = _from_bytes(raw, kind)
  return _collect(obj, roots)


def load(path: str) -> Any:
  """Reads a torch-saved object of tensors; tensors become numpy arrays.

  Raises `UnsupportedPickle` for anything but plain (nested) dicts of tensors, and
  the usual OSError/zipfile/pickle errors for unreadable files.
  """
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)
