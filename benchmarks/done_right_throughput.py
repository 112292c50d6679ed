"""Throughput of Re-ID done right's ranking stage: the sequential variable-size step
against padded fixed-size batches, and the share of time spent mining.

  python benchmarks/done_right_throughput.py --config=configs/done_right.py:mobilenetv2,market_cpu \
      [--data_dir=/tmp/reid_data] [--updates=3] [--triplets=16] [--pool=1000]

Both modes draw the same windows from the real training split (images decoded and
augmented as in training, so the input work is included), run one update to compile
(reported), then time `--updates` updates. Mining is timed as one refresh (after a first, compiling one) of the hard
table over `--pool` images at the config's fixed pool size; its share is
mining / (mining + mining.every x update) with the config's mining.every (at the full
pool size, scaled linearly from --pool). Prints one table.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reid_jax.core import loop, parallel  # noqa: E402
from reid_jax.methods.done_right import sizes  # noqa: E402
from reid_jax.methods.done_right import train as dr  # noqa: E402
from reid_jax.methods.done_right.step import padded_step  # noqa: E402


def load_config(spec: str):
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def run_mode(config, mode: str, updates: int) -> dict:
  """Compile time, triplets/s and shapes of `updates` ranking updates in `mode`."""
  config.ranking.mode = mode
  plan = dr.RankingPlan(config)
  stream = plan.stream
  stream.max_hard = 0.0  # random triplets: mining is timed on its own
  state = parallel.replicate(dr._stage2_state(config, None, 1000))  # pylint: disable=protected-access
  n = jax.local_device_count()
  if mode == "sequential":
    step = plan.step
    run = lambda st, w, k: step(st, w, np.full(n, k, np.int32))
  else:
    p_step = jax.pmap(loop.device_step(functools.partial(
        padded_step, embed_fn=dr.embed_fn(config), margin=config.loss.margin),
        config.seed), axis_name=parallel.AXIS, donate_argnums=(0,))
    run = lambda st, w, k: p_step(st, parallel.shard(dr.stack_window(w, k), n),
                                  np.full(n, k, np.int32))
  t0 = time.perf_counter()
  state, m = run(state, next(stream), 1)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  data_s = 0.0
  t0 = time.perf_counter()
  for k in range(updates):
    td = time.perf_counter()
    window = next(stream)
    data_s += time.perf_counter() - td
    state, m = run(state, window, k + 2)
  jax.block_until_ready(m)
  wall = time.perf_counter() - t0
  out = {"mode": mode, "first_update_s": first, "update_s": wall / updates,
         "triplets_per_s": updates * config.ranking.triplets_per_update / wall,
         "data_share": data_s / wall}
  if mode == "sequential":
    out.update(shapes=len(plan.step.shapes), executables=len(plan.step.compiled),
               compile_s=plan.step.compile_s, max_distortion=stream.max_distortion)
  else:
    out.update(shapes=1, executables=1, compile_s=float("nan"), max_distortion=0.0)
  out["state"] = state
  return out


def time_mining(config, state, pool: int) -> float:
  """Seconds of one mining round over `pool` images with the current model."""
  config.mining.pool, config.mining.start = pool, 0
  plan = dr.RankingPlan(config)
  plan.miner(state, 1)  # compiles the pool embedding
  plan.stream.table_round = -1  # due again
  t0 = time.perf_counter()
  plan.miner(state, 1)
  return time.perf_counter() - t0


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/done_right.py:mobilenetv2,market_cpu")
  p.add_argument("--data_dir", default="")
  p.add_argument("--updates", type=int, default=3)
  p.add_argument("--triplets", type=int, default=16)
  p.add_argument("--pool", type=int, default=1000)
  args = p.parse_args()
  config = load_config(args.config)
  if args.data_dir:
    config.dataset.data_dir = args.data_dir
  paper_triplets = int(config.ranking.triplets_per_update)
  config.ranking.triplets_per_update = args.triplets
  full_pool, every = int(config.mining.pool), int(config.mining.every)
  rows = [run_mode(config, m, args.updates) for m in ("sequential", "padded")]
  mining_s = time_mining(config, rows[0]["state"], args.pool) * full_pool / args.pool
  inp = config.input
  print(f"config {args.config}; {config.model.backbone}, longer side {inp.longer_side}, "
        f"multiple {inp.size_multiple}; {args.triplets} triplets/update, {args.updates} "
        f"timed updates; {jax.local_device_count()} device(s) {jax.devices()[0].platform}")
  print(f"{'mode':<11}{'triplets/s':>11}{'update s':>10}{'1st update s':>13}"
        f"{'compile s':>10}{'shapes':>7}{'exes':>6}{'data %':>7}{'max dist':>9}")
  for r in rows:
    print(f"{r['mode']:<11}{r['triplets_per_s']:>11.2f}{r['update_s']:>10.2f}"
          f"{r['first_update_s']:>13.2f}{r['compile_s']:>10.2f}{r['shapes']:>7}"
          f"{r['executables']:>6}{100 * r['data_share']:>7.1f}{r['max_distortion']:>9.3f}")
  seq = rows[0]
  per_round = every * seq["update_s"] * paper_triplets / args.triplets
  print(f"shape bound {sizes.shape_bound(inp.longer_side, inp.size_multiple, dr.min_side(config))}; "
        f"sequential / padded time per triplet: "
        f"{rows[1]['triplets_per_s'] / seq['triplets_per_s']:.2f}x")
  print(f"mining: {mining_s:.1f} s per round of {full_pool} images (timed on {args.pool}); "
        f"share at mining.every={every} with {paper_triplets} "
        f"triplets/update: {100 * mining_s / (mining_s + per_round):.1f} %")


if __name__ == "__main__":
  main()
