"""Why two images match: the embedding dimensions that carry the similarity, as heat maps.

Following "Re-ID done right" (Almazan et al. 2018): with l2-normalised embeddings q and
d the similarity q.d = sum_i q_i * d_i is a sum over dimensions, so the dimensions with
the largest products q_i * d_i explain most of the match. For each of them a Grad-CAM
map (Selvaraju et al. 2017) shows where on each image that dimension fires:

  alpha_c = mean_{y,x} d e_k / d A[y, x, c],   map_k = ReLU(sum_c alpha_c * A[..., c])

with A the last convolutional feature map (NHWC) and e = head(A) the embedding.

  * `top_dimensions`: the k dimensions with the largest q_i * d_i.
  * `gradcam_maps`: maps of several dimensions from one linearisation of the head.
  * `upsample`, `normalize_maps`: maps to image size, each scaled to [0, 1].
  * `matching_figure`: a PNG grid, query and gallery rows, one overlay per dimension.
  * `matching_regions`: all of the above for one query/gallery pair.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from reid_jax.evaluation._checks import EvaluationError

FeatureMapFn = Callable[[Any], Any]  # [1, H, W, 3] image batch -> [1, h, w, C] feature map
HeadFn = Callable[[Any], Any]  # [1, h, w, C] feature map -> [1, D] embedding

PAD = 4  # pixels between tiles and around the grid
CAPTION_H = 24  # two caption lines above the tiles
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def top_dimensions(q: np.ndarray, d: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the k largest q_i * d_i (descending, ties by lower index) and the products."""
  q, d = np.asarray(q), np.asarray(d)
  if q.ndim != 1 or d.ndim != 1:
    raise EvaluationError(f"q and d must be 1-D embeddings, got shapes {q.shape} and {d.shape}")
  if q.shape != d.shape:
    raise EvaluationError(f"q and d must have equal length, got {q.shape[0]} and {d.shape[0]}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= q.shape[0]:
    raise EvaluationError(f"k must be an integer in [1, {q.shape[0]}] (embedding size), got {k!r}")
  products = q * d
  if np.isnan(products).any():
    raise EvaluationError(f"q * d contains NaN at dimension {int(np.argmax(np.isnan(products)))}")
  order = np.argsort(-products, kind="stable")[:k]  # stable: equal products keep index order
  return order, products[order]


def _linearize(feature_map_fn: FeatureMapFn, head_fn: HeadFn,
               image: Any) -> tuple[jax.Array, jax.Array, Callable]:
  """The feature map A of one image, its embedding e = head_fn(A) [1, D] and the vjp at A."""
  a = jnp.asarray(feature_map_fn(jnp.asarray(image)[None]))
  if a.ndim != 4 or a.shape[0] != 1:
    raise EvaluationError(f"feature_map_fn must return [1, h, w, C] (NHWC), got shape {a.shape}")
  e, vjp_fn = jax.vjp(head_fn, a)
  if e.ndim != 2 or e.shape[0] != 1:
    raise EvaluationError(f"head_fn must return a [1, D] embedding, got shape {e.shape}")
  return a, e, vjp_fn


def _check_dims(dims: Any, num_dims: int) -> np.ndarray:
  """`dims` as a 1-D int array of embedding indices in [0, num_dims)."""
  dims = np.asarray(dims)
  if dims.ndim != 1 or dims.size == 0 or not np.issubdtype(dims.dtype, np.integer):
    raise EvaluationError(f"dims must be a non-empty 1-D integer array, got shape {dims.shape} "
                          f"dtype {dims.dtype}")
  if dims.min() < 0 or dims.max() >= num_dims:
    raise EvaluationError(f"dims must lie in [0, {num_dims}) (embedding size), got {dims.tolist()}")
  return dims.astype(np.int64)


def _maps_from_vjp(a: jax.Array, e: jax.Array, vjp_fn: Callable, dims: np.ndarray) -> np.ndarray:
  """Grad-CAM maps [K, h, w] of dimensions `dims`: one vmapped backward pass through the head."""
  cotangents = jax.nn.one_hot(jnp.asarray(dims), e.shape[1], dtype=e.dtype)[:, None, :]  # [K,1,D]
  (grads,) = jax.vmap(vjp_fn)(cotangents)  # [K, 1, h, w, C]: d e_k / d A
  alpha = np.asarray(grads[:, 0], np.float32).mean(axis=(1, 2))  # [K, C]
  return np.maximum(np.einsum("hwc,kc->khw", np.asarray(a[0], np.float32), alpha), 0.0)


def gradcam_maps(feature_map_fn: FeatureMapFn, head_fn: HeadFn, image: Any,
                 dims: Sequence[int] | np.ndarray) -> np.ndarray:
  """Grad-CAM maps [len(dims), h, w] of embedding dimensions `dims`, on the feature-map grid.

  Args:
    feature_map_fn: image batch [1, H, W, 3] -> last convolutional map A [1, h, w, C].
    head_fn: A -> embedding [1, D] (e.g. global max pooling, FC, l2 normalisation).
    image: one image [H, W, 3], as `feature_map_fn` expects it (already preprocessed).
    dims: embedding dimensions to explain.
  """
  a, e, vjp_fn = _linearize(feature_map_fn, head_fn, image)
  return _maps_from_vjp(a, e, vjp_fn, _check_dims(dims, e.shape[1]))


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear-interpolation weights: half-pixel centres, source clamped to the edges."""
  src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).astype(np.float32)
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
  """Maps [K, h, w] resized bilinearly to [K, height, width] (numpy, no compile).

  Half-pixel centres and clamped edges, as jax.image.resize / PIL when enlarging; no
  antialiasing when shrinking.
  """
  maps = np.asarray(maps, np.float32)
  if maps.ndim != 3:
    raise EvaluationError(f"maps must be [K, h, w], got shape {maps.shape}")
  if height < 1 or width < 1:
    raise EvaluationError(f"upsample size must be positive, got {height}x{width}")
  if maps.shape[1:] == (height, width):
    return maps
  rows, cols = _interp_matrix(maps.shape[1], height), _interp_matrix(maps.shape[2], width)
  return np.einsum("yh,khw,xw->kyx", rows, maps, cols)


def normalize_maps(maps: np.ndarray) -> np.ndarray:
  """Each map (negatives clipped) divided by its maximum, so in [0, 1]; an all-zero map stays 0."""
  maps = np.maximum(np.asarray(maps, np.float32), 0.0)
  peak = maps.max(axis=(1, 2), keepdims=True)
  return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def jet(x: np.ndarray) -> np.ndarray:
  """Jet-like colormap: values in [0, 1] -> RGB in [0, 1] (dark blue, cyan, yellow, dark red)."""
  x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)[..., None]
  centres = np.array([0.75, 0.5, 0.25], np.float32)  # where R, G, B peak
  return np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)


def _to_rgb(image: Any, size_hw: tuple[int, int]) -> np.ndarray:
  """An HxW[x1|3|4] image (uint8, or float in [0, 1]) as uint8 RGB resized to size_hw."""
  if isinstance(image, Image.Image):
    img = image
  else:
    arr = np.asarray(image)
    if np.issubdtype(arr.dtype, np.floating):
      arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0)
    img = Image.fromarray(arr.astype(np.uint8).squeeze())
  img = img.convert("RGB")
  if img.size != (size_hw[1], size_hw[0]):
    img = img.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
  return np.asarray(img)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """uint8 RGB [H, W, 3] blended with jet(heat [H, W] in [0, 1]): (1-alpha)*rgb + alpha*jet."""
  mixed = (1.0 - alpha) * rgb.astype(np.float32) + alpha * 255.0 * jet(heat)
  return np.round(np.clip(mixed, 0, 255)).astype(np.uint8)


def figure_size(k: int, image_size: tuple[int, int]) -> tuple[int, int]:
  """(width, height) of `matching_figure`'s grid: k + 1 columns, two rows, captions on top."""
  h, w = image_size
  return (k + 1) * (w + PAD) + PAD, CAPTION_H + 2 * (h + PAD) + PAD


def matching_figure(query_image: Any, gallery_image: Any, query_maps: np.ndarray,
                    gallery_maps: np.ndarray, dims: Sequence[int] | np.ndarray,
                    products: Sequence[float] | np.ndarray, path: str, *,
                    image_size: tuple[int, int] | None = None, alpha: float = 0.5,
                    similarity: float | None = None) -> str:
  """Writes a PNG grid to `path` (atomically); returns `path`.

  Row 1: the query image, then one heat-map overlay per dimension; row 2 the same for the
  gallery image. Each column is captioned with the dimension and its product q_i * d_i.
  Maps of any grid size are resized to the tile and scaled to [0, 1] per map.

  Args:
    query_image, gallery_image: HxWx3 arrays (uint8, or float in [0, 1]) or PIL images.
    query_maps, gallery_maps: [K, h, w] maps, row k for dimension dims[k].
    dims, products: [K] dimension indices and products (from `top_dimensions`).
    path: output file; parent folders are created.
    image_size: (height, width) of each tile (default: the query image's size).
    alpha: heat-map weight in the blend.
    similarity: if given, printed above the image column.
  """
  dims, products = np.asarray(dims).reshape(-1), np.asarray(products).reshape(-1)
  k = dims.shape[0]
  maps = [np.asarray(query_maps), np.asarray(gallery_maps)]
  for name, m in zip(("query_maps", "gallery_maps"), maps):
    if m.ndim != 3 or m.shape[0] != k:
      raise EvaluationError(f"{name} must be [{k}, h, w] (one map per dim), got shape {m.shape}")
  if products.shape[0] != k:
    raise EvaluationError(f"products has {products.shape[0]} entries but dims has {k}")
  if image_size is None:
    image_size = (np.asarray(query_image).shape[:2] if not isinstance(query_image, Image.Image)
                  else query_image.size[::-1])
  h, w = int(image_size[0]), int(image_size[1])
  canvas = Image.new("RGB", figure_size(k, (h, w)), WHITE)
  draw = ImageDraw.Draw(canvas)
  draw.text((PAD, 1), "query/gallery", fill=BLACK)
  if similarity is not None:
    draw.text((PAD, 12), f"sim {similarity:.3f}", fill=BLACK)
  for row, (image, m) in enumerate(zip((query_image, gallery_image), maps)):
    rgb = _to_rgb(image, (h, w))
    heat = normalize_maps(upsample(m, h, w))
    y = CAPTION_H + PAD + row * (h + PAD)
    canvas.paste(Image.fromarray(rgb), (PAD, y))
    for j in range(k):
      canvas.paste(Image.fromarray(overlay(rgb, heat[j], alpha)), (PAD + (j + 1) * (w + PAD), y))
  for j in range(k):
    x = PAD + (j + 1) * (w + PAD)
    draw.text((x, 1), f"dim {int(dims[j])}", fill=BLACK)
    draw.text((x, 12), f"{float(products[j]):+.3g}", fill=BLACK)
  return _save_atomic(canvas, path)


def _save_atomic(img: Image.Image, path: str) -> str:
  """Saves `img` as PNG via a temporary file in the same folder and os.replace."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=".matching_", suffix=".png.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      img.save(f, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def matching_regions(feature_map_fn: FeatureMapFn, head_fn: HeadFn, query: Any, gallery: Any,
                     k: int = 5) -> dict[str, Any]:
  """The k dimensions that contribute most to q.d, and their Grad-CAM maps on both images.

  One forward and one vmapped backward pass per image. The maps of both images use the
  same dims and are upsampled to each image's own size (the images may differ in size)
  and scaled to [0, 1] per map. The products sum to the cosine similarity only when
  `head_fn` l2-normalises.

  Returns:
    dims [k], products [k] (q_i * d_i, descending), query_maps [k, Hq, Wq],
    gallery_maps [k, Hg, Wg], similarity (float q.d).
  """
  query, gallery = np.asarray(query), np.asarray(gallery)
  a_q, e_q, vjp_q = _linearize(feature_map_fn, head_fn, query)
  a_g, e_g, vjp_g = _linearize(feature_map_fn, head_fn, gallery)
  q, d = np.asarray(e_q[0], np.float32), np.asarray(e_g[0], np.float32)
  dims, products = top_dimensions(q, d, k)
  maps = [normalize_maps(upsample(_maps_from_vjp(a, e, vjp, dims), *img.shape[:2]))
          for a, e, vjp, img in ((a_q, e_q, vjp_q, query), (a_g, e_g, vjp_g, gallery))]
  return {"dims": dims, "products": products, "query_maps": maps[0], "gallery_maps": maps[1],
          "similarity": float(np.dot(q.astype(np.float64), d.astype(np.float64)))}
