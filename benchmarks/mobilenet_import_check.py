"""Sanity check of the GluonCV MobileNetV2 import on real Market-1501 crops.

Reads a few identities straight from the official zip (nothing is extracted or copied),
embeds them with MobileNetV2 (global average pool of each stage) once with the ImageNet
weights and once with a random init, and reports:

  * spread: mean squared distance of the L2-normalised features to their centroid
    (0 = every image maps to the same direction, i.e. degenerate features);
  * rank-1: how often an image's nearest neighbour (cosine) is the same person, among all
    other images and among images from other cameras only (Market's protocol);
  * rank1_ctr: cross-camera rank-1 after subtracting the set's mean feature (removes the
    shared offset that dominates untrained features);
  * id-ratio: mean distance to other identities / mean distance to the same identity.

Raw downsampled pixels are included as a floor. Usage (from the repo root):

  python benchmarks/mobilenet_import_check.py [--num_ids 25 --per_id 4 --height 256 --width 128]
"""

from __future__ import annotations

import argparse
import io
import re
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from reid_jax.models.mobilenetv2 import mobilenetv2
from reid_jax.pretrained import load_pretrained

SHARED = Path(__file__).resolve().parents[2] / "shared"
NAME = re.compile(r"/(-?\d+)_c(\d)s\d_\d+_\d+\.jpg$")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def load_market_subset(zip_path: Path, split: str, num_ids: int, per_id: int, height: int, width: int):
  """First `num_ids` identities (sorted) with >= `per_id` images from >= 2 cameras."""
  with zipfile.ZipFile(zip_path) as zf:
    by_id: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for name in sorted(zf.namelist()):
      match = NAME.search(name)
      if f"/{split}/" in name and match and int(match.group(1)) > 0:
        by_id[int(match.group(1))].append((name, int(match.group(2))))
    images, pids, cams = [], [], []
    for pid in sorted(by_id):
      files = by_id[pid]
      cameras = sorted({c for _, c in files})
      if len(files) < per_id or len(cameras) < 2:
        continue
      # Spread the picks over cameras: round-robin over each camera's files.
      per_cam = [[f for f in files if f[1] == c] for c in cameras]
      picks = [lst[i] for i in range(max(map(len, per_cam))) for lst in per_cam if i < len(lst)][:per_id]
      for name, cam in picks:
        img = Image.open(io.BytesIO(zf.read(name))).convert("RGB").resize((width, height), Image.BILINEAR)
        images.append((np.asarray(img, np.float32) / 255.0 - MEAN) / STD)
        pids.append(pid)
        cams.append(cam)
      if len(set(pids)) == num_ids:
        break
  return np.stack(images), np.array(pids), np.array(cams)


def metrics(features: np.ndarray, pids: np.ndarray, cams: np.ndarray) -> dict[str, float]:
  """Spread, rank-1 (any / cross-camera) and inter/intra distance ratio of L2-normalised features."""
  f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  spread = float(((f - f.mean(0)) ** 2).sum(1).mean())
  sim = f @ f.T
  np.fill_diagonal(sim, -np.inf)
  rank1_any = float((pids[sim.argmax(1)] == pids).mean())
  cross = np.where(cams[:, None] == cams[None, :], -np.inf, sim)
  rank1_cross = float((pids[cross.argmax(1)] == pids).mean())
  dist = np.sqrt(np.maximum(2 - 2 * (f @ f.T), 0))
  same = (pids[:, None] == pids[None, :]) & ~np.eye(len(pids), dtype=bool)
  diff = pids[:, None] != pids[None, :]
  ratio = float(dist[diff].mean() / max(dist[same].mean(), 1e-12))
  c = features - features.mean(0)
  c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
  csim = np.where(cams[:, None] == cams[None, :], -np.inf, c @ c.T)
  rank1_ctr = float((pids[csim.argmax(1)] == pids).mean())
  return {"spread": spread, "rank1": rank1_any, "rank1_xcam": rank1_cross, "rank1_ctr": rank1_ctr,
          "id_ratio": ratio}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--zip", type=Path, default=SHARED / "datasets" / "Market-1501-v15.09.15.zip")
  parser.add_argument("--weights", type=Path, default=SHARED / "pretrained" / "mobilenetv2_1.0_imagenet_gluon.npz")
  parser.add_argument("--split", default="bounding_box_test")
  parser.add_argument("--num_ids", type=int, default=25)
  parser.add_argument("--per_id", type=int, default=4)
  parser.add_argument("--height", type=int, default=256)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  images, pids, cams = load_market_subset(args.zip, args.split, args.num_ids, args.per_id, args.height, args.width)
  print(f"{len(images)} images, {len(set(pids))} identities, {len(set(cams))} cameras "
        f"({args.split}, {args.height}x{args.width})")

  model = mobilenetv2()
  x = jnp.asarray(images)
  apply = jax.jit(model.apply)
  t0 = time.time()
  random_vars = jax.jit(model.init)(jax.random.PRNGKey(args.seed), x[:1])
  pretrained_vars = load_pretrained(random_vars, str(args.weights), "mobilenetv2")
  results = {}
  for label, variables in (("pretrained", pretrained_vars), ("random init", random_vars)):
    stages = [np.asarray(s).mean(axis=(1, 2)) for s in apply(variables, x)]
    for s in (3, 4):
      results[f"{label} stage{s}"] = metrics(stages[s - 1], pids, cams)
  pixels = np.asarray(jax.image.resize(x, (len(x), 32, 16, 3), "linear")).reshape(len(x), -1)
  results["raw pixels 32x16"] = metrics(pixels, pids, cams)
  print(f"(models built and run in {time.time() - t0:.1f}s)\n")

  width = max(map(len, results))
  print(f"{'features':<{width}}  {'spread':>7}  {'rank1':>6}  {'rank1_xcam':>10}  {'rank1_ctr':>9}  {'id_ratio':>8}")
  for label, m in results.items():
    print(f"{label:<{width}}  {m['spread']:>7.4f}  {m['rank1']:>6.3f}  {m['rank1_xcam']:>10.3f}  "
          f"{m['rank1_ctr']:>9.3f}  {m['id_ratio']:>8.3f}")
  print(f"\nchance rank-1 ~ {1 / len(set(pids)):.3f}")


if __name__ == "__main__":
  main()
