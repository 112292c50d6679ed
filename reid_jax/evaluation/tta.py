"""Test-time augmentation: views of an image batch whose embeddings get averaged.

Images are [..., H, W, C] (numpy or JAX arrays; all functions are traceable).
  * "flip": the image and its horizontal mirror (2 views).
  * "ten_crop": TriNet (Hermans et al. 2017): the four corner crops and the
    centre crop of size `out_hw` from a slightly larger image (TriNet: 256x128
    from 288x144), and their mirrors (10 views).
Whoever embeds images applies them: `tta_embed(embed_fn, images, "flip")`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from reid_jax.evaluation._checks import EvaluationError, check_choice

TTA_MODES = ("none", "flip", "ten_crop")


def flip(images: Any) -> Any:
  """Horizontal mirror of [..., H, W, C] images."""
  return images[..., ::-1, :]


def five_crops(images: Any, out_hw: tuple[int, int]) -> list[Any]:
  """[top-left, top-right, bottom-left, bottom-right, centre] crops of size out_hw."""
  h, w = images.shape[-3], images.shape[-2]
  ch, cw = int(out_hw[0]), int(out_hw[1])
  if ch > h or cw > w or ch < 1 or cw < 1:
    raise EvaluationError(f"crop size {(ch, cw)} does not fit in images of size {(h, w)}")
  top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
  corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (top, left)]
  return [images[..., y:y + ch, x:x + cw, :] for y, x in corners]


def ten_crops(images: Any, out_hw: tuple[int, int]) -> list[Any]:
  """TriNet's ten views: five crops, then their mirrors."""
  crops = five_crops(images, out_hw)
  return crops + [flip(c) for c in crops]


def views(images: Any, mode: str = "flip", out_hw: tuple[int, int] | None = None) -> list[Any]:
  """The TTA views of a batch for `mode` in ("none", "flip", "ten_crop")."""
  check_choice("mode", mode, TTA_MODES)
  if mode == "none":
    return [images]
  if mode == "flip":
    return [images, flip(images)]
  if out_hw is None:
    raise EvaluationError("ten_crop needs out_hw, the crop size (e.g. (256, 128))")
  return ten_crops(images, out_hw)


def tta_embed(embed_fn: Callable[[Any], Any], images: Any, mode: str = "flip",
              out_hw: tuple[int, int] | None = None) -> jnp.ndarray:
  """Mean of `embed_fn` over the TTA views of `images` (float32 [N, D])."""
  outs = [jnp.asarray(embed_fn(v), jnp.float32) for v in views(images, mode, out_hw)]
  return jnp.mean(jnp.stack(outs), axis=0)
