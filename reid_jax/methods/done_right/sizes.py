"""Input sizes of Re-ID done right: each image at its own, undistorted size.

An image is scaled (keeping its aspect ratio) so that its longer side equals
`longer_side` (416 in the paper), then each side is rounded to a multiple of
`multiple`, so that only a bounded set of shapes reaches the compiler. The short side is
never below `min_side` (the backbone's total stride): a thinner image is upscaled to it.
"""

from __future__ import annotations

import numpy as np


def round_to(x: float, multiple: int) -> int:
  """`x` rounded to the nearest positive multiple of `multiple`."""
  return max(multiple, int(round(x / multiple)) * multiple)


def lower_side(multiple: int, min_side: int) -> int:
  """The smallest side an image is fed at: the first multiple of `multiple` >= min_side."""
  return max(multiple, int(np.ceil(min_side / multiple)) * multiple)


def target_shape(height: int, width: int, longer_side: int, multiple: int,
                 min_side: int) -> tuple[int, int]:
  """(h, w) an image of `height` x `width` is fed at: longer side `longer_side`, aspect
  kept, both sides multiples of `multiple` and >= `min_side`."""
  if height <= 0 or width <= 0:
    raise ValueError(f"image of size {height}x{width}: both sides must be positive")
  s = longer_side / max(height, width)
  low = lower_side(multiple, min_side)
  h = max(round_to(height * s, multiple), low)
  w = max(round_to(width * s, multiple), low)
  return h, w


def distortion(height: int, width: int, shape: tuple[int, int]) -> float:
  """Relative change of the aspect ratio |(h'/w') / (h/w) - 1| caused by rounding."""
  return abs((shape[0] / shape[1]) / (height / width) - 1.0)


def shape_bound(longer_side: int, multiple: int, min_side: int) -> int:
  """The most distinct shapes `target_shape` can return for one configuration.

  The longer side is always round(longer_side); the shorter runs over the multiples
  between the lower bound and it, in portrait or landscape (the square counted once).
  """
  longer = round_to(longer_side, multiple)
  low = lower_side(multiple, min_side)
  if low > longer:
    return 1
  return 2 * ((longer - low) // multiple + 1) - 1
