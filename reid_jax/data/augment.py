"""Per-image augmentations for re-ID training and evaluation.

Every function takes one HxWx3 image (uint8, or float in [0, 1] where noted) and,
when random, an explicit `np.random.Generator`, and returns a new array without
touching its input. The pipeline derives each image's generator from
(seed, global position) with `image_rng`, so results do not depend on worker count
and resume exactly.

`train_transform` composes the training augmentations in a fixed order and is the
single entry point the pipeline uses; it draws from the generator in the same order
as calling the individual functions one after another, so it gives identical
results (tested), only faster (it stays in PIL until the geometry is done).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The ImageNet mean on the 0..255 scale: the "dataset mean" erasing fill for uint8
# images, which becomes ~0 after `normalize`.
IMAGENET_MEAN_UINT8 = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)

ImageLike = Union[np.ndarray, Image.Image, bytes]
Fill = Union[str, Sequence[float]]

_AUG_STREAM = 0x61756700  # Separates augmentation randomness from sampler randomness.
_BILINEAR = Image.Resampling.BILINEAR


def image_rng(seed: int, position: int) -> np.random.Generator:
  """Generator for the image at global `position` of a run seeded with `seed`.

  A Philox stream keyed by (seed, position): depends only on those, never on
  which worker or process computes the image, so augmentation is reproducible
  and resumes exactly.
  """
  key0 = (int(seed) * 0x9E3779B97F4A7C15 + _AUG_STREAM) & 0xFFFFFFFFFFFFFFFF
  key = np.array([key0, int(position) & 0xFFFFFFFFFFFFFFFF], np.uint64)
  return np.random.Generator(np.random.Philox(key=key))


def to_pil(image: ImageLike, draft: tuple[int, int] | None = None) -> Image.Image:
  """Returns an RGB PIL image from an array, encoded bytes or a PIL image.

  `draft` = (width, height): an encoded JPEG is decoded at the smallest
  1/2, 1/4 or 1/8 scale that is still at least that large (PIL `Image.draft`),
  which is much faster for large photos and a no-op for small ones.
  """
  if isinstance(image, Image.Image):
    im = image
  elif isinstance(image, (bytes, bytearray, memoryview)):
    im = Image.open(io.BytesIO(image))
    if draft is not None and im.format == "JPEG":
      im.draft("RGB", draft)
  else:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
      raise TypeError(f"to_pil needs a uint8 array, got {arr.dtype}")
    im = Image.fromarray(arr)
  return im if im.mode == "RGB" else im.convert("RGB")


def _as_image(image: ImageLike) -> np.ndarray | Image.Image:
  """Opens encoded bytes lazily (PIL); arrays and PIL images pass through."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    return to_pil(image)
  return image


def _image_size(image: np.ndarray | Image.Image) -> tuple[int, int]:
  """(height, width) without decoding pixels."""
  if isinstance(image, Image.Image):
    return image.height, image.width
  return int(image.shape[0]), int(image.shape[1])


def _resize_box(image: ImageLike, height: int, width: int,
                box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """Bilinear (PIL) resize of `box` = (left, top, right, bottom) of `image` to HxW.

  uint8 inputs go through PIL's RGB path; float inputs are resized channel by
  channel in PIL's 32-bit float mode and come back float32.
  """
  image = _as_image(image)
  if not isinstance(image, Image.Image):
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
      chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c], np.float32))
                          .resize((width, height), _BILINEAR, box=box))
               for c in range(arr.shape[-1])]
      return np.stack(chans, axis=-1)
  return np.array(to_pil(image).resize((width, height), _BILINEAR, box=box))


def resize(image: ImageLike, height: int, width: int) -> np.ndarray:
  """Bilinear resize (PIL) to height x width, ignoring aspect ratio."""
  return _resize_box(image, height, width)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
  """Size an image is resized to before cropping back to height x width."""
  return int(round(height * scale)), int(round(width * scale))


def crop_box(src_h: int, src_w: int, height: int, width: int, scale: float,
              top: int, left: int) -> tuple[float, float, float, float]:
  """Region of the source that maps onto a crop at (top, left) of the scaled image."""
  sh, sw = scaled_size(height, width, scale)
  return (left * src_w / sw, top * src_h / sh,
          (left + width) * src_w / sw, (top + height) * src_h / sh)


def resize_random_crop(image: ImageLike, height: int, width: int,
                       rng: np.random.Generator, scale: float = 1.125) -> np.ndarray:
  """TriNet augmentation: resize to `scale` x (height, width), random crop to HxW.

  The crop offsets are uniform over all positions (top drawn first). The crop is
  computed as one PIL resize of the matching source region, so the resized image
  is never built; this equals resize-then-slice up to 2 intensity levels (PIL's
  fixed-point filter weights differ by the offset).
  """
  sh, sw = scaled_size(height, width, scale)
  if sh < height or sw < width:
    raise ValueError(f"scale {scale} gives {sh}x{sw}, smaller than {height}x{width}")
  top = int(rng.integers(0, sh - height + 1))
  left = int(rng.integers(0, sw - width + 1))
  image = _as_image(image)
  src_h, src_w = _image_size(image)
  box = crop_box(src_h, src_w, height, width, scale, top, left)
  return _resize_box(image, height, width, box)


def pad_crop(image: np.ndarray, rng: np.random.Generator, pad: int,
             fill: float = 0) -> np.ndarray:
  """Pads `pad` pixels of `fill` on every side, then crops the original size at random."""
  if pad <= 0:
    return np.array(image)
  h, w = image.shape[:2]
  top = int(rng.integers(0, 2 * pad + 1))
  left = int(rng.integers(0, 2 * pad + 1))
  padded = np.full((h + 2 * pad, w + 2 * pad) + image.shape[2:], fill, image.dtype)
  padded[pad:pad + h, pad:pad + w] = image
  return padded[top:top + h, left:left + w].copy()


def horizontal_flip(image: np.ndarray, rng: np.random.Generator,
                    prob: float = 0.5) -> np.ndarray:
  """Mirrors left-right with probability `prob` (one uniform draw, always made)."""
  if rng.random() < prob:
    return np.ascontiguousarray(image[:, ::-1])
  return np.array(image)


def _fill_values(fill: Fill, shape: tuple[int, ...], dtype: np.dtype,
                 rng: np.random.Generator) -> np.ndarray:
  """'random': uniform noise over the dtype's range (uint8 0..255, float [0, 1));
  otherwise the per-channel values in `fill`."""
  if isinstance(fill, str):
    if fill != "random":
      raise ValueError(f"fill must be 'random' or per-channel values, got {fill!r}")
    if np.dtype(dtype) == np.uint8:
      return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32).astype(dtype)
  return np.broadcast_to(np.asarray(fill, dtype), shape)


def erase_in_place(image: np.ndarray, rng: np.random.Generator, prob: float = 0.5,
                   area: tuple[float, float] = (0.02, 0.4),
                   aspect: tuple[float, float] = (0.3, 3.33),
                   fill: Fill = "random", max_attempts: int = 100) -> bool:
  """Random erasing on a writable array; returns whether a rectangle was erased.

  See `random_erasing`; this variant lets the pipeline erase inside its batch buffer.
  """
  if rng.random() >= prob:
    return False
  img_h, img_w = image.shape[:2]
  for _ in range(max_attempts):
    target = rng.uniform(area[0], area[1]) * img_h * img_w
    ratio = rng.uniform(aspect[0], aspect[1])
    h = int(round(math.sqrt(target * ratio)))
    w = int(round(math.sqrt(target / ratio)))
    if 0 < h < img_h and 0 < w < img_w:
      top = int(rng.integers(0, img_h - h + 1))
      left = int(rng.integers(0, img_w - w + 1))
      image[top:top + h, left:left + w] = _fill_values(
          fill, (h, w) + image.shape[2:], image.dtype, rng)
      return True
  return False


def random_erasing(image: np.ndarray, rng: np.random.Generator, prob: float = 0.5,
                   area: tuple[float, float] = (0.02, 0.4),
                   aspect: tuple[float, float] = (0.3, 3.33),
                   fill: Fill = "random", max_attempts: int = 100) -> np.ndarray:
  """Random erasing (Zhong et al., 2017), as in the authors' code.

  With probability `prob`, up to `max_attempts` times: draw an area fraction
  uniformly from `area` and an aspect ratio h/w uniformly from `aspect`; the first
  rectangle that fits strictly inside the image is placed uniformly and filled
  with `fill` ('random' noise, or per-channel values such as the dataset mean
  `IMAGENET_MEAN_UINT8`).
  """
  out = np.array(image)
  erase_in_place(out, rng, prob, area, aspect, fill, max_attempts)
  return out


def cutout_schedule(step: int, *, max_fraction: float = 0.5, ramp_steps: int = 10000,
                    start_step: int = 0) -> float:
  """Largest cut-out side, as a fraction of the image side, at training `step`.

  Grows linearly from 0 at `start_step` to `max_fraction` at
  `start_step + ramp_steps` and stays there (a curriculum: easy early, harder later).
  """
  if ramp_steps <= 0:
    return max_fraction if step >= start_step else 0.0
  t = (step - start_step) / ramp_steps
  return float(max_fraction * min(max(t, 0.0), 1.0))


def cutout_in_place(image: np.ndarray, rng: np.random.Generator, max_fraction: float,
                    prob: float = 1.0, num_rects: int = 1) -> int:
  """Progressive cut-out on a writable array; returns the number of rectangles cut.

  See `progressive_cutout`.
  """
  if rng.random() >= prob or max_fraction <= 0:
    return 0
  img_h, img_w = image.shape[:2]
  max_h = max(1, int(max_fraction * img_h))
  max_w = max(1, int(max_fraction * img_w))
  for _ in range(num_rects):
    h = int(rng.integers(1, max_h + 1))
    w = int(rng.integers(1, max_w + 1))
    top = int(rng.integers(0, img_h - h + 1))
    left = int(rng.integers(0, img_w - w + 1))
    image[top:top + h, left:left + w] = _fill_values(
        "random", (h, w) + image.shape[2:], image.dtype, rng)
  return num_rects


def progressive_cutout(image: np.ndarray, rng: np.random.Generator, step: int, *,
                       max_fraction: float = 0.5, ramp_steps: int = 10000,
                       start_step: int = 0, prob: float = 1.0,
                       num_rects: int = 1) -> np.ndarray:
  """Progressive cut-out ("Re-ID done right", Almazan et al., 2018).

  With probability `prob`, fills `num_rects` rectangles with random noise; each
  side is uniform in [1, s * side] where s = `cutout_schedule(step, ...)`, so the
  largest possible rectangle grows over training. Placed uniformly inside the image.
  """
  out = np.array(image)
  frac = cutout_schedule(step, max_fraction=max_fraction, ramp_steps=ramp_steps,
                         start_step=start_step)
  cutout_in_place(out, rng, frac, prob, num_rects)
  return out


def upscale_longer_side(image: ImageLike, target: int,
                        allow_downscale: bool = False) -> np.ndarray:
  """Aspect-preserving bilinear resize so that the longer side equals `target`.

  For variable-size inputs. Images whose longer side already exceeds `target` are
  returned unchanged unless `allow_downscale`. Sides are rounded to integers.
  """
  image = _as_image(image)
  h, w = _image_size(image)
  longer = max(h, w)
  if longer == target or (longer > target and not allow_downscale):
    return np.array(image)
  s = target / longer
  return _resize_box(image, max(1, int(round(h * s))), max(1, int(round(w * s))))


def resize_keep_aspect(image: ImageLike, height: int, width: int,
                       fill: Sequence[float] = IMAGENET_MEAN_UINT8) -> np.ndarray:
  """Fits the image inside HxW keeping its aspect ratio, centred, padded with `fill`.

  Lets variable-aspect images share one batch shape; the default fill (the ImageNet
  mean) becomes ~0 after `normalize`.
  """
  image = _as_image(image)
  h, w = _image_size(image)
  s = min(height / h, width / w)
  nh = min(height, max(1, int(round(h * s))))
  nw = min(width, max(1, int(round(w * s))))
  inner = _resize_box(image, nh, nw)
  out = np.empty((height, width, inner.shape[2]), inner.dtype)
  out[...] = np.asarray(fill, inner.dtype)
  top, left = (height - nh) // 2, (width - nw) // 2
  out[top:top + nh, left:left + nw] = inner
  return out


_LUT_CHUNK = 32768  # Pixels per table lookup: keeps input, indices and output in cache.


@functools.lru_cache(maxsize=8)
def _normalize_tables(mean: tuple[float, ...], std: tuple[float, ...]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(lut, channel offsets) with lut[256 c + v] == float32(v) / (255 std_c) - mean_c / std_c.

  The offsets, [0, 256, 512] repeated for `_LUT_CHUNK` pixels, turn interleaved
  uint8 values into table indices with one add.
  """
  m = np.asarray(mean, np.float32)
  s = np.asarray(std, np.float32)
  scale = (1.0 / (255.0 * s)).astype(np.float32)
  offset = (m / s).astype(np.float32)
  values = np.arange(256, dtype=np.float32)
  lut = np.concatenate([values * scale[c] - offset[c] for c in range(len(m))])
  chans = np.tile(np.arange(len(m), dtype=np.uint16) * 256, _LUT_CHUNK)
  return lut, chans


def normalize(images: Any, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD,
              out: np.ndarray | None = None) -> np.ndarray:
  """(x / 255 - mean) / std for uint8 images (or (x - mean) / std for floats in [0, 1]).

  One image or a batch ([..., C]); float32 result, written to `out` when given.
  uint8 inputs go through a lookup table (bit-identical to the float32
  multiply-subtract, ~3x faster). On an accelerator, prefer passing uint8 and
  computing `x * (1 / (255 std)) - mean / std` there.
  """
  x = np.asarray(images)
  if out is None:
    out = np.empty(x.shape, np.float32)
  if x.dtype != np.uint8:
    np.subtract(x, np.asarray(mean, np.float32), out=out, dtype=np.float32)
    out /= np.asarray(std, np.float32)
    return out
  lut, chans = _normalize_tables(tuple(float(v) for v in mean), tuple(float(v) for v in std))
  xf = x.reshape(-1)
  of = out.reshape(-1)
  step = len(chans)
  idx = np.empty(min(step, len(xf)), np.uint16)
  for start in range(0, len(xf), step):
    xs = xf[start:start + step]
    n = len(xs)
    np.add(xs, chans[:n], out=idx[:n], dtype=np.uint16)
    np.take(lut, idx[:n], out=of[start:start + n], mode="clip")
  return out


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation options (the pipeline's `augment=` argument).

  Applied in this order: resize (stretch, or `keep_aspect` fit-and-pad) to
  `resize_scale` x (H, W) and random crop back to (H, W); pad-and-crop;
  horizontal flip; random erasing; progressive cut-out. A step is disabled by its
  probability/size being 0 (`resize_scale=1` means plain resize).
  """
  resize_scale: float = 1.125
  keep_aspect: bool = False
  pad: int = 0
  flip_prob: float = 0.5
  erasing_prob: float = 0.0
  erasing_area: tuple[float, float] = (0.02, 0.4)
  erasing_aspect: tuple[float, float] = (0.3, 3.33)
  erasing_fill: Any = "random"  # 'random', 'mean' (ImageNet mean) or 3 values 0..255.
  cutout_prob: float = 0.0
  cutout_max_fraction: float = 0.5
  cutout_ramp_steps: int = 10000
  cutout_start_step: int = 0
  cutout_num_rects: int = 1

  @classmethod
  def from_options(cls, options: Mapping[str, Any] | AugmentConfig | None) -> AugmentConfig:
    """Builds a config from a dict or ConfigDict; unknown keys are an error (typos)."""
    if options is None:
      return cls()
    if isinstance(options, cls):
      return options
    if hasattr(options, "to_dict"):
      options = options.to_dict()
    options = dict(options)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
      raise ValueError(f"Unknown augment options {unknown}; known: {sorted(known)}")
    for key in ("erasing_area", "erasing_aspect"):
      if key in options:
        options[key] = tuple(float(v) for v in options[key])
    if isinstance(options.get("erasing_fill"), (list, tuple)):
      options["erasing_fill"] = tuple(float(v) for v in options["erasing_fill"])
    cfg = cls(**options)
    if cfg.resize_scale < 1:
      raise ValueError(f"resize_scale must be >= 1, got {cfg.resize_scale}")
    return cfg

  def erasing_fill_values(self) -> Fill:
    """The fill `random_erasing` expects for uint8 images."""
    if self.erasing_fill == "mean":
      return IMAGENET_MEAN_UINT8
    return self.erasing_fill


def eval_transform(image: ImageLike, height: int, width: int,
                   keep_aspect: bool = False, jpeg_draft: bool = True) -> np.ndarray:
  """Deterministic evaluation preprocessing: resize (or fit-and-pad) to HxW, uint8.

  `jpeg_draft`: decode encoded JPEGs at a reduced scale when they are at least
  twice the target size (see `to_pil`).
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    image = to_pil(image, (width, height) if jpeg_draft else None)
  if keep_aspect:
    return resize_keep_aspect(image, height, width)
  return resize(image, height, width)


def train_transform(image: ImageLike, rng: np.random.Generator, height: int,
                    width: int, cfg: AugmentConfig, step: int = 0,
                    out: np.ndarray | None = None,
                    jpeg_draft: bool = True) -> np.ndarray:
  """All training augmentations for one image; returns HxWx3 uint8.

  Same result and same generator draws as chaining `resize_random_crop` (or
  `resize`/`resize_keep_aspect` + crop), `pad_crop`, `horizontal_flip`,
  `random_erasing` and `progressive_cutout` with the options in `cfg`. Writes into
  `out` (a batch slot) when given. The geometry stays in PIL (one box resize, PIL
  flip), erasing works in place.
  """
  scale = cfg.resize_scale
  if cfg.keep_aspect:
    sh, sw = scaled_size(height, width, scale)
    arr = resize_keep_aspect(image, sh, sw)
    if scale != 1:
      top = int(rng.integers(0, sh - height + 1))
      left = int(rng.integers(0, sw - width + 1))
      arr = arr[top:top + height, left:left + width]
    im = Image.fromarray(np.ascontiguousarray(arr))
  else:
    im = to_pil(image)
    if scale != 1:
      sh, sw = scaled_size(height, width, scale)
      top = int(rng.integers(0, sh - height + 1))
      left = int(rng.integers(0, sw - width + 1))
      box = crop_box(im.height, im.width, height, width, scale, top, left)
      im = im.resize((width, height), _BILINEAR, box=box)
    else:
      im = im.resize((width, height), _BILINEAR)
  if cfg.pad > 0:
    arr = pad_crop(np.asarray(im), rng, cfg.pad)
    im = Image.fromarray(arr)
  # horizontal_flip always draws once.
  if rng.random() < cfg.flip_prob:
    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if out is None:
    out = np.empty((height, width, 3), np.uint8)
  out[...] = np.asarray(im)
  if cfg.erasing_prob > 0:
    erase_in_place(out, rng, cfg.erasing_prob, cfg.erasing_area, cfg.erasing_aspect,
                   cfg.erasing_fill_values())
  if cfg.cutout_prob > 0:
    frac = cutout_schedule(step, max_fraction=cfg.cutout_max_fraction,
                           ramp_steps=cfg.cutout_ramp_steps,
                           start_step=cfg.cutout_start_step)
    cutout_in_place(out, rng, frac, cfg.cutout_prob, cfg.cutout_num_rects)
  return out
