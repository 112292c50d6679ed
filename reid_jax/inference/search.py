"""Searching a gallery of features for the nearest items of each query.

* `exact_topk`: the k smallest Euclidean distances per query (evaluation's
  distance, `evaluation.distance.block_distance`), ties by lower gallery index as
  evaluation's stable sort. Computed on device in query x gallery blocks, each
  block reduced at once to its top k and merged into the running top k, so the
  memory is O(block_q * (block_g + k)) whatever the gallery size: a gallery of
  millions never needs its full distance matrix.
* `FaissIVF`: an approximate index, faiss `IndexIVFFlat` (optional dependency,
  `pip install faiss-cpu`). IVF-Flat rather than HNSW: building is one k-means on
  a sample plus one assignment pass (100 s for 10^6 x 128 on a loaded 2-core CPU),
  it adds 8 bytes per vector instead of HNSW's ~2 M x 4 bytes of graph links, the
  recall/speed trade is one number chosen at query time (`nprobe`), and the stored
  vectors are exact, so its distances are true ones.
* `rerank_topk`: k-reciprocal re-ranking (`evaluation.rerank`) from the
  embeddings, then the top k of the re-ranked distances. It needs the
  [Q, G] output and the gallery's k-reciprocal neighbours: for galleries that
  fit the re-ranking's memory (see `re_ranking_from_embeddings`).
* `parse_names`: person id and camera from file names (Market-1501's
  `0001_c1s1_...jpg`), so ranked lists are coloured as evaluation colours them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax.evaluation import rerank as rerank_lib
from reid_jax.evaluation.distance import block_distance, check_embeddings
from reid_jax.evaluation.metrics import positive_and_junk

MARKET_PATTERN = r"^(-?\d+)_c(\d+)"
IDENTITY_FIELDS = ("workdir", "method", "model", "input_hw", "step", "tta")


# ----------------------------------------------------------------------------- exact


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_block(best_d: jnp.ndarray, best_i: jnp.ndarray, q: jnp.ndarray, g: jnp.ndarray,
                 offset: jnp.ndarray, valid: jnp.ndarray, k: int):
  """The running top k of q against gallery rows offset.. merged with block g.

  Padded gallery rows (>= valid) are +inf. XLA's TopK keeps the lower index first
  among equal values; the running best (earlier gallery rows) comes first in the
  concatenation, so ties stay in gallery order, as a stable sort leaves them.
  """
  d = block_distance(q, g, "euclidean")
  cols = jnp.arange(g.shape[0])
  d = jnp.where(cols[None, :] < valid, d, jnp.inf)
  cand_d = jnp.concatenate([best_d, d], axis=1)
  cand_i = jnp.concatenate([best_i, jnp.broadcast_to(cols + offset, d.shape)], axis=1)
  neg, pos = jax.lax.top_k(-cand_d, k)
  return -neg, jnp.take_along_axis(cand_i, pos, axis=1)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
  if len(a) == n:
    return a
  return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def exact_topk(query: Any, gallery: Any, k: int, block_q: int = 1024,
               block_g: int = 16384) -> tuple[np.ndarray, np.ndarray]:
  """(indices [Q, k] int64, distances [Q, k] float32) of each query's k nearest gallery
  items by Euclidean distance, ordered by (distance, gallery index); k is capped at G.

  Blocks of `block_q` queries x `block_g` gallery rows (padded to one shape, so one
  compilation); device memory O(block_q * (block_g + k) + block_g * D).
  """
  q = check_embeddings("query features", query)
  g = check_embeddings("gallery features", gallery, q.shape[1])
  if k < 1:
    raise ValueError(f"--top={k}: must be at least 1")
  k = min(int(k), len(g))
  bq, bg = min(block_q, len(q)), min(block_g, len(g))
  out_i = np.empty((len(q), k), np.int64)
  out_d = np.empty((len(q), k), np.float32)
  g_blocks = [jnp.asarray(_pad(g[j:j + bg], bg)) for j in range(0, len(g), bg)]
  for i in range(0, len(q), bq):
    qb = jnp.asarray(_pad(q[i:i + bq], bq))
    best_d = jnp.full((bq, k), jnp.inf, jnp.float32)
    best_i = jnp.full((bq, k), len(g), jnp.int32)  # > every real index: loses ties
    for jb, gb in enumerate(g_blocks):
      j = jb * bg
      best_d, best_i = _merge_block(best_d, best_i, qb, gb, jnp.int32(j),
                                    jnp.int32(min(bg, len(g) - j)), k)
    n = min(bq, len(q) - i)
    out_d[i:i + n] = np.asarray(best_d)[:n]
    out_i[i:i + n] = np.asarray(best_i)[:n]
  return out_i, out_d


# ----------------------------------------------------------------------------- faiss


def import_faiss():
  """The faiss module, or a one-line error saying how to install it."""
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError("--index=faiss needs faiss, an optional dependency: pip install "
                     "faiss-cpu (or faiss-gpu); or use --index=exact") from None
  return faiss


def default_nlist(num_gallery: int) -> int:
  """IVF lists: 2 sqrt(G) (faiss suggests 4 to 16 sqrt(G); fewer lists keep the k-means
  of a million-vector build to about a minute on a few CPU cores), at least 39 training
  points per list."""
  return int(max(1, min(2 * math.isqrt(num_gallery), num_gallery // 39)))


def default_nprobe(nlist: int) -> int:
  """Lists visited per query: nlist / 64, at least 8: recall@10 0.96 in 1/10 of the exact
  search's time on 10^6 clustered 128-d vectors, 0.96 on Market-1501's gallery
  (benchmarks/RESULTS.md, "Using a trained model (issue 15)"); raise `--nprobe` for
  more recall."""
  return int(min(nlist, max(8, nlist // 64)))


TRAIN_PER_LIST = 64  # k-means sample: 64 x nlist gallery rows (faiss warns below 39)


class FaissIVF:
  """A faiss IndexIVFFlat over the gallery (L2), its k-means trained on at most
  TRAIN_PER_LIST x nlist gallery rows (a fixed-seed sample)."""

  def __init__(self, gallery: Any, nlist: int | None = None, seed: int = 0):
    faiss = import_faiss()
    g = np.ascontiguousarray(check_embeddings("gallery features", gallery))
    self.size = len(g)
    self.nlist = int(nlist or default_nlist(len(g)))
    if not 1 <= self.nlist <= len(g):
      raise ValueError(f"--nlist={self.nlist}: must be in [1, {len(g)}] (the gallery size)")
    quantizer = faiss.IndexFlatL2(g.shape[1])
    self.index = faiss.IndexIVFFlat(quantizer, g.shape[1], self.nlist, faiss.METRIC_L2)
    self.index.cp.seed = seed
    sample = g
    if len(g) > TRAIN_PER_LIST * self.nlist:
      rows = np.random.default_rng(seed).choice(len(g), TRAIN_PER_LIST * self.nlist,
                                                replace=False)
      sample = g[np.sort(rows)]
    self.index.train(sample)
    self.index.add(g)
    self._quantizer = quantizer  # the index refers to it

  def search(self, query: Any, k: int, nprobe: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k] int64, Euclidean distances [Q, k]); -1 / inf where fewer than k
    gallery items lie in the visited lists."""
    q = np.ascontiguousarray(check_embeddings("query features", query,
                                              self.index.d))
    self.index.nprobe = int(nprobe or default_nprobe(self.nlist))
    d2, idx = self.index.search(q, min(int(k), self.size))
    d = np.where(idx >= 0, np.sqrt(np.maximum(d2, 0)), np.inf).astype(np.float32)
    return idx.astype(np.int64), d


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
  """Mean over queries of |approx top-k & exact top-k| / k."""
  k = exact.shape[1]
  hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx, exact)]
  return float(np.mean(hits) / k)


# ----------------------------------------------------------------------------- re-ranking


def rerank_topk(query: Any, gallery: Any, k: int, k1: int = 20, k2: int = 6,
                lambda_value: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
  """Top k of the k-reciprocal re-ranked distances (evaluation's defaults 20, 6, 0.3),
  ordered by (distance, gallery index)."""
  dist = rerank_lib.re_ranking_from_embeddings(query, gallery, k1=k1, k2=k2,
                                               lambda_value=lambda_value)
  idx = rerank_lib.smallest_k_stable(dist, min(int(k), dist.shape[1]))
  return idx.astype(np.int64), np.take_along_axis(dist, idx, axis=1)


# ----------------------------------------------------------------------------- names


def parse_names(names: Sequence[str], pattern: str = MARKET_PATTERN
                ) -> tuple[np.ndarray, np.ndarray] | None:
  """(person ids, cameras) from each name's file name by `pattern` (two groups: id,
  camera), or None unless every name matches."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"--name_pattern={pattern!r}: not a regular expression ({e})") from None
  if rx.groups < 2:
    raise ValueError(f"--name_pattern={pattern!r}: needs two groups, person id and camera, "
                     f"e.g. {MARKET_PATTERN!r}")
  pids, cams = [], []
  for n in names:
    m = rx.search(os.path.basename(n))
    if m is None:
      return None
    try:
      pids.append(int(m.group(1)))
      cams.append(int(m.group(2)))
    except ValueError:
      return None
  return np.asarray(pids, np.int64), np.asarray(cams, np.int64)


def match_labels(q_labels: tuple[np.ndarray, np.ndarray], g_labels: tuple[np.ndarray, np.ndarray],
                 idx: np.ndarray) -> np.ndarray:
  """[Q, k] 'correct' / 'wrong' / 'junk' of each ranked item (evaluation's rule: same id
  and another camera is correct; same id and camera, or id -1, is junk)."""
  out = np.empty(idx.shape, object)
  for qi in range(idx.shape[0]):
    cols = idx[qi][idx[qi] >= 0]
    pos, junk = positive_and_junk(q_labels[0][qi:qi + 1], q_labels[1][qi:qi + 1],
                                  g_labels[0][cols], g_labels[1][cols])
    out[qi, :] = None
    out[qi, :len(cols)] = np.where(junk[0], "junk", np.where(pos[0], "correct", "wrong"))
  return out


# ----------------------------------------------------------------------------- runs


def identity_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """The identity fields (`Run.identity()`) on which two runs differ."""
  return [f for f in IDENTITY_FIELDS if json.dumps(a.get(f), sort_keys=True)
          != json.dumps(b.get(f), sort_keys=True)]


def describe(identity: dict[str, Any]) -> str:
  """A run identity in a few words, for error messages."""
  hw = identity.get("input_hw") or ["?", "?"]
  model = identity.get("model") or {}
  return (f"{identity.get('workdir')} (method {identity.get('method')}, backbone "
          f"{model.get('backbone', '?')}, {hw[0]}x{hw[1]}, step {identity.get('step')}, "
          f"tta {identity.get('tta') or 'none'})")


# ----------------------------------------------------------------------------- pictures

NEUTRAL = (120, 120, 200)  # frames when names carry no identity: no right or wrong


def draw_ranked_list(query_image: Any, gallery_images: Sequence[Any], distances: Sequence[float],
                     matches: Sequence[str | None] | None, path: str, title: str,
                     image_size: tuple[int, int] = (128, 64), border: int = 4) -> str:
  """One ranked-list PNG, as `evaluation.visualize.ranked_list` draws it: the query
  (black frame), then the gallery items in rank order framed green (correct), red
  (wrong) or grey (junk), or all in a neutral blue when `matches` is None; each with
  its rank and distance underneath. An image that cannot be read is a grey tile
  marked 'missing'."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  from reid_jax.evaluation import visualize as vis  # pylint: disable=import-outside-toplevel
  colours = {"correct": vis.GREEN, "wrong": vis.RED, "junk": vis.GREY}
  h, w = image_size
  cell_w, gap, label_h = w + 2 * border, 12, 28

  def load(item):
    try:
      return vis._load([item], 0, image_size)  # pylint: disable=protected-access
    except (OSError, ValueError):
      im = Image.new("RGB", (w, h), (200, 200, 200))
      ImageDraw.Draw(im).text((2, h // 2 - 6), "missing", fill=vis.BLACK)
      return im

  canvas = Image.new("RGB", (cell_w * (len(gallery_images) + 1) + gap,
                             h + 2 * border + label_h), (255, 255, 255))
  tile = vis._tile  # pylint: disable=protected-access  (visualize's frame helper)
  canvas.paste(tile(load(query_image), vis.BLACK, border), (0, 0))
  draw = ImageDraw.Draw(canvas)
  draw.text((2, h + 2 * border + 1), title[:max(8, cell_w // 6)], fill=vis.BLACK)
  for r, (item, dist) in enumerate(zip(gallery_images, distances)):
    colour = NEUTRAL if matches is None else colours.get(matches[r], NEUTRAL)
    x = cell_w * (r + 1) + gap
    canvas.paste(tile(load(item), colour, border), (x, 0))
    draw.text((x + 2, h + 2 * border + 1), f"{r + 1}", fill=colour)
    draw.text((x + 2, h + 2 * border + 14), f"{dist:.3g}", fill=vis.BLACK)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)
  return path


def picture_name(index: int, name: str) -> str:
  """`00003_sub_dir_0001_c1s1.png`: the query's rank in the results and its name."""
  stem = os.path.splitext(name)[0]
  return f"{index:05d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:80]}.png"


def refuse_other_run(what: str, want: dict[str, Any], other: str, got: dict[str, Any]
                     ) -> None:
  """A one-line error when features `what` (embedded by run `want`) would be ranked with
  `other` (run `got`): the two runs named, and the fields that differ."""
  bad = identity_mismatch(want, got)
  if bad:
    raise ValueError(f"{what} was embedded by {describe(want)} but {other} is "
                     f"{describe(got)} (they differ in {', '.join(bad)}); use the run that "
                     "embedded it, or embed again with this one")
