"""Baselines on `synthetic_reid`: how far colour, texture and untrained features get.

Prints one table row per (features, distance) on the query/gallery splits with the
Market-1501 protocol (same id + same camera and person_id -1 are ignored, 0 is a negative):

  colour histograms    joint 8x8x8 RGB or HSV histograms, whole image, 2 body halves or
                       6 horizontal stripes; chi-square or Hellinger (Bhattacharyya) distance.
  colour+HOG           HSV stripes + HOG-like gradient histograms (untrained, hand-crafted).
  colour+HOG + LDA     the same features with a linear metric (PCA + LDA) fit on `train`:
                       a cheap check that identity is learnable from the training split.
  random CNN           global-average-pooled features of a randomly initialised conv net
                       (a plain 8-layer one), and the stage-4 and fused embeddings of the
                       README main job's model (`configs/dare.py:synthetic`) at init.
  trained              optional (--train_steps > 0): the project's `resnet_small` + TriNet
                       head trained on `train` with batch-hard soft-margin triplet loss on
                       batches of 18 identities x 4 images, as the synthetic config does.

Each feature extractor is a function `images uint8 (N, H, W, 3) -> features (N, D)` listed
in `EXTRACTORS`; swap in another (e.g. the project's model) there.

  python benchmarks/synthetic_baselines.py                      # tfds default config
  python benchmarks/synthetic_baselines.py --config=tiny
  python benchmarks/synthetic_baselines.py --set palette_size=6 --set noise=0.06
  python benchmarks/synthetic_baselines.py --train_steps=1500 --train_size=64x32

`--set` renders the splits in memory with modified knobs (nothing is written); without it
the prepared tfds dataset is read (and prepared first if needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Callable

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reid_jax.data import synthetic  # noqa: E402
from reid_jax.data import synthetic_render  # noqa: E402

Extractor = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class Split:
  images: np.ndarray  # uint8 (N, H, W, 3)
  pids: np.ndarray
  camids: np.ndarray


# ----------------------------------------------------------------------------- data


def load_tfds(config: str, data_dir: str) -> dict[str, Split]:
  """Reads the prepared tfds splits (preparing them if needed)."""
  import tensorflow_datasets as tfds
  out = {}
  for split in synthetic.SPLITS:
    src = tfds.data_source(f"synthetic_reid/{config}", split=split, data_dir=data_dir)
    recs = [src[i] for i in range(len(src))]
    out[split] = Split(np.stack([r["image"] for r in recs]),
                       np.array([r["person_id"] for r in recs], np.int64),
                       np.array([r["camera_id"] for r in recs], np.int64))
  return out


def render_splits(cfg: synthetic.SyntheticReidConfig) -> dict[str, Split]:
  """Renders the splits in memory (same images as the tfds builder for this config)."""
  out = {}
  for split in synthetic.SPLITS:
    specs = synthetic.split_specs(cfg, split)
    out[split] = Split(np.stack([synthetic_render.render(cfg, s) for s in specs]),
                       np.array([s.person_id for s in specs], np.int64),
                       np.array([s.camera_id for s in specs], np.int64))
  return out


def parse_set(cfg: synthetic.SyntheticReidConfig, items: list[str]) -> synthetic.SyntheticReidConfig:
  """Applies `knob=value` overrides, casting to the knob's current type."""
  changes = {}
  for item in items:
    key, value = item.split("=", 1)
    current = getattr(cfg, key)
    changes[key] = tuple(int(v) for v in value.split(",")) if isinstance(current, tuple) else type(current)(value)
  return dataclasses.replace(cfg, name=f"{cfg.name}_modified", **changes)


# ----------------------------------------------------------------------- evaluation


def evaluate_rank_local(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                        q_camids: np.ndarray, g_camids: np.ndarray, max_rank: int = 50) -> dict:
  """Market-1501 protocol: per query, drop gallery items with the same id and camera and
  items with id -1; AP = mean precision at the true-match hits; skip queries without one."""
  order = np.argsort(distmat, axis=1, kind="stable")
  cmcs, aps, inps = [], [], []
  for i in range(len(q_pids)):
    o = order[i]
    keep = ~((g_pids[o] == q_pids[i]) & (g_camids[o] == q_camids[i])) & (g_pids[o] != -1)
    hits = (g_pids[o][keep] == q_pids[i]).astype(np.float64)
    if not hits.any():
      continue
    cum = np.cumsum(hits)
    cmc = np.minimum(cum, 1.0)
    cmcs.append(np.pad(cmc[:max_rank], (0, max(0, max_rank - len(cmc))), mode="edge"))
    ranks = np.arange(1, len(hits) + 1)
    aps.append(float((cum / ranks * hits).sum() / hits.sum()))
    last = int(np.nonzero(hits)[0][-1])
    inps.append(float(cum[last] / (last + 1)))
  return dict(cmc=np.mean(cmcs, axis=0), mAP=float(np.mean(aps)), mINP=float(np.mean(inps)),
              num_valid_queries=len(aps))


def pick_evaluator() -> tuple[Callable[..., dict], str]:
  """The project's `reid_jax.evaluation.evaluate_rank` if it exists and agrees with the
  local reference on a small random case; otherwise the local function."""
  try:
    from reid_jax.evaluation import evaluate_rank  # type: ignore
  except Exception:  # noqa: BLE001 (module may not exist yet)
    return evaluate_rank_local, "local evaluate_rank_local (reid_jax.evaluation.evaluate_rank not available)"
  r = np.random.default_rng(0)
  args = (r.random((20, 60)), r.integers(1, 6, 20), r.integers(-1, 6, 60), r.integers(0, 6, 20), r.integers(0, 6, 60))
  try:
    ours, theirs = evaluate_rank_local(*args), evaluate_rank(*args)
    ok = abs(float(theirs["mAP"]) - ours["mAP"]) < 1e-6
  except Exception as e:  # noqa: BLE001
    return evaluate_rank_local, f"local evaluate_rank_local (reid_jax.evaluation.evaluate_rank failed: {e})"
  if not ok:
    return evaluate_rank_local, "local evaluate_rank_local (reid_jax.evaluation.evaluate_rank disagrees)"
  return evaluate_rank, "reid_jax.evaluation.evaluate_rank"


# ----------------------------------------------------------------- hand-crafted features


def _stripe_index(h: int, w: int, stripes: int) -> np.ndarray:
  return np.repeat(np.arange(h) * stripes // h, w)


def grey_world(images: np.ndarray) -> np.ndarray:
  """Colour constancy: scales each channel so its image mean becomes mid grey (removes
  per-camera channel gains and brightness, as Retinex does for LOMO features)."""
  x = images.astype(np.float32)
  x *= 128.0 / np.maximum(x.mean((1, 2), keepdims=True), 1.0)
  return np.clip(x, 0, 255).astype(np.uint8)


def colour_hist(images: np.ndarray, space: str = "hsv", stripes: int = 1, bins: int = 8,
                constancy: bool = False) -> np.ndarray:
  """Joint bins^3 histogram per horizontal stripe, each L1-normalised: (N, stripes*bins^3)."""
  n, h, w, _ = images.shape
  if constancy:
    images = grey_world(images)
  if space == "hsv":
    images = np.stack([np.asarray(Image.fromarray(im).convert("HSV")) for im in images])
  q = (images.astype(np.int64) * bins) >> 8
  idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
  idx = idx.reshape(n, -1) + _stripe_index(h, w, stripes)[None] * bins**3
  idx += np.arange(n)[:, None] * stripes * bins**3
  hist = np.bincount(idx.ravel(), minlength=n * stripes * bins**3).reshape(n, stripes, bins**3)
  return (hist / hist.sum(-1, keepdims=True)).reshape(n, -1).astype(np.float32)


def hog(images: np.ndarray, cell: int = 8, orientations: int = 9) -> np.ndarray:
  """HOG-like features: unsigned gradient orientation histograms per cell, L2-normalised
  over overlapping 2x2-cell blocks (Dalal & Triggs, without interpolation)."""
  n, h, w, _ = images.shape
  g = images.astype(np.float32).mean(-1)
  gx = np.zeros_like(g)
  gy = np.zeros_like(g)
  gx[:, :, 1:-1] = g[:, :, 2:] - g[:, :, :-2]
  gy[:, 1:-1] = g[:, 2:] - g[:, :-2]
  mag = np.hypot(gx, gy)
  ori = (np.arctan2(gy, gx) % np.pi) / np.pi * orientations
  b = np.minimum(ori.astype(np.int64), orientations - 1)
  ch, cw = h // cell, w // cell
  cy = np.minimum(np.arange(h) // cell, ch - 1)
  cx = np.minimum(np.arange(w) // cell, cw - 1)
  cidx = (cy[:, None] * cw + cx[None, :])[None]
  idx = (np.arange(n)[:, None, None] * ch * cw + cidx) * orientations + b
  cells = np.bincount(idx.ravel(), mag.ravel(), minlength=n * ch * cw * orientations)
  cells = cells.reshape(n, ch, cw, orientations)
  blocks = np.concatenate([cells[:, :-1, :-1], cells[:, 1:, :-1], cells[:, :-1, 1:], cells[:, 1:, 1:]], -1)
  blocks /= np.sqrt((blocks**2).sum(-1, keepdims=True) + 1e-6)
  return blocks.reshape(n, -1).astype(np.float32)


def _l2n(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def colour_hog(images: np.ndarray) -> np.ndarray:
  """sqrt grey-world HSV 6-stripe histograms and HOG, each L2-normalised, concatenated."""
  return np.concatenate([_l2n(np.sqrt(colour_hist(images, "hsv", 6, constancy=True))), _l2n(hog(images))], 1)


# ------------------------------------------------------------------------- distances


def euclidean(q: np.ndarray, g: np.ndarray) -> np.ndarray:
  d = (q * q).sum(1)[:, None] + (g * g).sum(1)[None] - 2.0 * q @ g.T
  return np.sqrt(np.maximum(d, 0.0))


def hellinger(q: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Hellinger distance of L1-normalised histograms (monotone in Bhattacharyya)."""
  return euclidean(np.sqrt(q), np.sqrt(g))


def chi_square(q: np.ndarray, g: np.ndarray, chunk: int = 16) -> np.ndarray:
  out = np.empty((len(q), len(g)), np.float32)
  for i in range(0, len(q), chunk):
    a, b = q[i:i + chunk, None], g[None]
    s = a + b
    out[i:i + chunk] = 0.5 * ((a - b)**2 / np.where(s > 0, s, 1.0)).sum(-1)
  return out


# ---------------------------------------------------------------------- learned metric


def fit_lda(feats: np.ndarray, pids: np.ndarray, pca_dim: int = 256, out_dim: int = 128,
            reg: float = 1e-3, pca_samples: int = 2000) -> Callable[[np.ndarray], np.ndarray]:
  """PCA (basis from at most `pca_samples` images, for speed) then LDA, fit on training
  features; returns the projection as a function."""
  mean = feats.mean(0)
  x = feats - mean
  sub = np.random.default_rng(0).permutation(len(x))[:pca_samples]
  _, _, vt = np.linalg.svd(x[sub], full_matrices=False)
  p = vt[:pca_dim].T
  z = x @ p
  classes = np.unique(pids)
  mu = np.stack([z[pids == c].mean(0) for c in classes])
  within = z - mu[np.searchsorted(classes, pids)]
  sw = within.T @ within / len(z)
  sb = (mu - mu.mean(0)).T @ (mu - mu.mean(0)) / len(classes)
  evals, evecs = np.linalg.eigh(sw + reg * np.trace(sw) / len(sw) * np.eye(len(sw)))
  whiten = evecs / np.sqrt(evals)
  e2, v2 = np.linalg.eigh(whiten.T @ sb @ whiten)
  proj = p @ whiten @ v2[:, ::-1][:, :out_dim]
  return lambda f: _l2n((f - mean) @ proj)


# ----------------------------------------------------------------------- CNN features


def _cnn_params(key, widths: tuple[int, ...]):
  import jax
  import jax.numpy as jnp
  params, cin = [], 3
  for w in widths:
    for stride in (1, 2):
      key, k = jax.random.split(key)
      params.append(dict(w=jax.random.normal(k, (3, 3, cin, w)) * jnp.sqrt(2.0 / (9 * cin)),
                         b=jnp.zeros((w,)), g=jnp.ones((w,)), stride=stride))
      cin = w
  return params


def _cnn_apply(params, x, groups: int = 8):
  """Plain conv net: per stage conv3x3 + conv3x3/2, each with GroupNorm and ReLU, then
  global average pooling."""
  import jax
  import jax.numpy as jnp
  x = (x / 255.0 - jnp.array([0.485, 0.456, 0.406])) / jnp.array([0.229, 0.224, 0.225])
  for layer in params:
    x = jax.lax.conv_general_dilated(x, layer["w"], (layer["stride"],) * 2, "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    n, h, w, c = x.shape
    xg = x.reshape(n, h, w, groups, c // groups)
    mean, var = xg.mean((1, 2, 4), keepdims=True), xg.var((1, 2, 4), keepdims=True)
    x = ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(n, h, w, c) * layer["g"] + layer["b"]
    x = jax.nn.relu(x)
  return x.mean((1, 2))


def _batched(fn, images: np.ndarray, batch: int = 256) -> np.ndarray:
  return np.concatenate([np.asarray(fn(images[i:i + batch].astype(np.float32)))
                         for i in range(0, len(images), batch)])


def random_cnn(images: np.ndarray, seed: int = 0, widths: tuple[int, ...] = (32, 64, 128, 256)) -> np.ndarray:
  """GAP features of a randomly initialised (He-normal) 8-layer conv net."""
  import jax
  params = _cnn_params(jax.random.key(seed), widths)
  static = [l["stride"] for l in params]
  weights = [dict(w=l["w"], b=l["b"], g=l["g"]) for l in params]

  @jax.jit
  def f(w, x):
    return _cnn_apply([dict(**wi, stride=s) for wi, s in zip(w, static)], x)

  return _batched(functools.partial(f, weights), images)


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  h, w = size
  if images.shape[1:3] == (h, w):
    return images.astype(np.float32)
  return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in images]).astype(np.float32)


_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
PROJECT_MODEL = dict(backbone="resnet_small", width=32, last_stride=1, head="trinet", hidden_dim=256, embed_dim=64)


def synthetic_config():
  """`configs/dare.py:synthetic`: the model and input size the README main job trains."""
  from configs import dare  # the repo root is on sys.path (above)
  return dare.get_config("synthetic")


def project_model_untrained(images: np.ndarray, exit_name: str = "fused", seed: int = 0) -> np.ndarray:
  """Embedding `exit_name` of the README main job's model (DaRe head on `resnet_small`,
  `configs/dare.py:synthetic`) at initialisation, on the config's input size."""
  import jax
  from reid_jax.methods.dare import train
  config = synthetic_config()
  size = (config.input.height, config.input.width)
  state = train.create_train_state(jax.random.key(seed), config)
  model = train.eval_model(config)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  f = jax.jit(lambda x: model.apply(variables, (x - _MEAN) / _STD, train=False)[exit_name])
  return _batched(f, _resize(images, size))


def train_project_model(train: Split, steps: int, size: tuple[int, int], p: int = 18, k: int = 4,
                        lr: float = 3e-4, seed: int = 0, log: Callable[[str], None] = print) -> Extractor:
  """Trains the project's `resnet_small` + TriNet head (batch-hard soft-margin triplet,
  Adam, P x K batches, flips; lr decayed 1000x over the second half), as the synthetic
  training config does; returns its embedding as a feature extractor."""
  import jax
  import jax.numpy as jnp
  import optax
  from reid_jax.models import build_model

  model = build_model(PROJECT_MODEL)
  x_train = _resize(train.images, size)
  variables = model.init(jax.random.key(seed), jnp.zeros((2, *size, 3)), train=False)
  params, stats = variables["params"], variables["batch_stats"]
  half = steps // 2
  opt = optax.adam(optax.join_schedules(
      [optax.constant_schedule(lr), optax.exponential_decay(lr, steps - half, 1e-3)], [half]))
  opt_state = opt.init(params)

  def loss_fn(params, stats, x, y):
    out, new = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    f = out["final"]
    d = jnp.sqrt(jnp.maximum(((f[:, None] - f[None]) ** 2).sum(-1), 1e-12))
    same = y[:, None] == y[None]
    hard = jnp.where(same, d, 0.0).max(1) - jnp.where(same, jnp.inf, d).min(1)
    return jax.nn.softplus(hard).mean(), new["batch_stats"]

  @jax.jit
  def step(params, stats, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  labels = np.unique(train.pids, return_inverse=True)[1]
  by_id = [np.nonzero(labels == c)[0] for c in range(labels.max() + 1)]
  rng = np.random.default_rng(seed)
  t0 = time.time()
  for n in range(1, steps + 1):
    idx = np.concatenate([rng.choice(by_id[c], k, replace=len(by_id[c]) < k)
                          for c in rng.choice(len(by_id), p, replace=False)])
    x = x_train[idx]
    flip = rng.random(len(idx)) < 0.5
    x[flip] = x[flip, :, ::-1]
    params, stats, opt_state, loss = step(params, stats, opt_state, jnp.asarray((x - _MEAN) / _STD),
                                          jnp.asarray(labels[idx]))
    if n % 100 == 0 or n == steps:
      log(f"  step {n} loss {float(loss):.3f} ({time.time() - t0:.0f}s)")
  f = jax.jit(lambda x: model.apply({"params": params, "batch_stats": stats}, (x - _MEAN) / _STD,
                                    train=False)["final"])
  return lambda images: _batched(f, _resize(images, size))


# ------------------------------------------------------------------------------ main

# name -> (feature extractor, distance); the lead can add the project's model here.
EXTRACTORS: dict[str, tuple[Extractor, Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {}
for _gw in (False, True):
  for _space in ("rgb", "hsv"):
    for _stripes, _where in ((1, "whole"), (2, "halves"), (6, "6 stripes")):
      _fn = functools.partial(colour_hist, space=_space, stripes=_stripes, constancy=_gw)
      _name = f"colour {'grey-world ' if _gw else ''}{_space.upper()} 8x8x8 {_where}"
      EXTRACTORS[f"{_name}, Hellinger"] = (_fn, hellinger)
      if _stripes == 6:
        EXTRACTORS[f"{_name}, chi2"] = (_fn, chi_square)
EXTRACTORS["colour+HOG, euclidean"] = (colour_hog, euclidean)
EXTRACTORS["random CNN (GAP, seed 0), euclidean"] = (random_cnn, euclidean)
EXTRACTORS["random CNN (GAP, seed 1), euclidean"] = (functools.partial(random_cnn, seed=1), euclidean)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="default", help="builder config: default or tiny")
  ap.add_argument("--data_dir", default=os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))
  ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                  help="override a config field and render in memory instead of reading tfds")
  ap.add_argument("--train_steps", type=int, default=0,
                  help="also train the project's resnet_small for this many steps (0 = skip)")
  ap.add_argument("--train_size", default="64x32", help="HxW input of the trained model")
  args = ap.parse_args(argv)

  t0 = time.time()
  if args.set:
    cfg = parse_set({c.name: c for c in synthetic.SyntheticReid.BUILDER_CONFIGS}[args.config], args.set)
    data = render_splits(cfg)
    source = f"rendered in memory, {args.config} + {' '.join(args.set)}"
  else:
    data = load_tfds(args.config, args.data_dir)
    source = f"tfds synthetic_reid/{args.config} in {args.data_dir}"
  print(f"data: {source}; " + ", ".join(f"{k} {len(v.pids)}" for k, v in data.items())
        + f" ({time.time() - t0:.1f}s)")
  evaluate, which = pick_evaluator()
  print(f"evaluation: {which}")
  q, g, tr = data["query"], data["gallery"], data["train"]

  rows = []

  def run(name: str, extract: Extractor, dist, train_fit: bool = False) -> None:
    t = time.time()
    both = extract(np.concatenate([q.images, g.images]))
    fq, fg = both[:len(q.pids)], both[len(q.pids):]
    if train_fit:
      proj = fit_lda(extract(tr.images), tr.pids)
      fq, fg = proj(fq), proj(fg)
    r = evaluate(dist(fq, fg), q.pids, g.pids, q.camids, g.camids, max_rank=50)
    rows.append((name, float(r["mAP"]), float(np.asarray(r["cmc"])[0]), float(r["mINP"]), time.time() - t))
    print(f"  {name:44s} mAP {rows[-1][1]:.3f}  R1 {rows[-1][2]:.3f}  ({rows[-1][4]:.1f}s)", flush=True)

  for name, (extract, dist) in EXTRACTORS.items():
    run(name, extract, dist)
  run("colour+HOG + PCA/LDA fit on train, euclidean", colour_hog, euclidean, train_fit=True)
  try:
    import reid_jax.models  # noqa: F401  (the project's model, if it imports)
    have_model = True
  except Exception as e:  # noqa: BLE001
    have_model = False
    print(f"  (reid_jax.models unavailable, project-model rows skipped: {e})")
  if have_model:
    for exit_name in ("stage4", "fused"):
      run(f"random init. main-job DaRe model, {exit_name} exit, euclidean",
          functools.partial(project_model_untrained, exit_name=exit_name), euclidean)
  if have_model and args.train_steps > 0:
    size = tuple(int(v) for v in args.train_size.split("x"))
    run(f"trained project resnet_small ({args.train_steps} steps, {args.train_size}), euclidean",
        train_project_model(tr, args.train_steps, size), euclidean)

  colour = [r for r in rows if r[0].startswith("colour ")]
  rand = [r for r in rows if r[0].startswith("random ")]
  print(f"\n| features, distance | mAP | rank-1 | mINP |\n|---|---|---|---|")
  for name, m, r1, inp, _ in rows:
    print(f"| {name} | {m:.3f} | {r1:.3f} | {inp:.3f} |")
  best_c, best_r = max(colour, key=lambda r: r[1]), max(rand, key=lambda r: r[1])
  print(f"\nbest colour histogram: {best_c[1]:.3f} ({best_c[0]}; target <= 0.6)")
  print(f"best untrained CNN:    {best_r[1]:.3f} ({best_r[0]}; target <= 0.3)")


if __name__ == "__main__":
  main()
