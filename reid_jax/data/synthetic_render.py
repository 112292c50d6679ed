"""Procedural pedestrian renderer behind the `synthetic_reid` dataset (numpy + PIL only).

Identity is carried by shape, texture, layout and accessories (clothing pattern, logo,
sleeves, trousers/shorts/skirt, hair, hat, bag type and side, build); colours come from a
small shared palette and every camera adds a strong colour cast, so colour alone is only
partly informative. All randomness is drawn from `np.random.default_rng([seed, tag, ...])`
streams keyed by what is being drawn, and pixels are computed with exact float arithmetic
(no per-pixel transcendental functions), so every image is a pure function of
(config, spec): the same bytes on every run and independent of rendering order.

Person frame: `v` runs from the top of the head (0) to the soles (1); `u` is horizontal
in the same unit, 0 on the body axis. Side views are drawn facing +u and mirrored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:
  from reid_jax.data.synthetic import SyntheticReidConfig

NUM_CAMERAS = 6

# Seed-stream tags: one independent random stream per kind of thing drawn.
TAG_PERSON, TAG_CAMERA, TAG_TRACK, TAG_IMAGE, TAG_PLAN = 1, 2, 3, 4, 5
TAG_SIZE = 6  # image sizes; only drawn when `size_jitter` or `aspect_range` is set

# Smallest height or width a varied image size is drawn at.
MIN_SIDE = 8

# Kinds of rendered image (see `ImageSpec`).
KIND_NORMAL, KIND_DISTRACTOR, KIND_JUNK = 0, 1, 2

# Views of a tracklet.
FRONT, BACK, SIDE = 0, 1, 2

# Clothing palette, most distinct first; `palette_size` takes a prefix, so smaller
# palettes make more identities share colours.
PALETTE = np.array([
    (28, 28, 32),  # black
    (228, 228, 222),  # white
    (185, 32, 38),  # red
    (38, 72, 170),  # blue
    (128, 128, 124),  # grey
    (38, 128, 58),  # green
    (222, 190, 40),  # yellow
    (118, 72, 40),  # brown
    (222, 128, 160),  # pink
    (108, 48, 138),  # purple
    (232, 118, 28),  # orange
    (22, 38, 82),  # navy
    (70, 170, 180),  # teal
    (190, 170, 130),  # beige
], np.float32) / 255.0
HAIR_COLOURS = np.array(
    [(20, 18, 16), (105, 62, 30), (215, 180, 105), (185, 185, 180)], np.float32) / 255.0
SKIN_TONES = np.array(
    [(238, 200, 170), (205, 160, 120), (160, 110, 75), (100, 68, 48)], np.float32) / 255.0

# Upper-body patterns. LOGO and JACKET are visible from the front only.
UPPER_PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo", "jacket", "yoke")
_UPPER_PATTERN_P = np.array([0.16, 0.15, 0.13, 0.13, 0.15, 0.14, 0.14])
LOGO_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
LOWER_TYPES = ("trousers", "shorts", "skirt")
HATS = ("none", "cap", "beanie")
BAGS = ("none", "backpack", "shoulder", "handbag")


@dataclasses.dataclass(frozen=True, eq=False)
class Person:
  """Appearance of one identity (fixed across cameras)."""

  skin: np.ndarray
  hair: np.ndarray
  hair_long: bool
  build: float  # torso width multiplier
  hip: float  # v of the hip line (leg length)
  upper: np.ndarray
  upper2: np.ndarray  # secondary colour for stripes/checks/logo/jacket/yoke
  upper_pattern: int
  stripe_freq: float  # stripes per torso height (or width)
  logo_shape: int
  long_sleeves: bool
  lower: np.ndarray
  lower2: np.ndarray
  lower_type: int
  lower_stripe: bool  # tracksuit stripe down the outside of each leg
  shoes: np.ndarray
  hat: int
  hat_colour: np.ndarray
  bag: int
  bag_colour: np.ndarray
  bag_side: int  # +1: the person's right, -1: left


@dataclasses.dataclass(frozen=True, eq=False)
class Camera:
  """Fixed properties of one of the 6 cameras."""

  lut: np.ndarray  # (3, 256) uint8 colour cast / brightness / gamma per channel
  blur: float  # Gaussian blur radius in pixels at 128 px image height
  noise: float  # noise std in [0, 1] units
  view_p: np.ndarray  # (3,) probabilities of FRONT / BACK / SIDE tracklets
  scale: float  # person height / image height
  wall: np.ndarray
  floor: np.ndarray
  horizon: float  # floor line, fraction of image height
  fixtures: np.ndarray  # (n, 7): x0, x1, y0, y1 (fractions), rgb


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """One image to render: who, where, which image of the tracklet, and what kind."""

  person_id: int  # label written to the record (0 distractor, -1 junk)
  appearance: int  # which `Person` is drawn
  camera_id: int
  index: int  # image index within (appearance, camera) tracklet
  kind: int = KIND_NORMAL


def rng_for(cfg: SyntheticReidConfig, *key: int) -> np.random.Generator:
  """Independent random stream for `key` (a tag and indices, all >= 0) under the seed."""
  return np.random.default_rng([cfg.seed, *key])


def _muted(colour: np.ndarray, amount: float) -> np.ndarray:
  """Mixes a colour towards mid grey (amount 1 = grey)."""
  return (colour + amount * (0.5 - colour)).astype(np.float32)


def sample_person(cfg: SyntheticReidConfig, appearance: int) -> Person:
  """Draws the appearance of identity `appearance` (deterministic in the config seed)."""
  r = rng_for(cfg, TAG_PERSON, appearance)
  k = int(np.clip(cfg.palette_size, 2, len(PALETTE)))

  def colour(exclude: int | None = None) -> tuple[int, np.ndarray]:
    i = int(r.integers(k - (exclude is not None)))
    if exclude is not None and i >= exclude:
      i += 1
    c = PALETTE[i] + cfg.colour_jitter * r.standard_normal(3)
    return i, np.clip(c, 0.0, 1.0).astype(np.float32)

  ui, upper = colour()
  _, upper2 = colour(exclude=ui)
  li, lower = colour()
  _, lower2 = colour(exclude=li)
  _, shoes = colour()
  _, hat_colour = colour()
  _, bag_colour = colour()
  return Person(
      skin=SKIN_TONES[r.integers(len(SKIN_TONES))],
      hair=HAIR_COLOURS[r.integers(len(HAIR_COLOURS))],
      hair_long=bool(r.random() < 0.35),
      build=float(r.choice([0.82, 1.0, 1.2])),
      hip=float(r.uniform(0.5, 0.55)),
      upper=upper,
      upper2=upper2,
      upper_pattern=int(r.choice(len(UPPER_PATTERNS), p=_UPPER_PATTERN_P)),
      stripe_freq=float(r.choice([2.5, 4.0])),
      logo_shape=int(r.integers(len(LOGO_SHAPES))),
      long_sleeves=bool(r.random() < 0.5),
      lower=lower,
      lower2=lower2,
      lower_type=int(r.choice(3, p=[0.6, 0.22, 0.18])),
      lower_stripe=bool(r.random() < 0.25),
      shoes=shoes,
      hat=int(r.choice(3, p=[0.5, 0.25, 0.25])),
      hat_colour=hat_colour,
      bag=int(r.choice(4, p=[0.28, 0.26, 0.26, 0.2])),
      bag_colour=bag_colour,
      bag_side=int(r.choice([-1, 1])),
  )


def sample_camera(cfg: SyntheticReidConfig, camera_id: int) -> Camera:
  """Draws camera `camera_id`: colour cast, blur, noise, viewpoint bias, scene."""
  r = rng_for(cfg, TAG_CAMERA, camera_id)
  gains = 1.0 + cfg.cast_strength * r.uniform(-1.0, 1.0, 3)
  offsets = cfg.cast_offset * r.uniform(-1.0, 1.0, 3)
  bright = 1.0 + cfg.brightness_jitter * r.uniform(-1.0, 1.0)
  gamma = math.exp(cfg.gamma_jitter * r.uniform(-1.0, 1.0))
  # Scalar libm maths (not numpy's SIMD kernels) so the table is the same on every CPU.
  curve = [math.pow(i / 255.0, gamma) * bright for i in range(256)]
  lut = np.array([[min(max(round(255.0 * (c * g + o)), 0), 255) for c in curve]
                  for g, o in zip(gains.tolist(), offsets.tolist())], np.uint8)
  view_p = np.full(3, (1.0 - cfg.view_bias) / 3.0)
  view_p[camera_id % 3] += cfg.view_bias  # each camera mostly sees one direction
  fixtures = []
  for _ in range(int(r.integers(1, 4))):
    vertical = r.random() < 0.5
    c = _muted(PALETTE[r.integers(len(PALETTE))], cfg.background_muting)
    if vertical:
      x0 = r.uniform(-0.2, 1.0)
      box = (x0, x0 + r.uniform(0.08, 0.3), r.uniform(-0.1, 0.4), 1.1)
    else:
      y0 = r.uniform(0.0, 0.8)
      box = (-0.1, 1.1, y0, y0 + r.uniform(0.04, 0.15))
    fixtures.append((*box, *c))
  return Camera(
      lut=lut,
      blur=float(r.uniform(cfg.blur_min, cfg.blur_max)),
      noise=float(r.uniform(0.3, 1.0) * cfg.noise),
      view_p=view_p,
      scale=float(r.uniform(0.8, 0.92)),
      wall=_muted(PALETTE[r.integers(len(PALETTE))], cfg.background_muting) * r.uniform(0.8, 1.1),
      floor=_muted(PALETTE[r.integers(len(PALETTE))], cfg.background_muting) * r.uniform(0.6, 0.9),
      horizon=float(r.uniform(0.55, 0.85)),
      fixtures=np.asarray(fixtures, np.float32),
  )


class _Canvas:
  """An image with the person frame mapped onto its pixels; shapes are painted with
  one-pixel anti-aliased edges from approximate signed distances, inside bounding boxes."""

  def __init__(self, img: np.ndarray, cx: float, top: float, scale: float, mirror: float):
    self.img = img
    self.h, self.w = img.shape[:2]
    self.cx, self.top, self.s, self.mirror = cx, top, scale, mirror
    self.inv = np.float32(1.0 / scale)

  def region(self, u0: float, u1: float, v0: float, v1: float):
    """Pixel slice covering the person-frame box, plus its u, v coordinates (or None)."""
    xa, xb = sorted((self.cx + self.mirror * u0 * self.s, self.cx + self.mirror * u1 * self.s))
    x0, x1 = max(int(np.floor(xa)) - 1, 0), min(int(np.ceil(xb)) + 1, self.w)
    y0 = max(int(np.floor(self.top + v0 * self.s)) - 1, 0)
    y1 = min(int(np.ceil(self.top + v1 * self.s)) + 1, self.h)
    if x1 <= x0 or y1 <= y0:
      return None
    xs = (np.arange(x0, x1, dtype=np.float32) + 0.5 - self.cx) * (self.inv * self.mirror)
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5 - self.top) * self.inv
    u = np.broadcast_to(xs[None, :], (y1 - y0, x1 - x0))
    v = np.broadcast_to(ys[:, None], (y1 - y0, x1 - x0))
    return (slice(y0, y1), slice(x0, x1)), u, v

  def cover(self, sd: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] from a signed distance in person units (inside > 0)."""
    return np.clip(sd * self.s + 0.5, 0.0, 1.0)

  def paint(self, sl, cover: np.ndarray, colour: np.ndarray) -> None:
    patch = self.img[sl]
    patch += cover[..., None] * (colour - patch)

  # Shapes: each returns (slice, u, v, coverage) or None when off-image.
  def ellipse(self, cu: float, cv: float, ru: float, rv: float):
    reg = self.region(cu - ru, cu + ru, cv - rv, cv + rv)
    if reg is None:
      return None
    sl, u, v = reg
    d = np.sqrt(((u - cu) / ru)**2 + ((v - cv) / rv)**2)
    return sl, u, v, self.cover((1.0 - d) * min(ru, rv))

  def capsule(self, a: tuple[float, float], b: tuple[float, float], r: float):
    reg = self.region(min(a[0], b[0]) - r, max(a[0], b[0]) + r, min(a[1], b[1]) - r, max(a[1], b[1]) + r)
    if reg is None:
      return None
    sl, u, v = reg
    du, dv = b[0] - a[0], b[1] - a[1]
    t = np.clip(((u - a[0]) * du + (v - a[1]) * dv) / max(du * du + dv * dv, 1e-9), 0.0, 1.0)
    d = np.sqrt((u - a[0] - t * du)**2 + (v - a[1] - t * dv)**2)
    return sl, u, v, self.cover(r - d)

  def trapezoid(self, cu: float, v0: float, v1: float, w0: float, w1: float):
    """Horizontal trapezoid: half-width w0 at v0, w1 at v1."""
    reg = self.region(cu - max(w0, w1), cu + max(w0, w1), v0, v1)
    if reg is None:
      return None
    sl, u, v = reg
    half = w0 + (w1 - w0) * np.clip((v - v0) / (v1 - v0), 0.0, 1.0)
    sd = np.minimum(np.minimum(half - np.abs(u - cu), v - v0), v1 - v)
    return sl, u, v, self.cover(sd)

  def box(self, u0: float, u1: float, v0: float, v1: float):
    return self.trapezoid((u0 + u1) / 2, v0, v1, (u1 - u0) / 2, (u1 - u0) / 2)

  def fill(self, shape, colour: np.ndarray) -> None:
    if shape is not None:
      self.paint(shape[0], shape[3], colour)


def _stripes(t: np.ndarray, period: float, px: float) -> np.ndarray:
  """Anti-aliased 50% stripes along coordinate `t` (person units); px = one pixel."""
  tri = np.abs(np.mod(t / period, 1.0) - 0.5)
  return np.clip((0.25 - tri) * (period / px) + 0.5, 0.0, 1.0)


def _logo(shape: int, lu: np.ndarray, lv: np.ndarray, radius: float) -> np.ndarray:
  """Signed distance (person units) of a logo centred at 0 with the given radius."""
  au, av = np.abs(lu), np.abs(lv)
  if LOGO_SHAPES[shape] == "circle":
    sd = 1.0 - np.sqrt(lu * lu + lv * lv)
  elif LOGO_SHAPES[shape] == "square":
    sd = 0.8 - np.maximum(au, av)
  elif LOGO_SHAPES[shape] == "triangle":
    sd = np.minimum(0.6 - lv, (lv + 1.0 - 1.8 * au) * 0.5)
  elif LOGO_SHAPES[shape] == "diamond":
    sd = (1.1 - au - av) * 0.7
  else:  # cross
    sd = np.maximum(np.minimum(0.33 - au, 1.0 - av), np.minimum(0.33 - av, 1.0 - au))
  return sd * radius


def _draw_person(cv: _Canvas, p: Person, view: int, phase: float) -> None:
  """Paints the person; for SIDE views the canvas is mirrored so the person faces +u."""
  side = view == SIDE
  hip = p.hip
  shoulder_v = 0.16
  ws = (0.068 if side else 0.112) * p.build  # torso half-width at shoulders
  ww = (0.064 if side else 0.088) * p.build  # and at the hips
  # Bag side in image-u: the person's right is at -u seen from the front, +u from the
  # back; from the side (facing +u) the near side is the person's right.
  bag_u = {FRONT: -p.bag_side, BACK: p.bag_side, SIDE: 0}[view]
  bag_near = p.bag_side == 1  # only meaningful for SIDE

  # Backpack behind the body in side view.
  if p.bag == 1 and side:
    cv.fill(cv.trapezoid(-ws - 0.045, 0.2, hip - 0.06, 0.055, 0.06), p.bag_colour)
    cv.fill(cv.box(-ws - 0.1, -ws - 0.085, 0.24, hip - 0.1), p.bag_colour * 0.7)

  # Far arm (side view) behind the torso.
  hand_far = (-0.09 * phase, hip - 0.01)
  if side:
    cv.fill(cv.capsule((0.0, shoulder_v + 0.02), hand_far, 0.026), p.upper * 0.75)

  # Legs and lower clothing.
  if side:
    feet = ((0.12 * phase, 0.965), (-0.12 * phase, 0.965))
    hips = ((0.0, hip + 0.02), (0.0, hip + 0.02))
  else:
    spread = 0.012 * phase
    feet = ((-0.05 - spread, 0.965), (0.05 - spread, 0.965))
    hips = ((-0.042, hip + 0.02), (0.042, hip + 0.02))
  leg_r = 0.036 * (0.85 + 0.15 * p.build)
  lower_type = LOWER_TYPES[p.lower_type]
  leg_colour = p.lower if lower_type == "trousers" else p.skin
  for k, (a, b) in enumerate(zip(hips, feet)):
    shade = 0.82 if (side and k == 1) else 1.0
    leg = cv.capsule(a, b, leg_r if lower_type == "trousers" else leg_r * 0.8)
    cv.fill(leg, leg_colour * shade)
    if lower_type == "shorts":
      knee = (a[0] + 0.42 * (b[0] - a[0]), a[1] + 0.42 * (b[1] - a[1]))
      cv.fill(cv.capsule(a, knee, leg_r * 1.05), p.lower * shade)
    if p.lower_stripe and lower_type != "skirt":
      out = 1.0 if side else np.sign(a[0])
      end = b if lower_type == "trousers" else (a[0] + 0.42 * (b[0] - a[0]), a[1] + 0.42 * (b[1] - a[1]))
      off = out * leg_r * 0.55
      cv.fill(cv.capsule((a[0] + off, a[1]), (end[0] + off, end[1] - 0.01), leg_r * 0.28), p.lower2 * shade)
    cv.fill(cv.ellipse(b[0] + (0.025 if side else 0.0), 0.975, 0.045 if side else 0.034, 0.024), p.shoes * shade)
  if lower_type == "skirt":
    cv.fill(cv.trapezoid(0.0, hip - 0.03, hip + 0.21, ww + 0.005, ww + 0.05), p.lower)
  else:
    cv.fill(cv.trapezoid(0.0, hip - 0.03, hip + 0.06, ww + 0.004, ww + 0.004), p.lower)

  # Torso with its pattern.
  torso = cv.trapezoid(0.0, shoulder_v, hip + 0.005, ws, ww)
  if torso is not None:
    sl, u, v, cov = torso
    tv = (v - shoulder_v) / (hip - shoulder_v)  # 0 at shoulders, 1 at hips
    px = cv.inv / (hip - shoulder_v)  # one pixel in tv units
    pattern = UPPER_PATTERNS[p.upper_pattern]
    mix = None
    if pattern == "hstripes":
      mix = _stripes(tv, 1.0 / p.stripe_freq, px)
    elif pattern == "vstripes":
      mix = _stripes(u / (2 * ws) + 0.5, 1.0 / p.stripe_freq, cv.inv / (2 * ws))
    elif pattern == "checks":
      period = (hip - shoulder_v) / (p.stripe_freq + 1.0)  # square checks, person units
      mix = np.abs(_stripes(v - shoulder_v, period, cv.inv) - _stripes(u, period, cv.inv))
    elif pattern == "logo" and view == FRONT:
      rad = 0.55 * ws
      sd = _logo(p.logo_shape, u / rad, (v - (shoulder_v + 0.36 * (hip - shoulder_v))) / rad, rad)
      mix = cv.cover(sd)
    elif pattern == "jacket" and view == FRONT:
      mix = cv.cover(0.26 * ws - np.abs(u))
    elif pattern == "yoke":
      mix = cv.cover(0.3 - tv)
    colour = p.upper if mix is None else p.upper + mix[..., None] * (p.upper2 - p.upper)
    cv.paint(sl, cov, colour)

  # Backpack on the back / its straps on the front.
  if p.bag == 1 and view == BACK:
    bw = 0.085 * p.build
    cv.fill(cv.trapezoid(0.0, 0.19, hip - 0.06, bw, bw + 0.01), p.bag_colour)
    cv.fill(cv.box(-bw + 0.015, bw - 0.015, hip - 0.19, hip - 0.12), p.bag_colour * 0.72)
  elif p.bag == 1 and view == FRONT:
    for su in (-1, 1):
      cv.fill(cv.capsule((su * 0.6 * ws, shoulder_v), (su * 0.55 * ws, 0.36), 0.014), p.bag_colour)
  elif p.bag == 1 and side:
    cv.fill(cv.capsule((-0.2 * ws, shoulder_v + 0.005), (-0.35 * ws, 0.35), 0.012), p.bag_colour)

  # Shoulder-bag strap across the chest/back (before the arms).
  if p.bag == 2:
    if side:
      cv.fill(cv.capsule((-0.3 * ws, shoulder_v), (0.5 * ws, hip - 0.03), 0.011), p.bag_colour * 0.85)
    else:
      cv.fill(cv.capsule((-bag_u * 0.75 * ws, shoulder_v + 0.005), (bag_u * 0.9 * ws, hip - 0.04), 0.012), p.bag_colour * 0.85)

  # Arms.
  sleeve = p.upper * 0.92
  if side:
    arms = [((0.0, shoulder_v + 0.02), (0.09 * phase, hip - 0.01))]
  else:
    arms = [((su * (ws - 0.012), shoulder_v + 0.025), (su * (ws + 0.018), hip - 0.01)) for su in (-1, 1)]
  for a, b in arms:
    if p.long_sleeves:
      cv.fill(cv.capsule(a, b, 0.026), sleeve)
    else:
      elbow = (a[0] + 0.4 * (b[0] - a[0]), a[1] + 0.4 * (b[1] - a[1]))
      cv.fill(cv.capsule(elbow, b, 0.021), p.skin)
      cv.fill(cv.capsule(a, elbow, 0.029), sleeve)
    cv.fill(cv.ellipse(b[0], b[1] + 0.012, 0.022, 0.026), p.skin)

  # Shoulder bag / handbag hanging at the side.
  if p.bag in (2, 3):
    if side:
      bu = 0.02 if bag_near else -0.06
      colour = p.bag_colour if bag_near else p.bag_colour * 0.7
    else:
      bu = bag_u * (ws + 0.035)
      colour = p.bag_colour
    if p.bag == 2:
      cv.fill(cv.box(bu - 0.065, bu + 0.065, hip - 0.09, hip + 0.04), colour)
      cv.fill(cv.box(bu - 0.065, bu + 0.065, hip - 0.09, hip - 0.055), colour * 0.75)
    else:
      hu = (0.09 * phase if bag_near else -0.09 * phase) if side else bag_u * (ws + 0.022)
      cv.fill(cv.capsule((hu - 0.02, hip + 0.005), (hu + 0.02, hip + 0.005), 0.006), colour * 0.7)
      cv.fill(cv.trapezoid(hu, hip + 0.01, hip + 0.11, 0.045, 0.06), colour)

  # Neck, long hair behind the head, head, hair, hat.
  cv.fill(cv.box(-0.024, 0.024, 0.11, shoulder_v + 0.01), p.skin * 0.9)
  if p.hair_long and view == FRONT:
    cv.fill(cv.trapezoid(0.0, 0.04, 0.24, 0.06, 0.075), p.hair * 0.85)
  head_u = 0.008 if side else 0.0
  cv.fill(cv.ellipse(head_u, 0.075, 0.05 if not side else 0.052, 0.066), p.skin)
  if view == BACK:
    cv.fill(cv.ellipse(0.0, 0.07, 0.054, 0.07), p.hair)
    if p.hair_long:
      cv.fill(cv.trapezoid(0.0, 0.06, 0.26, 0.056, 0.078), p.hair)
  elif view == FRONT:
    cap = cv.ellipse(0.0, 0.055, 0.055, 0.05)
    if cap is not None:
      sl, u, v, cov = cap
      cv.paint(sl, cov * cv.cover(0.035 - v + 0.02 * np.abs(u) / 0.055), p.hair)
  else:
    cv.fill(cv.ellipse(-0.018, 0.065, 0.042, 0.06), p.hair)
    if p.hair_long:
      cv.fill(cv.trapezoid(-0.035, 0.06, 0.25, 0.03, 0.04), p.hair)
  if HATS[p.hat] == "cap":
    dome = cv.ellipse(0.0, 0.045, 0.057, 0.042)
    if dome is not None:
      sl, u, v, cov = dome
      cv.paint(sl, cov * cv.cover(0.045 - v), p.hat_colour)
    if view == FRONT:
      cv.fill(cv.ellipse(0.0, 0.045, 0.06, 0.012), p.hat_colour * 0.8)
    elif side:
      cv.fill(cv.box(0.02, 0.1, 0.037, 0.05), p.hat_colour * 0.8)
  elif HATS[p.hat] == "beanie":
    dome = cv.ellipse(0.0, 0.05, 0.058, 0.055)
    if dome is not None:
      sl, u, v, cov = dome
      cv.paint(sl, cov * cv.cover(0.055 - v), p.hat_colour)
    cv.fill(cv.box(-0.058, 0.058, 0.04, 0.058), p.hat_colour * 0.78)


def _background(cfg: SyntheticReidConfig, cam: Camera, r: np.random.Generator, h: int, w: int) -> np.ndarray:
  """Camera scene (wall, floor, fixtures) shifted per image, plus random clutter."""
  img = np.empty((h, w, 3), np.float32)
  shift_x, shift_y = r.uniform(-0.5, 0.5), r.uniform(-0.06, 0.06)
  horizon = int(round((cam.horizon + shift_y) * h))
  img[:horizon] = cam.wall
  img[horizon:] = cam.floor
  for x0, x1, y0, y1, *c in cam.fixtures:
    xa, xb = int(round((x0 + shift_x) * w)), int(round((x1 + shift_x) * w))
    ya, yb = int(round((y0 + shift_y) * h)), int(round((y1 + shift_y) * h))
    img[max(ya, 0):max(yb, 0), max(xa, 0):max(xb, 0)] = c
  for _ in range(int(r.poisson(cfg.clutter))):
    c = _muted(PALETTE[r.integers(cfg.palette_size)], r.uniform(0.0, cfg.clutter_muting))
    bh, bw = r.uniform(0.05, 0.35) * h, r.uniform(0.08, 0.5) * w
    y0, x0 = r.uniform(-0.1, 1.0) * h, r.uniform(-0.2, 1.0) * w
    img[max(int(y0), 0):max(int(y0 + bh), 0), max(int(x0), 0):max(int(x0 + bw), 0)] = c
  # Low-frequency illumination variation.
  shade = r.uniform(0.75, 1.15, (3, 2)).astype(np.float32)
  shade_img = np.asarray(Image.fromarray(shade, mode="F").resize((w, h), Image.BILINEAR))
  return img * shade_img[..., None]


def _occluder(cfg: SyntheticReidConfig, img: np.ndarray, r: np.random.Generator, heavy: bool) -> None:
  """Paints something in front of the person: a passer-by at a side, an object at the
  bottom, or a pole. `heavy` (junk images) covers most of the person."""
  h, w = img.shape[:2]
  c = _muted(PALETTE[r.integers(len(PALETTE))], r.uniform(0.0, 0.4))
  c2 = _muted(PALETTE[r.integers(len(PALETTE))], r.uniform(0.0, 0.4))
  kind = int(r.integers(3))
  if heavy:
    frac = r.uniform(0.55, 0.8)
    if kind == 0:
      y0 = int((1 - frac) * h)
      img[y0:] = c
      img[y0:y0 + max(h // 16, 1)] = c2
    elif kind == 1:
      x1 = int(frac * w)
      img[:, :x1] = c
      img[: h // 3, : x1 // 2] = c2
    else:
      x0 = int((1 - frac) * w)
      img[:, x0:] = c
      img[h // 3:, x0 + (w - x0) // 2:] = c2
    return
  if kind == 0:  # passer-by at the left or right edge
    width = int(r.uniform(0.18, 0.38) * w)
    y0 = int(r.uniform(0.0, 0.3) * h)
    mid = y0 + int(r.uniform(0.3, 0.45) * h)
    sl = slice(0, width) if r.random() < 0.5 else slice(w - width, w)
    img[y0:mid, sl] = c
    img[mid:, sl] = c2
  elif kind == 1:  # bench, bike, car... at the bottom
    y0 = int(r.uniform(0.62, 0.82) * h)
    x0, x1 = sorted((int(r.uniform(-0.3, 0.5) * w), int(r.uniform(0.5, 1.3) * w)))
    img[y0:, max(x0, 0):x1] = c
    img[y0:y0 + max(h // 20, 1), max(x0, 0):x1] = c2
  else:  # pole
    x0 = int(r.uniform(0.1, 0.8) * w)
    img[:, x0:x0 + max(int(r.uniform(0.07, 0.16) * w), 1)] = c


def track_view(cfg: SyntheticReidConfig, appearance: int, camera_id: int, cam: Camera) -> tuple[int, float]:
  """Viewpoint and walking direction of identity `appearance` passing camera `camera_id`."""
  r = rng_for(cfg, TAG_TRACK, appearance, camera_id)
  view = int(r.choice(3, p=cam.view_p))
  return view, float(r.choice([-1.0, 1.0]))


_CACHE: dict[tuple, Person | Camera] = {}


def _cached(fn, cfg: SyntheticReidConfig, index: int) -> Person | Camera:
  """`fn(cfg, index)`, memoised on the values of all the config's fields (so an edited
  config never gets stale people or cameras); splits list images person by person."""
  knobs = tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg))
  key = (fn.__name__, tuple(k for k in knobs if isinstance(k, (int, float, str, tuple))), index)
  hit = _CACHE.get(key)
  if hit is None:
    if len(_CACHE) >= 1024:
      _CACHE.clear()
    hit = _CACHE[key] = fn(cfg, index)
  return hit


def image_size(cfg: SyntheticReidConfig, spec: ImageSpec) -> tuple[int, int]:
  """(height, width) of one image, deterministic in (cfg, spec).

  `cfg.height` x `cfg.width` unless the config varies sizes: the height is
  `cfg.height * (1 + size_jitter * u)` with u uniform in [-1, 1], the width that height
  times a width/height ratio uniform in `aspect_range` (default: the config's own
  ratio), both rounded and at least `MIN_SIDE`. The draws come from their own stream
  (`TAG_SIZE`), so the other draws of an image do not change, and with both knobs off
  nothing is drawn at all: fixed-size configs render exactly as before.
  """
  if not cfg.size_jitter and cfg.aspect_range is None:
    return cfg.height, cfg.width
  r = rng_for(cfg, TAG_SIZE, spec.appearance, spec.camera_id, spec.index, spec.kind)
  u, t = r.uniform(-1.0, 1.0), r.uniform(0.0, 1.0)
  h = cfg.height * (1.0 + cfg.size_jitter * u)
  lo, hi = cfg.aspect_range or (cfg.width / cfg.height,) * 2
  return max(int(round(h)), MIN_SIDE), max(int(round(h * (lo + (hi - lo) * t))), MIN_SIDE)


def render(cfg: SyntheticReidConfig, spec: ImageSpec) -> np.ndarray:
  """Renders one image (uint8, `image_size(cfg, spec)` x 3); deterministic in (cfg, spec).

  The scene and person are drawn at that size (the person scaled to the height), not
  stretched afterwards.
  """
  h, w = image_size(cfg, spec)
  person = _cached(sample_person, cfg, spec.appearance)
  cam = _cached(sample_camera, cfg, spec.camera_id)
  view, facing = track_view(cfg, spec.appearance, spec.camera_id, cam)
  t = rng_for(cfg, TAG_TRACK, spec.appearance, spec.camera_id, 1)  # tracklet-level placement
  base_dx, base_scale = t.uniform(-1.0, 1.0) * cfg.crop_jitter, t.uniform(-0.5, 0.5) * cfg.scale_jitter
  r = rng_for(cfg, TAG_IMAGE, spec.appearance, spec.camera_id, spec.index, spec.kind)

  img = _background(cfg, cam, r, h, w)
  scale = h * cam.scale * (1.0 + base_scale + 0.5 * cfg.scale_jitter * r.uniform(-1.0, 1.0))
  cx = w * (0.5 + base_dx + 0.5 * cfg.crop_jitter * r.uniform(-1.0, 1.0))
  top = (h - scale) * (0.5 + r.uniform(-1.0, 1.0) * 2 * cfg.crop_jitter)
  if spec.kind == KIND_DISTRACTOR and r.random() < 0.5:  # bad detection: part of a person
    scale *= r.uniform(1.3, 2.0)
    cx += r.choice([-1, 1]) * r.uniform(0.15, 0.4) * w
    top -= r.uniform(0.0, 0.6) * scale
  mirror = facing if view == SIDE else 1.0
  canvas = _Canvas(img, cx, top, scale, mirror)
  _draw_person(canvas, person, view, float(r.uniform(-1.0, 1.0)))
  if spec.kind == KIND_JUNK:
    _occluder(cfg, img, r, heavy=True)
  elif r.random() < cfg.occlusion_prob:
    _occluder(cfg, img, r, heavy=False)

  out = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
  out = np.stack([cam.lut[c][out[..., c]] for c in range(3)], axis=-1)
  radius = cam.blur * (h / 128.0) * r.uniform(0.7, 1.3)
  if radius > 0.05:
    out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius)))
  if cam.noise > 0:
    noise = r.standard_normal((h, w, 3), dtype=np.float32) * np.float32(cam.noise * 255.0)
    out = np.clip(np.round(out.astype(np.float32) + noise), 0, 255).astype(np.uint8)
  return out
