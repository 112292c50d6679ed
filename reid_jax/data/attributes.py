"""Identity-level Market-1501 attributes for APR (Lin et al., Pattern Recognition 2019).

The authors' `market_attribute.mat` (repository `Market-1501_Attribute`) is a MATLAB
struct `market_attribute` with parts `train` (751 identities) and `test` (750). Each
part holds one 1xN uint8 row per attribute and `image_index`, a 1xN cell array of
identity strings ('0002'). Labels are 1 = no / first class, 2 = yes / second class;
`age` is 1..4. The field order differs between the parts, so every field is read by
name. Here labels are 0-based (file value - 1) and columns follow `ATTRIBUTES`.

The file is research-only and never ships with the project: users download it and pass
its path to `read_market_attributes`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Mapping

import numpy as np
import scipy.io

from reid_jax.data.common import ReidDataError

#: The 27 attributes, in the field order of the `train` part of the official file:
#: age, carried items, the 9 lower-body colours, the 8 upper-body colours, then
#: clothes (dress/pants), down (lower length), up (sleeve length), hair, hat, gender.
ATTRIBUTES: tuple[str, ...] = (
    "age", "backpack", "bag", "handbag",
    "downblack", "downblue", "downbrown", "downgray", "downgreen", "downpink",
    "downpurple", "downwhite", "downyellow",
    "upblack", "upblue", "upgreen", "upgray", "uppurple", "upred", "upwhite",
    "upyellow",
    "clothes", "down", "up", "hair", "hat", "gender",
)

#: Parts of the struct that `read_market_attributes` accepts.
PARTS: tuple[str, ...] = ("train", "test")

_STRUCT = "market_attribute"
_INDEX_FIELD = "image_index"
_SOURCE_HINT = ("download market_attribute.mat from the authors' Market-1501_Attribute "
                "repository (https://github.com/vana77/Market-1501_Attribute)")


def num_classes(name: str) -> int:
  """Number of classes of attribute `name`: 4 for age (1..4 in the file), 2 otherwise."""
  if name not in ATTRIBUTES:
    raise ValueError(f"unknown attribute {name!r}; expected one of {', '.join(ATTRIBUTES)}")
  return 4 if name == "age" else 2


@dataclasses.dataclass(frozen=True, eq=False)
class AttributeTable:
  """Attribute labels of a set of identities, sorted by id for vectorised lookup.

  `labels[i, j]` is the 0-based class of attribute `names[j]` for `person_ids[i]`.
  Arrays are made read-only so the frozen table cannot be changed in place.
  """

  names: tuple[str, ...]
  person_ids: np.ndarray  # int32 [N], strictly increasing after construction
  labels: np.ndarray  # int32 [N, len(names)], 0-based classes

  def __post_init__(self):
    ids = np.asarray(self.person_ids, np.int32).reshape(-1)
    labels = np.asarray(self.labels, np.int32)
    names = tuple(self.names)
    if labels.shape != (ids.size, len(names)):
      raise ValueError(f"labels have shape {labels.shape}, expected {(ids.size, len(names))}")
    order = np.argsort(ids, kind="stable")
    ids, labels = ids[order].copy(), labels[order].copy()
    if ids.size > 1 and np.any(ids[1:] == ids[:-1]):
      dup = int(ids[1:][ids[1:] == ids[:-1]][0])
      raise ValueError(f"person id {dup} appears more than once")
    ids.setflags(write=False)
    labels.setflags(write=False)
    object.__setattr__(self, "names", names)
    object.__setattr__(self, "person_ids", ids)
    object.__setattr__(self, "labels", labels)

  def __len__(self) -> int:
    return int(self.person_ids.size)

  def lookup(self, person_ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (labels [..., K] int32, valid [...] bool) for the given ids.

    Ids the table lacks (Market distractors 0, junk -1, identities without annotation)
    get `valid` False and labels -1, so a missing id can never borrow another's row.
    """
    ids = np.asarray(person_ids, np.int64)
    flat = ids.reshape(-1)
    k = len(self.names)
    if self.person_ids.size == 0:
      return np.full(ids.shape + (k,), -1, np.int32), np.zeros(ids.shape, bool)
    pos = np.searchsorted(self.person_ids, flat)
    pos = np.minimum(pos, self.person_ids.size - 1)
    valid = self.person_ids[pos].astype(np.int64) == flat
    out = np.where(valid[:, None], self.labels[pos], np.int32(-1)).astype(np.int32)
    return out.reshape(ids.shape + (k,)), valid.reshape(ids.shape)


def _parse_identity(cell: object) -> int | None:
  """One `image_index` entry ('0002', a 1x1 cell holding it, or a number) as an int."""
  value = np.asarray(cell).reshape(-1)
  if value.size != 1:
    return None
  item = value[0]
  if isinstance(item, np.ndarray):  # A cell nested one level deeper.
    return _parse_identity(item)
  try:
    if isinstance(item, (str, np.str_, bytes)):
      return int(item.strip())
    as_float = float(item)
  except (TypeError, ValueError):
    return None
  return int(as_float) if as_float.is_integer() else None


def _identities(raw: np.ndarray, where: str) -> np.ndarray:
  """`image_index` as int64 ids: a cell array of strings, a char matrix or numbers."""
  if raw.dtype.kind == "U" and raw.ndim == 2 and raw.shape[0] > 1:
    cells: list[object] = ["".join(row) for row in raw]  # char matrix, one id per row
  else:
    cells = list(raw.reshape(-1))
  ids = []
  for i, cell in enumerate(cells):
    pid = _parse_identity(cell)
    if pid is None:
      raise ReidDataError(
          f"{where}.{_INDEX_FIELD}: entry {i} ({cell!r}) is not an identity number like "
          f"'0002'; the file is corrupt, {_SOURCE_HINT}")
    ids.append(pid)
  return np.asarray(ids, np.int64)


def _struct_fields(value: object) -> dict[str, object] | None:
  """Fields of a 1x1 MATLAB struct as loaded by `loadmat` (record array), else None."""
  arr = np.asarray(value)
  if arr.dtype.names is None or arr.size != 1:
    return None
  rec = arr.reshape(-1)[0]
  return {name: rec[name] for name in arr.dtype.names}


def read_market_attributes(path: str, part: str) -> AttributeTable:
  """Reads part `train` or `test` of `market_attribute.mat`, every field by name.

  Raises a one-line `ReidDataError` naming the file and the fix when the file is
  missing or unreadable, the struct, part or an attribute is missing, a label is out
  of range, or an identity appears twice.
  """
  if part not in PARTS:
    raise ReidDataError(f"{path}: unknown part {part!r}; use one of {', '.join(PARTS)}")
  if not os.path.isfile(path):
    raise ReidDataError(f"{path}: attribute file not found; {_SOURCE_HINT} and pass its path")
  try:
    mat = scipy.io.loadmat(path)
  except Exception as e:  # noqa: BLE001 - loadmat raises many types for foreign bytes.
    msg = " ".join(str(e).split()) or type(e).__name__
    raise ReidDataError(
        f"{path}: not a readable MATLAB .mat file ({msg}); {_SOURCE_HINT}") from None
  if _STRUCT not in mat:
    found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
    raise ReidDataError(
        f"{path}: no struct '{_STRUCT}' (found {found}); pass the attribute file "
        f"market_attribute.mat, {_SOURCE_HINT}")
  top = _struct_fields(mat[_STRUCT])
  if top is None:
    raise ReidDataError(f"{path}: '{_STRUCT}' is not a 1x1 struct; {_SOURCE_HINT}")
  where = f"{path}: {_STRUCT}.{part}"
  if part not in top:
    raise ReidDataError(
        f"{where} is missing (found parts {', '.join(top) or 'none'}); {_SOURCE_HINT}")
  fields = _struct_fields(top[part])
  if fields is None:
    raise ReidDataError(f"{where} is not a 1x1 struct; {_SOURCE_HINT}")
  for name in (_INDEX_FIELD,) + ATTRIBUTES:
    if name not in fields:
      raise ReidDataError(f"{where} lacks field '{name}'; {_SOURCE_HINT}")

  ids = _identities(np.asarray(fields[_INDEX_FIELD]), where)
  n = ids.size
  labels = np.empty((n, len(ATTRIBUTES)), np.int32)
  for j, name in enumerate(ATTRIBUTES):
    raw = np.asarray(fields[name])
    if raw.size != n or raw.dtype.kind not in "biuf":
      raise ReidDataError(
          f"{where}.{name} has {raw.size} {raw.dtype} values for {n} identities; the file "
          f"is corrupt, {_SOURCE_HINT}")
    values = raw.reshape(-1).astype(np.float64)
    k = num_classes(name)
    bad = ~((values >= 1) & (values <= k) & (values == np.round(values)))
    if bad.any():
      i = int(np.argmax(bad))
      raise ReidDataError(
          f"{where}.{name} has label {values[i]:g} for identity {ids[i]:04d}, outside "
          f"1..{k}; the file is corrupt, {_SOURCE_HINT}")
    labels[:, j] = values.astype(np.int32) - 1

  uniq, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    dup = int(uniq[counts > 1][0])
    raise ReidDataError(
        f"{where}.{_INDEX_FIELD} lists identity {dup:04d} {int(counts[counts > 1][0])} "
        f"times; the file is corrupt, {_SOURCE_HINT}")
  if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
    raise ReidDataError(f"{where}.{_INDEX_FIELD} holds ids outside int32; {_SOURCE_HINT}")
  return AttributeTable(names=ATTRIBUTES, person_ids=ids.astype(np.int32), labels=labels)


def _part_struct(rows: Mapping[int, np.ndarray], order: tuple[str, ...]) -> dict[str, object]:
  """One part as `savemat` writes a struct: 1xN uint8 rows plus a cell of id strings."""
  ids = sorted(int(pid) for pid in rows)
  if any(pid <= 0 for pid in ids):
    raise ValueError(f"identities must be positive, got {[p for p in ids if p <= 0]}")
  table = np.zeros((len(ids), len(ATTRIBUTES)), np.uint8)
  for i, pid in enumerate(ids):
    vec = np.asarray(rows[pid]).reshape(-1)
    if vec.size != len(ATTRIBUTES):
      raise ValueError(f"identity {pid}: {vec.size} values, expected {len(ATTRIBUTES)}")
    table[i] = vec
  index = np.empty((1, len(ids)), dtype=object)
  for i, pid in enumerate(ids):
    index[0, i] = f"{pid:04d}"
  struct: dict[str, object] = {}
  for name in order:
    struct[name] = index if name == _INDEX_FIELD else (
        table[:, ATTRIBUTES.index(name)].reshape(1, -1))
  return struct


def write_fake_market_attributes(path: str, train: Mapping[int, np.ndarray],
                                 test: Mapping[int, np.ndarray],
                                 shuffle_test_fields: bool = True) -> None:
  """Writes a .mat laid out like the official file, from {person_id: 27 1-based values}.

  Values follow `ATTRIBUTES` order and are stored as given (uint8), so tests can also
  write out-of-range labels. `train` fields are in `ATTRIBUTES` order then
  `image_index`, as in the real file; with `shuffle_test_fields` the `test` part puts
  `image_index` first and the attributes reversed, so readers must go by name.
  """
  train_order = ATTRIBUTES + (_INDEX_FIELD,)
  test_order = ((_INDEX_FIELD,) + ATTRIBUTES[::-1]) if shuffle_test_fields else train_order
  data = {_STRUCT: {"test": _part_struct(test, test_order),
                    "train": _part_struct(train, train_order)}}
  scipy.io.savemat(path, data, do_compression=False, oned_as="row")


def synthetic_attributes(person_ids: Iterable[int], seed: int = 0) -> dict[int, np.ndarray]:
  """Deterministic 1-based attribute vectors (as in the file) for positive identities.

  Each identity's vector depends only on (seed, id), not on which other ids are asked
  for. One upper and one lower colour is set per identity, like most real annotations.
  """
  out: dict[int, np.ndarray] = {}
  up_cols = [j for j, a in enumerate(ATTRIBUTES) if a.startswith("up") and a != "up"]
  down_cols = [j for j, a in enumerate(ATTRIBUTES) if a.startswith("down") and a != "down"]
  for pid in person_ids:
    pid = int(pid)
    if pid <= 0:
      raise ValueError(f"identity {pid} has no attributes (0 = distractor, -1 = junk)")
    rng = np.random.default_rng((int(seed), pid))
    vec = np.ones(len(ATTRIBUTES), np.int32)
    for j, name in enumerate(ATTRIBUTES):
      if j not in up_cols and j not in down_cols:
        vec[j] = rng.integers(1, num_classes(name) + 1)
    vec[up_cols[rng.integers(len(up_cols))]] = 2
    vec[down_cols[rng.integers(len(down_cols))]] = 2
    out[pid] = vec
  return out
