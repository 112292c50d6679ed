"""ONNX export of trained runs: accuracy and CPU speed against the JAX embedder.

  python benchmarks/export_speed.py --workdir=runs/a --workdir=runs/b [--batch=64]

For each run: exports the graph with every exit (`reid_jax.inference.export`), and
DaRe's stage1 graph (`split`), then on `--batch` random uint8 images at the run's size
prints the max |ONNX - JAX| per exit and images/s of onnxruntime (CPU provider) and of
the jitted JAX embedder, both from uint8 images to features (JAX: numpy
`augment.normalize` + `Run.embed`; ONNX: normalisation inside the graph). Also
onnxruntime asked for the stage1 output only, to show whether it skips later stages.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reid_jax.data import augment  # noqa: E402
from reid_jax.inference import export, run as run_lib  # noqa: E402

flags.DEFINE_multi_string("workdir", [], "Training workdirs to export.")
flags.DEFINE_integer("batch", 64, "Images per call.")
flags.DEFINE_integer("repeats", 5, "Timed calls (after one warm-up); the best is kept.")
flags.DEFINE_string("tta", None, "Override the runs' eval.tta (none, flip).")
FLAGS = flags.FLAGS


def best_rate(fn, n: int, repeats: int) -> float:
  """Images/s of the fastest of `repeats` calls of fn() on n images, after a warm-up."""
  fn()
  best = min(_timed(fn) for _ in range(repeats))
  return n / best


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def bench(workdir: str, tmp: str) -> list[str]:
  run = run_lib.load_run(workdir, tta=FLAGS.tta)
  h, w = run.input_hw
  x = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, h, w, 3), dtype=np.uint8)
  path = os.path.join(tmp, os.path.basename(workdir.rstrip("/")) + ".onnx")
  t = time.perf_counter()
  (full,) = export.export_onnx(run, path)
  export_s = time.perf_counter() - t
  onnx_embed = export.onnx_embedder(path)
  ref = run.embed(augment.normalize(x))
  got = onnx_embed(x)
  diffs = {k: float(np.abs(got[k] - ref[k]).max()) for k in full.exits}
  jax_rate = best_rate(lambda: run.embed(augment.normalize(x)), len(x), FLAGS.repeats)
  ort_rate = best_rate(lambda: onnx_embed(x), len(x), FLAGS.repeats)
  rows = [f"| {workdir} ({run.method}, {h}x{w}, tta {run.tta or 'none'}) | all exits | "
          f"{', '.join(f'{k} {v:.1e}' for k, v in diffs.items())} | {ort_rate:.0f} | "
          f"{jax_rate:.0f} | {os.path.getsize(path) / 1e6:.1f} MB, export {export_s:.0f} s |"]
  if "stage1" in full.exits:
    only = best_rate(lambda: onnx_embed(x, outputs=["stage1"]), len(x), FLAGS.repeats)
    rows.append(f"| | stage1 output of the all-exit graph | | {only:.0f} | | |")
    (split,) = export.export_onnx(run, path, exits=["stage1"], split=True)
    split_embed = export.onnx_embedder(split.path)
    diff = float(np.abs(split_embed(x)["stage1"] - ref["stage1"]).max())
    rate = best_rate(lambda: split_embed(x), len(x), FLAGS.repeats)
    rows.append(f"| | stage1 graph (--split_exits) | stage1 {diff:.1e} | {rate:.0f} | | "
                f"{os.path.getsize(split.path) / 1e6:.1f} MB |")
  return rows


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (one or more)")
  print(f"batch {FLAGS.batch}, best of {FLAGS.repeats}, images/s from uint8 images")
  print("| run | graph | max abs diff ONNX vs JAX | onnxruntime img/s | JAX jit img/s | notes |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for wd in FLAGS.workdir:
      for row in bench(wd, tmp):
        print(row, flush=True)


if __name__ == "__main__":
  app.run(main)
