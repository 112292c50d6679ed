"""Pictures users look at first: ranked lists per query and CMC curves.

`ranked_list` writes one PNG per query: the query (black frame), then its top-k
gallery images in rank order (stable sort, ties by gallery index, as the
metrics), framed green for a correct match (same id, other camera), red for a
wrong one and grey for junk (same id and camera, or id -1). `plot_cmc` draws
CMC curves with matplotlib (Agg backend, no display needed).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from reid_jax.evaluation._checks import (EvaluationError, as_labels, check_distmat,
                                         check_positive_int, nan_error)
from reid_jax.evaluation.metrics import distinct_unknown_cameras, positive_and_junk

GREEN = (0, 170, 0)
RED = (220, 0, 0)
GREY = (150, 150, 150)
BLACK = (0, 0, 0)

ImageSource = Sequence[Any] | Callable[[int], Any]


def _load(source: ImageSource, i: int, size_hw: tuple[int, int]) -> Image.Image:
  """Image i of `source` (path, HxW[x3|4] array, PIL image, or callable) resized to size."""
  item = source(i) if callable(source) else source[i]
  if isinstance(item, (str, os.PathLike)):
    img = Image.open(item)
  elif isinstance(item, Image.Image):
    img = item
  else:
    arr = np.asarray(item)
    if np.issubdtype(arr.dtype, np.floating):
      arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8).squeeze())
  return img.convert("RGB").resize((size_hw[1], size_hw[0]), Image.BILINEAR)


def _tile(img: Image.Image, color: tuple[int, int, int], border: int) -> Image.Image:
  w, h = img.size
  out = Image.new("RGB", (w + 2 * border, h + 2 * border), color)
  out.paste(img, (border, border))
  return out


def ranked_list(distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                q_images: ImageSource, g_images: ImageSource, out_dir: str,
                topk: int = 10, query_indices: Sequence[int] | None = None,
                image_size: tuple[int, int] = (128, 64), border: int = 4,
                show_junk: bool = True) -> list[str]:
  """Writes `out_dir/query_XXXXX.png` for each query; returns the paths.

  Args:
    distmat: [Q, G] distances.
    q_pids, g_pids, q_camids, g_camids: ids and cameras (Market-1501 protocol).
    q_images, g_images: per-index image sources: sequences of file paths, arrays
      (HxW or HxWx3, uint8 or float in [0, 1]) or PIL images, or callables i -> image.
    out_dir: created if missing.
    topk: gallery images per row.
    query_indices: which queries (default: all).
    image_size: (height, width) of each tile.
    border: frame width in pixels.
    show_junk: if False, junk items are skipped instead of drawn in grey.
  """
  d = check_distmat(distmat)
  nq, ng = d.shape
  qp, gp = as_labels("q_pids", q_pids, nq), as_labels("g_pids", g_pids, ng)
  qc, gc = distinct_unknown_cameras(as_labels("q_camids", q_camids, nq),
                                    as_labels("g_camids", g_camids, ng))
  topk = check_positive_int("topk", topk)
  idxs = range(nq) if query_indices is None else [int(i) for i in query_indices]
  os.makedirs(out_dir, exist_ok=True)
  h, w = image_size
  cell_w, gap, label_h = w + 2 * border, 12, 14
  paths = []
  for qi in idxs:
    if not 0 <= qi < nq:
      raise EvaluationError(f"query index {qi} is out of range [0, {nq})")
    row = d[qi]
    if np.isnan(row).any():
      raise nan_error("distmat", row[None], qi)
    order = np.argsort(row, kind="stable")
    pos, junk = positive_and_junk(qp[qi:qi + 1], qc[qi:qi + 1], gp, gc)
    pos, junk = pos[0], junk[0]
    if not show_junk:
      order = order[~junk[order]]
    order = order[:topk]
    canvas = Image.new("RGB", (cell_w * (len(order) + 1) + gap, h + 2 * border + label_h),
                       (255, 255, 255))
    canvas.paste(_tile(_load(q_images, qi, image_size), BLACK, border), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, h + 2 * border + 1), f"q{qi} id{qp[qi]}", fill=BLACK)
    for r, gi in enumerate(order):
      color = GREY if junk[gi] else (GREEN if pos[gi] else RED)
      x = cell_w * (r + 1) + gap
      canvas.paste(_tile(_load(g_images, int(gi), image_size), color, border), (x, 0))
      draw.text((x + 2, h + 2 * border + 1), f"{r + 1}: {row[gi]:.3g}", fill=color)
    path = os.path.join(out_dir, f"query_{qi:05d}.png")
    canvas.save(path)
    paths.append(path)
  return paths


def plot_cmc(cmc: Any | Mapping[str, Any], path: str, max_rank: int | None = None,
             title: str = "CMC") -> str:
  """Saves CMC curve(s) (one array, or {label: array}) as an image at `path`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  curves = dict(cmc) if isinstance(cmc, Mapping) else {"": cmc}
  if not curves:
    raise EvaluationError("plot_cmc needs at least one CMC curve")
  fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
  for label, c in curves.items():
    c = np.asarray(c, np.float64).reshape(-1)
    if c.size == 0 or np.isnan(c).any():
      raise EvaluationError(f"CMC curve {label!r} is empty or contains NaN")
    c = c[:max_rank] if max_rank else c
    ranks = np.arange(1, len(c) + 1)
    ax.plot(ranks, 100 * c, marker="o" if len(c) <= 20 else None, markersize=3,
            label=f"{label} (R1 {100 * c[0]:.1f}%)" if label else f"R1 {100 * c[0]:.1f}%")
  ax.set_xlabel("rank")
  ax.set_ylabel("matching rate (%)")
  ax.set_title(title)
  ax.set_ylim(0, 100)
  ax.grid(True, alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path
