"""Input pipeline throughput: PK batches/s and images/s for several worker counts.

TriNet-style training input at 256x128: resize x1.125 + random crop + flip +
random erasing (p=0.5) + ImageNet normalisation, P=18 x K=4 batches.

  python benchmarks/input_pipeline.py --dataset=market1501 --data_dir=/tmp/reid_data
  python benchmarks/input_pipeline.py --synthetic   # in-memory 64x128 JPEGs

Prints one row per worker count, with the 1-minute load average before and after
each run (the machine may be shared), and optionally a per-stage profile.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from reid_jax.data import augment as aug  # noqa: E402
from reid_jax.data import pipeline as pl  # noqa: E402
from reid_jax.data import samplers as smp  # noqa: E402


class SyntheticJpegSource:
  """In-memory source of 64x128 JPEG bytes, decoded with PIL on access (like tfds)."""

  def __init__(self, num_records: int = 12936, num_ids: int = 751, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = [np.asarray(Image.fromarray(rng.integers(0, 256, (16, 8, 3), np.uint8))
                       .resize((64, 128), Image.Resampling.BICUBIC)) for _ in range(64)]
    self._jpegs = []
    for i in range(num_records):
      noise = rng.integers(-8, 9, (128, 64, 3))
      img = np.clip(base[i % 64].astype(int) + noise, 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format="JPEG", quality=90)
      self._jpegs.append(buf.getvalue())
    self._pids = np.sort(rng.integers(1, num_ids + 1, num_records))
    self._cams = rng.integers(0, 6, num_records)

  def __len__(self) -> int:
    return len(self._jpegs)

  def __getitem__(self, i: int) -> dict:
    return {"image": np.asarray(Image.open(io.BytesIO(self._jpegs[i])).convert("RGB")),
            "person_id": int(self._pids[i]), "camera_id": int(self._cams[i]),
            "file_name": f"{i:06d}.jpg".encode()}

  def __repr__(self) -> str:
    return f"SyntheticJpegSource({len(self)})"


def cpu_seconds() -> float | None:
  """User+system CPU seconds of this process and its live children (needs psutil)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  total = 0.0
  me = psutil.Process()
  for proc in [me] + me.children(recursive=True):
    try:
      t = proc.cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def open_source(args) -> tuple[object, str]:
  """The benchmark source and a description of it."""
  if args.synthetic:
    return SyntheticJpegSource(args.synthetic_records), (
        f"synthetic in-memory 64x128 JPEGs ({args.synthetic_records}), PIL-decoded arrays")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import reid_jax.data  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  src = tfds.data_source(args.dataset, split=args.split, data_dir=args.data_dir)
  return src, f"tfds {args.dataset}/{args.split} in {args.data_dir} ({len(src)} records)"


def profile_stages(source, labels, args, n: int = 400) -> None:
  """Per-image cost of each stage, in this process."""
  reader = pl.RecordReader(source)
  spl = smp.PKSampler(labels["person_id"], P=args.P, K=args.K, seed=0)
  idx = np.concatenate([spl[s]["index"] for s in range(-(-n // spl.batch_size))])[:n]
  t0 = time.perf_counter()
  recs = reader.read(idx)
  t_read = time.perf_counter() - t0
  cfg = aug.AugmentConfig.from_options({"erasing_prob": args.erasing})
  h, w = args.height, args.width
  sh, sw = aug.scaled_size(h, w, cfg.resize_scale)
  t = dict(decode=0.0, resize_crop=0.0, flip_to_array=0.0, erasing=0.0, normalize=0.0)
  out8 = np.empty((h, w, 3), np.uint8)
  out32 = np.empty((h, w, 3), np.float32)
  for k, rec in enumerate(recs):
    rng = aug.image_rng(0, k)
    a = time.perf_counter()
    im = aug.to_pil(rec["image"], (sw, sh))
    im.load()
    b = time.perf_counter()
    top, left = int(rng.integers(0, sh - h + 1)), int(rng.integers(0, sw - w + 1))
    box = aug.crop_box(im.height, im.width, h, w, cfg.resize_scale, top, left)
    im = im.resize((w, h), Image.Resampling.BILINEAR, box=box)
    c = time.perf_counter()
    if rng.random() < 0.5:
      im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out8[...] = np.asarray(im)
    d = time.perf_counter()
    aug.erase_in_place(out8, rng, args.erasing)
    e = time.perf_counter()
    aug.normalize(out8, out=out32)
    f = time.perf_counter()
    for key, dt in zip(t, (b - a, c - b, d - c, e - d, f - e)):
      t[key] += dt
  print(f"\nPer-image stage costs over {n} images (this process, microseconds):")
  print(f"  {'read+parse records':20s} {t_read / n * 1e6:8.1f}")
  for key, v in t.items():
    print(f"  {key:20s} {v / n * 1e6:8.1f}")
  print(f"  {'total':20s} {(t_read + sum(t.values())) / n * 1e6:8.1f}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="market1501")
  p.add_argument("--data_dir", default="/tmp/reid_data")
  p.add_argument("--split", default="train")
  p.add_argument("--synthetic", action="store_true",
                 help="benchmark an in-memory source of 64x128 JPEGs instead")
  p.add_argument("--synthetic_records", type=int, default=12936)
  p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  p.add_argument("--read_threads", default="1",
                 help="comma-separated read threads per process (each combination runs)")
  p.add_argument("--batches", type=int, default=40, help="timed batches per run")
  p.add_argument("--warmup", type=int, default=3, help="untimed batches per run")
  p.add_argument("--P", type=int, default=18)
  p.add_argument("--K", type=int, default=4)
  p.add_argument("--height", type=int, default=256)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--erasing", type=float, default=0.5)
  p.add_argument("--no_normalize", action="store_true", help="yield uint8 images")
  p.add_argument("--profile", action="store_true", help="also print per-stage costs")
  args = p.parse_args()

  source, desc = open_source(args)
  t0 = time.perf_counter()
  labels = smp.read_labels(source)
  t_labels = time.perf_counter() - t0
  print(f"Source: {desc}")
  print(f"read_labels: {t_labels:.3f} s for {len(source)} records "
        f"({len(np.unique(labels['person_id']))} ids)")
  print(f"Batch: P={args.P} x K={args.K} = {args.P * args.K} images at "
        f"{args.height}x{args.width}; resize x1.125 + random crop + flip + erasing "
        f"p={args.erasing}; {'uint8' if args.no_normalize else 'float32 normalised'}; "
        f"cpus={os.cpu_count()}")
  if args.profile:
    profile_stages(source, labels, args)

  rows = []
  configs = [(int(w), int(t)) for w in args.workers.split(",")
             for t in args.read_threads.split(",")]
  for workers, threads in configs:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    it = pl.train_loader(source, P=args.P, K=args.K, height=args.height, width=args.width,
                         augment={"erasing_prob": args.erasing}, seed=0, labels=labels,
                         worker_count=workers, read_threads=threads,
                         normalize=not args.no_normalize)
    try:
      for _ in range(args.warmup):
        next(it)
      t_start = time.perf_counter() - t0
      c1 = cpu_seconds()
      t1 = time.perf_counter()
      for _ in range(args.batches):
        batch = next(it)
      dt = time.perf_counter() - t1
      c2 = cpu_seconds()
    finally:
      it.close()
    del batch
    load1 = os.getloadavg()[0]
    n_img = args.batches * args.P * args.K
    cpu_ms = (c2 - c1) / n_img * 1e3 if c1 is not None else float("nan")
    rows.append((workers, threads, t_start, args.batches / dt, n_img / dt, cpu_ms,
                 load0, load1))

  print(f"\n{'workers':>7} {'threads':>7} {'startup+warmup s':>16} {'batches/s':>10} "
        f"{'images/s':>9} {'CPU ms/img':>10} {'load1 before':>12} {'load1 after':>11}")
  for w, th, ts, bps, ips, cpu_ms, l0, l1 in rows:
    print(f"{w:>7d} {th:>7d} {ts:>16.2f} {bps:>10.2f} {ips:>9.0f} {cpu_ms:>10.2f} "
          f"{l0:>12.2f} {l1:>11.2f}")
  print("\nCPU ms/img: CPU time of this process and its workers per image while timing "
        "(load-independent cost; images/s on an idle machine ~ cores * 1000 / it).")


if __name__ == "__main__":
  main()
