"""MSP-CNN pair-step time with and without the NCC loss, side by side in one process.

  python benchmarks/msp_cnn_step.py --variant=synthetic --pairs=16
  python benchmarks/msp_cnn_step.py --variant= --pairs=8       # the paper's 144x56 JSTL

Prints, per stage step (stage 1: softmax + Euclidean; stage 2: + NCC), compile time,
the median step time over --steps runs, images/s, and the NCC share of stage 2's step.
Synthetic inputs on one device, no data loading.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import msp_cnn  # noqa: E402
from reid_jax.methods.msp_cnn import train as msp  # noqa: E402


def time_step(config, pairs: int, use_ncc: bool, steps: int) -> tuple[float, float]:
  """(compile seconds, median step seconds) of the pmapped pair step on one device."""
  classes = 100
  variables = msp.init_variables(jax.random.key(0), config, classes)
  state = msp.create_train_state(variables, config, classes, 1000, config.optimizer)
  state = jax.tree.map(lambda x: jnp.asarray(x)[None], state)
  model = msp.build_model(config, classes, train=False)
  h, w = config.input.height, config.input.width
  rng = np.random.default_rng(0)
  batch = {"image_a": rng.normal(size=(1, pairs, h, w, 3)).astype(np.float32),
           "image_b": rng.normal(size=(1, pairs, h, w, 3)).astype(np.float32),
           "label": rng.integers(0, classes, (1, pairs)).astype(np.int32),
           "label_b": rng.integers(0, classes, (1, pairs)).astype(np.int32),
           "same": (np.arange(pairs)[None] % 3 == 0).astype(np.int32)}
  batch = jax.device_put(batch)
  key = jax.random.split(jax.random.key(1), 1)
  step = jax.pmap(functools.partial(msp.train_step, model=model, config=config,
                                    use_ncc=use_ncc), axis_name=msp.AXIS,
                  devices=jax.devices()[:1])
  t = time.perf_counter()
  jax.block_until_ready(step(state, batch, key))
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(step(state, batch, key))
    times.append(time.perf_counter() - t)
  return compile_s, float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="synthetic")
  parser.add_argument("--pairs", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  config = msp_cnn.get_config(args.variant or None)
  rows = []
  for use_ncc in (False, True):
    compile_s, step_s = time_step(config, args.pairs, use_ncc, args.steps)
    rows.append((use_ncc, compile_s, step_s))
  h, w = config.input.height, config.input.width
  print(f"MSP-CNN pair step, {h}x{w}, {args.pairs} pairs ({2 * args.pairs} images), "
        f"inception {tuple(config.model.inception_channels)}, {jax.devices()[0].platform}")
  print(f"{'stage':<28}{'compile s':>10}{'step s':>9}{'images/s':>10}")
  for use_ncc, compile_s, step_s in rows:
    name = "2: softmax+Euclid+NCC" if use_ncc else "1: softmax+Euclid"
    print(f"{name:<28}{compile_s:>10.1f}{step_s:>9.3f}{2 * args.pairs / step_s:>10.1f}")
  share = 1 - rows[0][2] / rows[1][2]
  print(f"NCC share of the stage-2 step: {100 * share:.1f} %")


if __name__ == "__main__":
  main()
