"""Times preparing Market-1501 and reading it back with `tfds.data_source`.

  python benchmarks/prepare_market.py --manual_dir=/path/with/zip [--data_dir=DIR] [--reads=2000]

Without --data_dir it prepares into a fresh temporary folder (deleted afterwards), so the
prepare time is a cold one; with an already prepared --data_dir only reading is timed.
Reads are random-access and include JPEG decoding (PIL), as a training input pipeline
would do them.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds

import reid_jax.data  # noqa: F401  (registers the builders)
from reid_jax import prepare


def run(manual_dir: str, data_dir: str, reads: int) -> None:
  start = time.perf_counter()
  builder = prepare.prepare("market1501", manual_dir=manual_dir, data_dir=data_dir)
  print(f"prepare: {time.perf_counter() - start:.1f} s -> {builder.data_dir}")
  for split in ("train", "gallery"):
    source = tfds.data_source("market1501", split=split, data_dir=data_dir)
    order = np.random.default_rng(0).permutation(len(source))[:reads]
    start = time.perf_counter()
    for i in order:
      source[int(i)]
    elapsed = time.perf_counter() - start
    print(f"{split}: {len(order)} random reads in {elapsed:.2f} s "
          f"({len(order) / elapsed:,.0f} images/s, one thread)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--manual_dir", required=True)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--reads", type=int, default=2000)
  args = parser.parse_args()
  tfds.disable_progress_bar()
  if args.data_dir:
    run(args.manual_dir, args.data_dir, args.reads)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      run(args.manual_dir, tmp, args.reads)


if __name__ == "__main__":
  main()
