"""A user's folder of person crops, embedded with a trained run.

Images are listed (a folder, recursively, or a glob; sorted relative names),
decoded and preprocessed exactly as the run's evaluation does
(`augment.eval_transform` of the encoded bytes, then `augment.normalize`, at
`Run.input_size(h, w)`), grouped by that size and embedded in batches padded to
one shape per size, so each size compiles once. A file that is not a readable
image is skipped and reported by name (this is not a benchmark split: a folder
of detector crops may hold anything), never dropped silently.

Features files (`.npz`, written atomically): `feat/<exit>` [N, D] float32,
`names` [N] (relative file names), `root` (the folder the names are relative
to), `run` (json of `Run.identity()`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from reid_jax.data import augment as aug
from reid_jax.inference.run import Run

_MAGIC = re.compile(r"[*?[]")
FEAT_PREFIX = "feat/"


def _decode_threads() -> int:
  try:
    return max(1, min(8, len(os.sched_getaffinity(0))))
  except AttributeError:  # not Linux
    return max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- listing


def list_images(spec: str, flag: str = "--images") -> tuple[str, list[str]]:
  """(root, sorted relative names) of every file under folder `spec` (recursively) or
  matching glob `spec` (`**` recursive). Every regular file counts: one that is not an
  image is reported when it fails to decode. Nothing found: a one-line error."""
  if os.path.isdir(spec):
    root = os.path.abspath(spec)
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      rel = os.path.relpath(dirpath, root)
      names += [n if rel == "." else os.path.join(rel, n) for n in filenames]
    names = sorted(n.replace(os.sep, "/") for n in names
                   if os.path.isfile(os.path.join(root, n)))
    if not names:
      raise ValueError(f"{flag}={spec}: the folder holds no files; pass a folder of "
                       "images or a glob such as 'crops/**/*.jpg'")
    return root, names
  if os.path.isfile(spec):  # one image
    return os.path.dirname(os.path.abspath(spec)), [os.path.basename(spec)]
  if not _MAGIC.search(spec):
    raise ValueError(f"{flag}={spec}: no such file or folder")
  parts = os.path.abspath(spec).split(os.sep)
  fixed = next(i for i, p in enumerate(parts) if _MAGIC.search(p))
  root = os.sep.join(parts[:fixed]) or os.sep
  paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
  if not paths:
    raise ValueError(f"{flag}={spec}: the pattern matches no file (quote it so the "
                     "shell does not expand it)")
  names = sorted(os.path.relpath(os.path.abspath(p), root).replace(os.sep, "/")
                 for p in paths)
  return root, names


# ----------------------------------------------------------------------------- decoding


def image_size(path: str) -> tuple[int, int]:
  """(height, width) from the file's header (PIL opens lazily); raises if unreadable."""
  with Image.open(path) as im:
    return im.height, im.width


def preprocess(path: str, height: int, width: int, out: np.ndarray | None = None
               ) -> np.ndarray:
  """The evaluation's preprocessing of one file: `eval_transform` of its encoded bytes
  (JPEG draft decoding included, as for dataset records) then `normalize`; float32."""
  with open(path, "rb") as f:
    data = f.read()
  return aug.normalize(aug.eval_transform(data, height, width), out=out)


def _reason(e: Exception, path: str = "") -> str:
  """A short reason (exception type and the start of its message, the path left out)."""
  msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
  msg = msg.replace(f"'{path}'", "").replace(path, "").strip() if path else msg
  return type(e).__name__ + (f": {msg[:80]}" if msg else "")


# ----------------------------------------------------------------------------- embedding


@dataclasses.dataclass
class Embedded:
  """What `embed_files` returns: features of the readable images, in name order."""

  root: str
  names: list[str]
  features: dict[str, np.ndarray]
  skipped: list[tuple[str, str]]  # (name, reason)
  resized_to: list[tuple[int, int]]  # sizes used for images of another size than the run's
  seconds: float
  first_batch_seconds: float  # the first batch of each size: compilation included

  def summary(self) -> str:
    """One line: N embedded, M skipped, exits and dims, images/s."""
    dims = ", ".join(f"{k} [{v.shape[1]}]" for k, v in self.features.items())
    rate = len(self.names) / self.seconds if self.seconds > 0 else float("inf")
    return (f"embedded {len(self.names)} images, {len(self.skipped)} skipped; exits "
            f"{dims}; {self.seconds:.1f} s, {rate:.1f} images/s (first batch of each "
            f"size, compiling, {self.first_batch_seconds:.1f} s)")

  def warning(self) -> str | None:
    """The one warning line naming every skipped file, or None."""
    if not self.skipped:
      return None
    listed = "; ".join(f"{n} ({r})" for n, r in self.skipped)
    return (f"warning: skipped {len(self.skipped)} file(s) that are not readable images: "
            f"{listed}")


def exit_dims(run: Run) -> dict[str, int]:
  """{exit: dim} of the run's embedder, by shape inference (no compute)."""
  h, w = run.input_size(*run.input_hw)
  spec = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  out = jax.eval_shape(run._embed, run.variables, spec)  # pylint: disable=protected-access
  return {k: int(v.shape[-1]) for k, v in out.items()}


def check_exit(run: Run, exit_name: str | None, flag: str = "--exit") -> list[str]:
  """The exits to keep: all, or `exit_name` (one-line error listing the exits if unknown)."""
  exits = list(exit_dims(run))
  if not exit_name:
    return exits
  if exit_name not in exits:
    raise ValueError(f"{flag}={exit_name}: the {run.method} run in {run.workdir} has exits "
                     f"{exits}; pick one of them")
  return [exit_name]


def _plan(sizes: dict[int, tuple[int, int]], batch_size: int
          ) -> list[tuple[tuple[int, int], np.ndarray, int]]:
  """[(size, indices, padded batch)]: images grouped by size (sorted), batch_size per
  batch, the batch shape min(batch_size, group) so a small group wastes nothing."""
  groups: dict[tuple[int, int], list[int]] = {}
  for i, s in sizes.items():
    groups.setdefault(s, []).append(i)
  plan = []
  for size in sorted(groups):
    idx = np.asarray(groups[size], np.int64)
    rows = min(batch_size, len(idx))
    plan += [(size, idx[lo:lo + rows], rows) for lo in range(0, len(idx), rows)]
  return plan


def embed_files(run: Run, root: str, names: Sequence[str], *, batch_size: int = 64,
                exits: Sequence[str] | None = None, progress: bool = True,
                log: Callable[[str], None] = print, num_threads: int | None = None
                ) -> Embedded:
  """Embeds `root/name` for every name with `run`, preprocessed as its evaluation.

  Unreadable files are skipped and listed in `Embedded.skipped`; when an image is
  embedded at another size than the run's, `log` says so once. Decoding runs on
  `num_threads` threads, one batch ahead of the model.
  """
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}: must be at least 1")
  names = list(names)
  t0 = time.perf_counter()
  skipped: dict[int, str] = {}
  sizes: dict[int, tuple[int, int]] = {}
  threads = num_threads or _decode_threads()

  def header(i: int):
    path = os.path.join(root, names[i])
    try:
      hw = image_size(path)
      return i, hw, run.input_size(*hw), None
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
      return i, None, None, _reason(e, path)

  def fill(path: str, size: tuple[int, int], out: np.ndarray) -> str | None:
    try:
      preprocess(path, *size, out=out)
      return None
    except Exception as e:  # pylint: disable=broad-except
      return _reason(e, path)

  with ThreadPoolExecutor(threads) as pool:
    needs_resize = False
    for i, hw, size, err in pool.map(header, range(len(names))):
      if err:
        skipped[i] = err
      else:
        sizes[i] = size
        needs_resize |= hw != size
    resized = sorted({s for s in sizes.values()})
    if needs_resize:
      shown = ", ".join(f"{h}x{w}" for h, w in resized[:4]) + (
          ", ..." if len(resized) > 4 else "")
      log(f"resizing images to {shown} as in the run's evaluation")
    plan = _plan(sizes, batch_size)

    def submit(k: int):
      size, idx, rows = plan[k]
      x = np.zeros((rows,) + size + (3,), np.float32)
      futs = [pool.submit(fill, os.path.join(root, names[i]), size, x[r])
              for r, i in enumerate(idx)]
      return x, futs

    feats: dict[str, np.ndarray] = {}
    done = np.zeros(len(names), bool)
    bar = None
    if progress and len(plan) > 1:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=len(sizes), unit="img", desc="embedding", dynamic_ncols=True)
    first_s, seen = 0.0, set()
    nxt = submit(0) if plan else None
    for k, (size, idx, rows) in enumerate(plan):
      x, futs = nxt
      errs = [f.result() for f in futs]
      nxt = submit(k + 1) if k + 1 < len(plan) else None
      tb = time.perf_counter()
      out = run.embed(x)
      if size not in seen:
        seen.add(size)
        first_s += time.perf_counter() - tb
      for r, (i, err) in enumerate(zip(idx, errs)):
        if err:
          skipped[int(i)] = err
          continue
        done[i] = True
        for name, v in out.items():
          if exits is not None and name not in exits:
            continue
          if name not in feats:
            feats[name] = np.zeros((len(names), v.shape[-1]), np.float32)
          feats[name][i] = v[r]
      if bar is not None:
        bar.update(len(idx))
    if bar is not None:
      bar.close()
  keep = np.flatnonzero(done)
  return Embedded(root=root, names=[names[i] for i in keep],
                  features={k: v[keep] for k, v in feats.items()},
                  skipped=[(names[i], skipped[i]) for i in sorted(skipped)],
                  resized_to=resized if needs_resize else [],
                  seconds=time.perf_counter() - t0, first_batch_seconds=first_s)


# ----------------------------------------------------------------------------- files


def write_features(path: str, embedded: Embedded, identity: dict[str, Any]) -> str:
  """Writes the features file atomically (a temporary file, then os.replace)."""
  arrays = {FEAT_PREFIX + k: v.astype(np.float32) for k, v in embedded.features.items()}
  arrays["names"] = np.asarray(embedded.names, dtype=str)
  arrays["root"] = np.asarray(embedded.root)
  arrays["run"] = np.asarray(json.dumps(identity, sort_keys=True))
  tmp = f"{path}.partial.{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@dataclasses.dataclass
class Features:
  """A features file read back."""

  path: str
  features: dict[str, np.ndarray]
  names: list[str]
  root: str
  run: dict[str, Any]

  def exit(self, name: str | None, flag: str = "--exit") -> tuple[str, np.ndarray]:
    """(exit, [N, D]) of `name`, or of the only / the fused / the first exit."""
    exits = list(self.features)
    if name is None:
      name = exits[0] if len(exits) == 1 else ("fused" if "fused" in exits else exits[0])
    if name not in self.features:
      raise ValueError(f"{flag}={name}: {self.path} holds exits {exits}; pick one of them "
                       "(or embed again without --exit)")
    return name, self.features[name]


def read_features(path: str, flag: str) -> Features:
  """Reads a file `write_features` wrote (one-line errors naming the file and flag)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{flag}={path}: no such file; write one with python -m "
                            "reid_jax.embed --output=...")
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except Exception as e:  # pylint: disable=broad-except  (not an npz, truncated)
    raise ValueError(f"{flag}={path}: not a readable .npz features file ({_reason(e)}); "
                     "write it with python -m reid_jax.embed") from None
  feats = {k[len(FEAT_PREFIX):]: np.asarray(v, np.float32) for k, v in data.items()
           if k.startswith(FEAT_PREFIX)}
  missing = [k for k in ("names", "run") if k not in data]
  if missing or not feats:
    raise ValueError(f"{flag}={path}: not a reid_jax features file (missing "
                     f"{missing or ['feat/<exit>']}); write it with python -m reid_jax.embed")
  names = [str(n) for n in data["names"]]
  for k, v in feats.items():
    if v.ndim != 2 or len(v) != len(names):
      raise ValueError(f"{flag}={path}: feat/{k} has shape {v.shape} but the file names "
                       f"{len(names)} images; the file is damaged, embed again")
  return Features(path=path, features=feats, names=names,
                  root=str(data["root"]) if "root" in data else "",
                  run=json.loads(str(data["run"])))
