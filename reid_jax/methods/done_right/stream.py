"""The ranking stage's sampler: windows of triplets, random first and then mined.

Window `pos` (0-based update number) holds `triplets_per_update` triplets; triplet j is
a random one (`samplers.TripletSampler`: anchor from a per-epoch permutation, positive
from another camera when possible, uniform negative), or, with probability
`hard_fraction(pos)`, one drawn from the current hard table (`mining.HardTable`). The
table is re-mined every `mining.every` updates from the model's embeddings of a random
pool of `mining.pool` training images (through `refresh`, called before the window is
drawn with the current model). Images are read at their own size: the longer side
scaled to `longer_side`, sides rounded to `size_multiple` (`sizes.target_shape`), then
the ranking augmentation (progressive cut-out; flip off by default) is applied.

Everything is a function of (seed, pos, table), and the table is part of `get_state`, so
a resumed run draws exactly the triplets an uninterrupted one does, also in the middle of
a mining round.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any, Callable

import numpy as np
from PIL import Image

from reid_jax.data import augment as aug
from reid_jax.data import pipeline
from reid_jax.data import samplers as smp
from reid_jax.methods.done_right import mining, sizes

_STATE_VERSION = 1
_HARD_DRAW, _POOL_DRAW = 0x647201, 0x647202


def _encode(a: np.ndarray) -> str:
  buf = io.BytesIO()
  np.save(buf, np.asarray(a), allow_pickle=False)
  return base64.b64encode(buf.getvalue()).decode()


def _decode(s: str) -> np.ndarray:
  return np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)


def hard_fraction(pos: int, start: int, ramp: int, maximum: float) -> float:
  """Share of mined triplets at update `pos`: 0 before `start`, then linear to
  `maximum` over `ramp` updates (the curriculum from random to hard triplets)."""
  if maximum <= 0 or pos < start:
    return 0.0
  if ramp <= 0:
    return float(maximum)
  return float(maximum * min(1.0, (pos - start + 1) / ramp))


class TripletStream:
  """Iterator of this process's share of each update's triplets (see the module doc).

  `next()` returns {"triplets": [(a, p, n) float32 HxWx3 normalised], "index": [T, 3]
  record indices, "hard": [T] bool, "mining_s": seconds mined before this window}.
  `padded=(H, W)` instead fits every image into an HxW canvas (aspect kept, padded with
  the ImageNet mean), for the fixed-size comparison.
  """

  def __init__(self, source: Any, *, triplets_per_update: int, seed: int,
               longer_side: int, size_multiple: int, min_side: int,
               augment: aug.AugmentConfig, mining_cfg: Any,
               pool_size: tuple[int, int], process_index: int = 0, process_count: int = 1,
               padded: tuple[int, int] | None = None, labels: dict | None = None):
    self.reader = pipeline.RecordReader(source)
    labels = labels if labels is not None else smp.read_labels(source)
    self.person_ids = np.asarray(labels["person_id"])
    self.total = int(triplets_per_update)
    if self.total % process_count:
      raise ValueError(f"config.ranking.triplets_per_update={self.total} does not split "
                       f"over {process_count} processes")
    self.local = smp.process_slice(self.total, process_index, process_count)
    self.sampler = smp.TripletSampler(self.person_ids, labels.get("camera_id"),
                                      batch_size=self.total, seed=seed)
    self.seed = int(seed)
    self.longer_side, self.multiple, self.min_side = longer_side, size_multiple, min_side
    self.augment, self.padded, self.pool_size = augment, padded, pool_size
    self.every, self.pool = int(mining_cfg.every), int(mining_cfg.pool)
    self.top = int(mining_cfg.top)
    self.start, self.ramp = int(mining_cfg.start), int(mining_cfg.ramp)
    self.max_hard = float(mining_cfg.hard_fraction)
    eligible = np.flatnonzero(self.person_ids >= 1)
    if self.max_hard > 0 and self.pool > len(eligible):
      raise ValueError(f"config.mining.pool={self.pool} is larger than the training split "
                       f"({len(eligible)} images of identities >= 1); lower it")
    self._eligible = eligible
    self.table: mining.HardTable | None = None
    self.table_round = -1
    self.position = 0
    self.mining_s = 0.0          # mining time since the last window
    self.mining_total_s = 0.0    # in this process run
    self.max_distortion = 0.0
    self.upscaled_short_side = 0  # images whose short side was raised to the minimum

  # ------------------------------------------------------------------ mining

  def hard_fraction(self, pos: int) -> float:
    return hard_fraction(pos, self.start, self.ramp, self.max_hard)

  def mining_due(self, pos: int) -> bool:
    """True when window `pos` needs a table that is not there yet."""
    return self.hard_fraction(pos) > 0 and self.table_round != pos // self.every

  def pool_indices(self, round_: int) -> np.ndarray:
    """The training records embedded for mining round `round_` (sorted)."""
    rng = smp._rng(_POOL_DRAW, self.seed, round_)  # pylint: disable=protected-access
    return np.sort(rng.choice(self._eligible, self.pool, replace=False))

  def pool_batches(self, indices: np.ndarray, batch_size: int):
    """(images [b, H, W, 3] float32, valid count) of the pool at the fixed pool size,
    the last batch zero-padded to `batch_size` so that one program embeds them all."""
    h, w = self.pool_size
    for lo in range(0, len(indices), batch_size):
      idx = indices[lo:lo + batch_size]
      out = np.zeros((batch_size, h, w, 3), np.float32)
      for k, rec in enumerate(self.reader.read(idx)):
        aug.normalize(aug.eval_transform(rec["image"], h, w), out=out[k])
      yield out, len(idx)

  def refresh(self, pos: int, embed: Callable[[np.ndarray], np.ndarray],
              batch_size: int) -> None:
    """Re-mines the hard table for window `pos` if due, with `embed(images) -> [b, D]`
    (the current model)."""
    if pos != self.position:
      raise RuntimeError(f"mining for update {pos + 1} but the stream is at {self.position + 1}")
    if not self.mining_due(pos):
      return
    t = time.perf_counter()
    round_ = pos // self.every
    idx = self.pool_indices(round_)
    embs = [np.asarray(embed(x))[:n] for x, n in self.pool_batches(idx, batch_size)]
    self.table = mining.mine(np.concatenate(embs), self.person_ids[idx], idx, self.top)
    self.table_round = round_
    took = time.perf_counter() - t
    self.mining_s += took
    self.mining_total_s += took

  # ------------------------------------------------------------------ windows

  def plan(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
    """([T, 3] record indices, [T] mined?) of window `pos` (the global window)."""
    index = np.array(self.sampler[pos]["index"], np.int64)
    hard = np.zeros(self.total, bool)
    frac = self.hard_fraction(pos)
    if frac > 0:
      if self.table is None or self.table_round != pos // self.every:
        raise RuntimeError(f"update {pos + 1} needs mined triplets: call refresh first")
      rng = smp._rng(_HARD_DRAW, self.seed, pos)  # pylint: disable=protected-access
      hard = rng.random(self.total) < frac
      for j in np.flatnonzero(hard):
        index[j] = self.table.draw(rng)
    return index, hard

  def image(self, record: dict, position: int, pos: int) -> np.ndarray:
    """One training image at its own rounded size (or in the padded canvas), augmented
    with the generator of its global position, ImageNet-normalised."""
    im = aug.to_pil(record["image"]) if not isinstance(record["image"], Image.Image) else (
        record["image"])
    rng = aug.image_rng(self.seed, position)
    if self.padded is not None:
      h, w = self.padded
      im = Image.fromarray(aug.resize_keep_aspect(im, h, w))
    else:
      h, w = sizes.target_shape(im.height, im.width, self.longer_side, self.multiple,
                                self.min_side)
      self.max_distortion = max(self.max_distortion, sizes.distortion(im.height, im.width,
                                                                      (h, w)))
      natural = min(im.height, im.width) * self.longer_side / max(im.height, im.width)
      if sizes.round_to(natural, self.multiple) < min(h, w):
        self.upscaled_short_side += 1
    out = aug.train_transform(im, rng, h, w, self.augment, step=pos)
    return aug.normalize(out)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    pos = self.position
    index, hard = self.plan(pos)
    local = index[self.local]
    recs = self.reader.read(np.unique(local))
    by_index = dict(zip(np.unique(local).tolist(), recs))
    trips = []
    for j, row in enumerate(local):
      g = self.local.start + j
      trips.append(tuple(self.image(by_index[int(r)], (pos * self.total + g) * 3 + k, pos)
                         for k, r in enumerate(row)))
    window = {"triplets": trips, "index": local, "hard": hard[self.local],
              "mining_s": self.mining_s}
    self.mining_s = 0.0
    self.position += 1
    return window

  # ------------------------------------------------------------------ checkpointing

  def get_state(self) -> bytes:
    """JSON bytes: position, sampler, and the current hard table."""
    state = {"version": _STATE_VERSION, "position": self.position,
             "sampler": repr(self.sampler), "table_round": self.table_round}
    if self.table is not None:
      state["table"] = {k: _encode(getattr(self.table, k))
                        for k in ("anchors", "pairs", "counts")}
    return json.dumps(state).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    """Continues from a `get_state()` result."""
    if isinstance(state, (bytes, bytearray)):
      state = state.decode()
    if isinstance(state, str):
      state = json.loads(state)
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"unsupported triplet stream state version {state.get('version')}")
    if state["sampler"] != repr(self.sampler):
      raise ValueError("triplet stream state was saved with a different sampler:\n"
                       f"  saved:   {state['sampler']}\n  current: {self.sampler!r}")
    self.position = int(state["position"])
    self.table_round = int(state["table_round"])
    t = state.get("table")
    self.table = None if t is None else mining.HardTable(
        **{k: _decode(v) for k, v in t.items()})
    self.mining_s = 0.0

  def start_prefetch(self) -> None:
    """Nothing to start (grain's checkpoint handler calls this after restoring)."""

  def close(self) -> None:
    """Nothing to release."""
