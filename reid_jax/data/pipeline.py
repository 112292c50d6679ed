"""Input pipelines for re-ID training and evaluation (grain over random-access sources).

One grain element is one whole per-process batch: `grain.MapDataset.range(step, ...)`
mapped by a batch function that asks the sampler for global batch `step`, keeps
this process's contiguous slice, reads and augments those records, and stacks
them. Multiprocessing workers (`worker_count`) each build whole batches, and
grain interleaves them back in order, so the output does not depend on the number
of workers. Image randomness comes from (seed, global position), never from the
worker, so any process count yields the same global batches.

The iterator's state is just the next batch number (`ReidIterator.get_state()`),
so resuming is exact and works with a different worker or process count. It can
be saved with orbax through grain's checkpoint handler; see `ReidIterator`.
"""

from __future__ import annotations

import collections.abc
import copy
import json
from collections.abc import Mapping
from typing import Any, Callable

import grain
import numpy as np

from reid_jax.data import augment as aug
from reid_jax.data import samplers as smp

# Batches of an endless training stream (any number well beyond a training run).
_ENDLESS = 1 << 62
_STATE_VERSION = 1
# Samplers sized by `batch_size` (examples per global batch), and their batch kinds.
_NEEDS_BATCH_SIZE = ("shuffle", "pairs", "triplets")
_KIND = {"pk": "single", "shuffle": "single", "pairs": "pairs", "triplets": "triplets",
         "tracklets": "video"}


# ----------------------------------------------------------------------------
# Record reading (runs in the workers).


def _tfds_fast_ok(source: Any) -> bool:
  """True when the source is a plain tfds data source we can decode ourselves.

  Then records are read as raw bytes and only parsed, and images reach the
  augmentation still encoded (decoded once, by PIL, with draft mode for JPEGs).
  """
  parts = smp._tfds_parts(source)  # pylint: disable=protected-access
  if parts is None or getattr(source, "decoders", None):
    return False
  method = getattr(source, "deserialize_method", None)
  if getattr(method, "name", None) != "DESERIALIZE_AND_DECODE":
    return False
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    feats = parts[1].features
    image = feats["image"]
    return (isinstance(image, tfds.features.Image) and tuple(image.shape)[-1] == 3
            and image.np_dtype == np.uint8)
  except (KeyError, TypeError, AttributeError, ImportError):
    return False


class RecordReader:
  """Reads records as dicts with `image` (array or encoded bytes) and int labels."""

  def __init__(self, source: Any):
    self.source = source
    self._fast = _tfds_fast_ok(source)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: Any) -> list[dict[str, Any]]:
    """Records at `indices` (a list of ints), in order."""
    keys = [int(i) for i in indices]
    if not keys:
      return []
    if self._fast:
      raw = self.source.data_source
      recs = raw.__getitems__(keys) if hasattr(raw, "__getitems__") else [raw[k] for k in keys]
      return [smp.parse_tf_example(bytes(r)) for r in recs]
    if hasattr(self.source, "__getitems__"):
      return list(self.source.__getitems__(keys))
    return [self.source[k] for k in keys]


# ----------------------------------------------------------------------------
# Batch functions (pickled into the workers).


class _BatchFn:
  """Global batch number -> this process's batch of augmented images and labels."""

  def __init__(self, reader: RecordReader, sampler: smp.BatchSampler, *, kind: str,
               height: int, width: int, cfg: aug.AugmentConfig | None, seed: int,
               process_index: int, process_count: int, normalize: bool,
               keep_aspect: bool, extra_fields: tuple[str, ...], jpeg_draft: bool):
    self.reader, self.sampler, self.kind = reader, sampler, kind
    self.height, self.width, self.cfg, self.seed = height, width, cfg, seed
    self.process_index, self.process_count = process_index, process_count
    self.normalize, self.keep_aspect = normalize, keep_aspect
    self.extra_fields, self.jpeg_draft = extra_fields, jpeg_draft
    self.local = smp.process_slice(sampler.batch_size, process_index, process_count)

  def _batch_array(self, n: int) -> np.ndarray:
    """Output images: float32 when normalising, else uint8."""
    return np.empty((n, self.height, self.width, 3),
                    np.float32 if self.normalize else np.uint8)

  def _train_batch(self, step: int, index: np.ndarray
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Augmented images, person ids and camera ids per column of `index` [b, arity].

    Column c holds the c-th member of every example (anchor/positive/negative for
    triplets). Image k of the local slice uses the generator of global position
    (step * B + local_start) * arity + k.
    """
    b, arity = index.shape
    uniq, inverse = np.unique(index.reshape(-1), return_inverse=True)
    read = self.reader.read(uniq)
    recs = [read[i] for i in inverse.reshape(-1)]
    base = (step * self.sampler.batch_size + self.local.start) * arity
    images = [self._batch_array(b) for _ in range(arity)]
    scratch = np.empty((self.height, self.width, 3), np.uint8)
    for k, rec in enumerate(recs):
      row, col = divmod(k, arity)
      rng = aug.image_rng(self.seed, base + k)
      dst = scratch if self.normalize else images[col][row]
      aug.train_transform(rec["image"], rng, self.height, self.width, self.cfg,
                          step=step, out=dst, jpeg_draft=self.jpeg_draft)
      if self.normalize:
        aug.normalize(scratch, out=images[col][row])
    pids = [np.array([r["person_id"] for r in recs[c::arity]], np.int32) for c in range(arity)]
    cams = [np.array([r["camera_id"] for r in recs[c::arity]], np.int32) for c in range(arity)]
    return images, pids, cams

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    plan = smp.shard_batch(self.sampler[step], self.process_index, self.process_count)
    if self.kind == "eval":
      return self._eval_batch(plan["index"])
    index = plan["index"].reshape(len(plan["index"]), -1)
    images, pid, cam = self._train_batch(step, index)
    if self.kind == "single":
      return {"image": images[0], "person_id": pid[0], "camera_id": cam[0]}
    if self.kind == "video":  # [b, T] columns -> [b*T] frames, tracklet-major
      return {"image": np.stack(images, 1).reshape((-1,) + images[0].shape[1:]),
              "person_id": pid[0], "camera_id": cam[0],
              "tracklet_id": plan["tracklet"].astype(np.int32)}
    if self.kind == "pairs":
      return {"image_a": images[0], "image_b": images[1],
              "person_id_a": pid[0], "person_id_b": pid[1],
              "camera_id_a": cam[0], "camera_id_b": cam[1],
              "same": plan["same"].astype(np.int32)}
    names = ("anchor", "positive", "negative")
    out = {n: images[i] for i, n in enumerate(names)}
    out.update({f"person_id_{n}": pid[i] for i, n in enumerate(names)})
    out.update({f"camera_id_{n}": cam[i] for i, n in enumerate(names)})
    return out

  def _eval_batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
    b = len(index)
    valid = index >= 0
    records = self.reader.read(index[valid])
    images = self._batch_array(b)
    images[~valid] = 0
    fields = ("person_id", "camera_id") + self.extra_fields
    labels = {f: np.full(b, -1, np.int32) for f in fields}
    for row, rec in zip(np.flatnonzero(valid), records):
      img = aug.eval_transform(rec["image"], self.height, self.width,
                               keep_aspect=self.keep_aspect, jpeg_draft=self.jpeg_draft)
      if self.normalize:
        aug.normalize(img, out=images[row])
      else:
        images[row] = img
      for f in fields:
        labels[f][row] = rec[f]
    out = {"image": images}
    out.update(labels)
    out["mask"] = valid
    out["index"] = index.astype(np.int64)
    return out


# ----------------------------------------------------------------------------
# Iterator.


class ReidIterator(collections.abc.Iterator):
  """Iterator over batches whose whole state is the next batch number.

  Supports `get_state()` -> bytes / `set_state(bytes)` like grain's
  DataLoaderIterator, so grain's orbax handler saves it:

    import grain, orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(directory)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_train_state),
        data=grain.checkpoint.CheckpointRestore(it)))  # Restores `it` in place.

  (`grain.checkpoint.CheckpointHandler`, alias
  `grain.python.PyGrainCheckpointHandler`, writes one
  `process_<i>-of-<n>.json` per JAX process, then `set_state` + `start_prefetch`
  on restore.) The state records the sampler's repr; restoring a state written
  by a different sampler (other seed, P, K, dataset size, ...) raises ValueError.
  Worker count and augmentation options may change on resume; so may the
  process count (every process holds the same state), but grain's handler then
  looks for files named with the new count: read any old file and call
  `set_state` yourself.
  """

  def __init__(self, make_dataset: Callable[[int, int], Any], *, num_batches: int | None,
               sampler_repr: str):
    self._make_dataset = make_dataset
    self.num_batches = num_batches
    self._sampler_repr = sampler_repr
    self._next = 0
    self._it = None

  @property
  def position(self) -> int:
    """Number of batches yielded so far (= the next global batch number)."""
    return self._next

  def _start(self) -> None:
    if self._it is None:
      stop = self.num_batches if self.num_batches is not None else _ENDLESS
      self._it = iter(self._make_dataset(self._next, stop))

  def __iter__(self) -> ReidIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self._next >= self.num_batches:
      raise StopIteration
    self._start()
    batch = next(self._it)
    self._next += 1
    return batch

  def get_state(self) -> bytes:
    """JSON bytes: {"version", "next_batch", "sampler"}."""
    return json.dumps({"version": _STATE_VERSION, "next_batch": self._next,
                       "sampler": self._sampler_repr}).encode()

  def set_state(self, state: bytes | str | Mapping[str, Any]) -> None:
    """Continues from a `get_state()` result; prefetched batches are discarded."""
    if isinstance(state, (bytes, bytearray)):
      state = state.decode()
    if isinstance(state, str):
      state = json.loads(state)
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"Unsupported input pipeline state version: {state.get('version')}")
    if state["sampler"] != self._sampler_repr:
      raise ValueError("Input pipeline state was saved with a different sampler:\n"
                       f"  saved:   {state['sampler']}\n  current: {self._sampler_repr}")
    self.close()
    self._next = int(state["next_batch"])

  def start_prefetch(self) -> None:
    """Starts the workers now (grain's orbax handler calls this after restoring)."""
    self._start()
    if hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()

  def close(self) -> None:
    """Stops worker processes and drops prefetched batches."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None

  def __enter__(self) -> ReidIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def _ensure_flags_parsed() -> None:
  """grain's multiprocessing reads absl flags; outside `absl.app.run` (pytest, plain
  scripts) they are unparsed and grain raises, so mark them parsed with defaults.
  A later `absl.app.run`/`FLAGS(argv)` still parses the command line normally."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _FromWorkers:
  """Main-process step after the workers: normalise uint8 images, own the memory.

  Workers send uint8 images (a float32 batch costs ~4x more shared-memory traffic
  than normalising here with `augment.normalize`), and every array is copied out
  of grain's shared memory into a plain numpy array so the segment is freed now.
  """

  def __init__(self, normalize: bool):
    self.normalize = normalize

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in batch.items():
      if self.normalize and value.dtype == np.uint8 and value.ndim == 4:
        out[key] = aug.normalize(value)
        if "mask" in batch:  # Evaluation padding stays an all-zero image.
          out[key][~np.asarray(batch["mask"])] = 0
      else:
        out[key] = np.array(value)
    return out


def _make_dataset_fn(batch_fn: _BatchFn, worker_count: int, worker_buffer_size: int,
                     read_threads: int, prefetch: int,
                     normalize: bool) -> Callable[[int, int], Any]:
  """(start, stop) -> grain IterDataset of batches start..stop-1.

  Without workers, batches (normalised image by image) are built by
  `read_threads` threads of this process. With workers, each worker builds whole
  uint8 batches and a thread of this process normalises them.
  """
  if worker_count > 0:
    batch_fn = copy.copy(batch_fn)
    batch_fn.normalize = False

  def make(start: int, stop: int):
    ds = grain.MapDataset.range(start, stop).map(batch_fn)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch))
    if worker_count > 0:
      _ensure_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
      ds = ds.map(_FromWorkers(normalize))
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds

  return make


def _check_common(height: int, width: int, process_index: int, process_count: int,
                  worker_count: int) -> None:
  if height <= 0 or width <= 0:
    raise ValueError(f"Image size must be positive, got {height}x{width}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")


def make_sampler(labels: Mapping[str, np.ndarray], *, sampler: str = "pk", P: int = 18,
                 K: int = 4, batch_size: int | None = None, seed: int = 0,
                 neg_per_pos: float = 2.0, min_person_id: int = 1,
                 neg_per_pos_end: float | None = None,
                 neg_ramp_steps: int = 0, T: int = 4, frame_sample: str = "random",
                 short: str = "pad") -> smp.BatchSampler:
  """The training sampler named by `sampler` ('pk', 'shuffle', 'pairs', 'triplets' or
  'tracklets').

  `neg_per_pos_end`/`neg_ramp_steps` (pairs only) ramp the negative share linearly
  from `neg_per_pos` to `neg_per_pos_end` over the first `neg_ramp_steps` batches.
  'tracklets' (video sets: records with `tracklet_id`) draws P identities x K
  tracklets x `T` frames (`frame_sample`, `short`: see `samplers.TrackletSampler`).
  """
  pids = labels["person_id"]
  cams = labels.get("camera_id")
  if sampler == "pk":
    return smp.PKSampler(pids, P=P, K=K, seed=seed, min_person_id=min_person_id)
  if sampler == "tracklets":
    if "tracklet_id" not in labels:
      raise ValueError("sampler 'tracklets' (config.input.video.T >= 1) needs a video "
                       "dataset whose records have tracklet_id (e.g. mars); this training "
                       f"split has only {sorted(labels)}")
    return smp.TrackletSampler(pids, labels["tracklet_id"], labels.get("frame_index"),
                               P=P, K=K, T=T, seed=seed, sample=frame_sample, short=short,
                               min_person_id=min_person_id)
  if sampler not in _NEEDS_BATCH_SIZE:
    raise ValueError(f"Unknown sampler {sampler!r}; use 'pk', 'shuffle', 'pairs', "
                     "'triplets' or 'tracklets'.")
  if batch_size is None:
    raise ValueError(f"sampler={sampler!r} needs batch_size (images/pairs/triplets per "
                     "batch)")
  if sampler == "shuffle":
    return smp.ShuffleSampler(pids, batch_size=batch_size, seed=seed,
                              min_person_id=min_person_id)
  if sampler == "pairs":
    return smp.PairSampler(pids, cams, batch_size=batch_size, seed=seed,
                           neg_per_pos=neg_per_pos, min_person_id=min_person_id,
                           neg_per_pos_end=neg_per_pos_end, neg_ramp_steps=neg_ramp_steps)
  return smp.TripletSampler(pids, cams, batch_size=batch_size, seed=seed,
                            min_person_id=min_person_id)


def train_loader(source: Any, *, sampler: str = "pk", P: int = 18, K: int = 4,
                 batch_size: int | None = None, height: int = 256, width: int = 128,
                 augment: Mapping[str, Any] | aug.AugmentConfig | None = None,
                 seed: int = 0, process_index: int = 0, process_count: int = 1,
                 worker_count: int = 0, worker_buffer_size: int = 2,
                 read_threads: int = 1, prefetch: int = 2,
                 num_batches: int | None = None,
                 labels: Mapping[str, np.ndarray] | None = None,
                 neg_per_pos: float = 2.0, min_person_id: int = 1,
                 normalize: bool = True, jpeg_draft: bool = True,
                 neg_per_pos_end: float | None = None,
                 neg_ramp_steps: int = 0, T: int = 4, frame_sample: str = "random",
                 short: str = "pad") -> ReidIterator:
  """Endless (or `num_batches`) stream of augmented training batches for this process.

  Args:
    source: random-access records (`tfds.data_source(...)`, a list of dicts, ...)
      with `image` (uint8 HxWx3 or encoded bytes), `person_id`, `camera_id`.
    sampler: 'pk' (P identities x K images; global batch P*K), 'shuffle'
      (`batch_size` single images in seeded per-epoch random order, for
      identity classification), 'pairs' or 'triplets' (`batch_size`
      pairs/triplets per global batch), 'tracklets' (video sets: P identities x K
      tracklets x `T` frames; global batch P*K tracklets).
    augment: `AugmentConfig` options as a dict or ConfigDict (defaults: TriNet
      resize x1.125 + random crop + flip; erasing/cut-out off).
    seed: fixes sampling and augmentation.
    process_index, process_count: this process's contiguous slice of every global
      batch (global batch must divide by process_count).
    worker_count: grain worker processes (0: in this process). Output does not
      depend on it.
    read_threads, prefetch: threads and batches prefetched per process (grain
      ReadOptions); worker_buffer_size: batches buffered per worker.
    labels: `read_labels(source)` if already computed.
    neg_per_pos: negatives per positive pair ('pairs').
    neg_per_pos_end, neg_ramp_steps: 'pairs' only; when `neg_per_pos_end` is
      given the ratio grows linearly from `neg_per_pos` at batch 0 to it at batch
      `neg_ramp_steps` and stays there (TOMM 2017 verification+identification:
      1.0 -> 4.0). Part of the sampler repr, hence of the resume check.
    min_person_id: identities below it (distractors 0, junk -1) are not sampled.
    T, frame_sample, short: 'tracklets' only: frames per tracklet, how they are
      drawn ('random' or 'consecutive') and what tracklets shorter than T do ('pad'
      by repetition or 'drop'); see `samplers.TrackletSampler`.
    normalize: float32 ImageNet-normalised images; False gives uint8 (normalise
      on device with `augment.normalize`'s formula; 4x less to copy).
    jpeg_draft: decode large JPEGs at reduced scale (see `augment.to_pil`).

  Returns:
    A `ReidIterator` of dicts of numpy arrays. 'pk' and 'shuffle': `image`
    [B,H,W,3], `person_id`, `camera_id` int32 [B] (B = P*K or batch_size,
    divided by process_count). 'pairs':
    `image_a`, `image_b`, `person_id_a/b`, `camera_id_a/b`, `same` (int32 1/0).
    'triplets': `anchor`, `positive`, `negative`, `person_id_{anchor,positive,
    negative}`, `camera_id_{...}`. 'tracklets': `image` [b*T,H,W,3] (the T frames
    of tracklet i at rows i*T .. i*T+T-1, each frame augmented on its own, as the
    public video baselines do), `person_id`, `camera_id`, `tracklet_id` int32 [b]
    (one per tracklet; b = P*K / process_count).
  """
  _check_common(height, width, process_index, process_count, worker_count)
  cfg = aug.AugmentConfig.from_options(augment)
  if labels is None:
    labels = smp.read_labels(source)
  spl = make_sampler(labels, sampler=sampler, P=P, K=K, batch_size=batch_size, seed=seed,
                     neg_per_pos=neg_per_pos, min_person_id=min_person_id,
                     neg_per_pos_end=neg_per_pos_end, neg_ramp_steps=neg_ramp_steps,
                     T=T, frame_sample=frame_sample, short=short)
  kind = _KIND[sampler]
  batch_fn = _BatchFn(RecordReader(source), spl, kind=kind, height=height, width=width,
                      cfg=cfg, seed=seed, process_index=process_index,
                      process_count=process_count, normalize=normalize,
                      keep_aspect=cfg.keep_aspect, extra_fields=(),
                      jpeg_draft=jpeg_draft)
  make = _make_dataset_fn(batch_fn, worker_count, worker_buffer_size, read_threads,
                          prefetch, normalize)
  return ReidIterator(make, num_batches=num_batches, sampler_repr=repr(spl))


def eval_loader(source: Any, *, height: int = 256, width: int = 128, batch_size: int = 128,
                process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                worker_buffer_size: int = 2, read_threads: int = 1, prefetch: int = 2,
                keep_aspect: bool = False, normalize: bool = True,
                jpeg_draft: bool = True) -> ReidIterator:
  """Every record exactly once, in order, resized to HxW (no augmentation).

  `batch_size` is global; each process gets a contiguous slice of every batch. The
  last batch is padded: padded rows have `mask` False, `index` -1, labels -1 and
  a zero image, so metrics count each record once by using `mask`.

  Returns:
    A `ReidIterator` of dicts: `image` float32 [b,H,W,3] (uint8 if not
    `normalize`), `person_id`, `camera_id` int32 [b], `mask` bool [b], `index`
    int64 [b] (record number in the source), plus `tracklet_id`/`frame_index`
    (int32) when the records have them (video sets); b = batch_size / process_count.
  """
  _check_common(height, width, process_index, process_count, worker_count)
  reader = RecordReader(source)
  spl = smp.SequentialSampler(len(reader), batch_size)
  smp.process_slice(batch_size, process_index, process_count)
  first = reader.read([0])[0]
  extra = tuple(f for f in ("tracklet_id", "frame_index") if f in first)
  batch_fn = _BatchFn(reader, spl, kind="eval", height=height, width=width, cfg=None,
                      seed=0, process_index=process_index, process_count=process_count,
                      normalize=normalize, keep_aspect=keep_aspect, extra_fields=extra,
                      jpeg_draft=jpeg_draft)
  make = _make_dataset_fn(batch_fn, worker_count, worker_buffer_size, read_threads,
                          prefetch, normalize)
  return ReidIterator(make, num_batches=spl.num_batches, sampler_repr=repr(spl))
