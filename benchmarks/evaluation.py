"""Benchmark of reid_jax.evaluation against per-query / loop-by-loop numpy baselines.

    python benchmarks/evaluation.py                 # everything (~15-25 min on 2 cores)
    python benchmarks/evaluation.py --skip_rerank_reference --skip_1m   # quick look

Prints one table, side by side, on Market-scale random data (3,368 queries,
19,732 gallery items: 750 identities in 6 cameras, 2,793 id-0 distractors,
3,819 id -1 junk; 128-d and 2048-d embeddings = identity centre + camera bias +
noise):
  * evaluate_rank: torchreid-style per-query numpy loop vs ours (identical to 1e-6);
  * re-ranking: the published algorithm item by item (per-row numpy loops) vs
    ours, each in its own process for peak memory (max RSS, inputs included);
  * the streaming exact evaluator on 10,000 queries x 1,000,000 gallery items
    at 128-d (no [Q, G] matrix), plus a check that it equals `evaluate_rank` on
    the full matrix for a 200-query slice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MARKET = dict(num_ids=750, num_cams=6, num_query=3368, num_gallery_ids=13115,
              num_distractors=2793, num_junk=3819)


# ----------------------------------------------------------------------------- data


def market_like(dim: int, seed: int = 0, noise: float | None = None,
                cam_bias: float | None = None):
  """Embeddings with identity + camera structure in Market-1501's proportions.

  Default noise levels give a realistic difficulty (128-d: R1 ~0.95, mAP ~0.76;
  2048-d: R1 ~0.93, mAP ~0.65).
  """
  noise = noise if noise is not None else (1.2 if dim <= 512 else 2.0)
  cam_bias = cam_bias if cam_bias is not None else (0.5 if dim <= 512 else 0.8)
  rng = np.random.default_rng(seed)
  m = MARKET
  centers = rng.normal(size=(m["num_ids"] + 1, dim)).astype(np.float32)
  bias = (cam_bias * rng.normal(size=(m["num_cams"], dim))).astype(np.float32)
  q_pids = 1 + np.arange(m["num_query"]) % m["num_ids"]
  q_cams = rng.integers(0, m["num_cams"], m["num_query"])
  g_pids = np.concatenate([1 + rng.integers(0, m["num_ids"], m["num_gallery_ids"]),
                           np.zeros(m["num_distractors"], np.int64),
                           -np.ones(m["num_junk"], np.int64)])
  g_pids = g_pids[rng.permutation(len(g_pids))]
  g_cams = rng.integers(0, m["num_cams"], len(g_pids))

  def embed(pids, cams):
    c = centers[np.maximum(pids, 0)]
    c[pids <= 0] = rng.normal(size=(int((pids <= 0).sum()), dim))  # distractors, junk
    x = c + bias[cams] + noise * rng.normal(size=(len(pids), dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

  return embed(q_pids, q_cams), embed(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def million_like(num_query: int = 10_000, num_gallery: int = 1_000_000, dim: int = 128,
                 seed: int = 1, noise: float = 1.0, cam_bias: float = 0.4):
  """Large gallery: 2,500 query identities (4 queries, ~20 gallery images each)
  among 1M items; the rest are distractor identities (clusters) and junk.

  Default noise: R1 ~0.98, mAP ~0.80, mINP ~0.35 (a good model).
  """
  rng = np.random.default_rng(seed)
  n_qid = num_query // 4
  n_other = 60_000
  centers = rng.normal(size=(n_qid + n_other + 1, dim)).astype(np.float32)
  bias = (cam_bias * rng.normal(size=(6, dim))).astype(np.float32)
  q_pids = 1 + np.repeat(np.arange(n_qid), 4)
  q_cams = rng.integers(0, 6, num_query)
  n_match = 20 * n_qid
  g_pids = np.concatenate([1 + rng.integers(0, n_qid, n_match),
                           1 + n_qid + rng.integers(0, n_other, num_gallery - n_match)])
  g_pids[rng.random(num_gallery) < 0.02] = -1
  g_pids = g_pids[rng.permutation(num_gallery)]
  g_cams = rng.integers(0, 6, num_gallery)

  def embed(pids, cams):
    out = np.empty((len(pids), dim), np.float32)
    for s in range(0, len(pids), 100_000):
      p, c = pids[s:s + 100_000], cams[s:s + 100_000]
      x = centers[np.maximum(p, 0)] + bias[c]
      x += noise * rng.standard_normal((len(p), dim), dtype=np.float32)
      out[s:s + 100_000] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out

  return embed(q_pids, q_cams), embed(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


# ----------------------------------------------------------------------------- baselines


def loop_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
  """torchreid's eval_market1501 structure: one stable argsort and a few ops per query."""
  all_cmc, all_ap, all_inp = [], [], []
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind="stable")
    gp, gc = g_pids[order], g_camids[order]
    junk = (gp == -1) | ((gp == q_pids[i]) & (gc == q_camids[i]))
    good = (gp == q_pids[i])[~junk]
    if not good.any():
      continue
    cum = np.cumsum(good)
    hits = np.flatnonzero(good)
    cmc = np.minimum(cum, 1)[:max_rank].astype(np.float64)
    if len(cmc) < max_rank:
      cmc = np.pad(cmc, (0, max_rank - len(cmc)), constant_values=1.0)
    all_cmc.append(cmc)
    all_ap.append(np.mean(cum[hits] / (hits + 1.0)))
    all_inp.append(cum[-1] / (hits[-1] + 1.0))
  return {"cmc": np.mean(all_cmc, axis=0), "mAP": float(np.mean(all_ap)),
          "mINP": float(np.mean(all_inp)), "num_valid_queries": len(all_cmc)}


def loop_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
  """The published algorithm, item by item, as in the reference code (stable argsort)."""
  nq = q_g_dist.shape[0]
  original = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                             np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
  original = np.power(original, 2).astype(np.float32)
  original = np.transpose(original / np.max(original, axis=0))
  v = np.zeros_like(original, dtype=np.float32)
  initial_rank = np.argsort(original, kind="stable").astype(np.int32)
  n = original.shape[0]
  half = int(np.around(k1 / 2.))
  for i in range(n):
    fwd = initial_rank[i, :k1 + 1]
    bwd = initial_rank[fwd, :k1 + 1]
    rec = fwd[np.where(bwd == i)[0]]
    expansion = rec
    for cand in rec:
      cf = initial_rank[cand, :half + 1]
      cb = initial_rank[cf, :half + 1]
      crec = cf[np.where(cb == cand)[0]]
      if len(np.intersect1d(crec, rec)) > 2. / 3 * len(crec):
        expansion = np.append(expansion, crec)
    expansion = np.unique(expansion)
    weight = np.exp(-original[i, expansion])
    v[i, expansion] = weight / np.sum(weight)
  original = original[:nq]
  if k2 != 1:
    v_qe = np.zeros_like(v)
    for i in range(n):
      v_qe[i] = np.mean(v[initial_rank[i, :k2]], axis=0)
    v = v_qe
    del v_qe
  del initial_rank
  inv_index = [np.where(v[:, i] != 0)[0] for i in range(n)]
  jaccard = np.zeros_like(original, dtype=np.float32)
  for i in range(nq):
    temp_min = np.zeros(n, np.float32)
    nonzero = np.where(v[i] != 0)[0]
    for l in nonzero:
      rows = inv_index[l]
      temp_min[rows] += np.minimum(v[i, l], v[rows, l])
    jaccard[i] = 1 - temp_min / (2. - temp_min)
  final = jaccard * (1 - lambda_value) + original * lambda_value
  return final[:, nq:]


# ----------------------------------------------------------------------------- workers


def _peak_rss_gb() -> float:
  """This process's peak resident memory (VmHWM; ru_maxrss would include the
  parent's peak, which Linux carries across fork + exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20  # KiB -> GiB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker_rerank(method: str, data_dir: str) -> dict:
  qg = np.load(os.path.join(data_dir, "qg.npy"))
  qq = np.load(os.path.join(data_dir, "qq.npy"))
  gg = np.load(os.path.join(data_dir, "gg.npy"))
  start_rss = _peak_rss_gb()
  t0 = time.perf_counter()
  if method == "reference":
    out = loop_re_ranking(qg, qq, gg)
  else:
    from reid_jax.evaluation import re_ranking
    out = re_ranking(qg, qq, gg)
  secs = time.perf_counter() - t0
  np.save(os.path.join(data_dir, f"rr_{method}.npy"), out)
  return {"seconds": secs, "peak_rss_gb": _peak_rss_gb(), "rss_before_gb": start_rss}


def worker_million(args) -> dict:
  from reid_jax.evaluation import evaluate_rank_streaming
  q, g, qp, gp, qc, gc = million_like(args.num_query, args.num_gallery)
  rss_data = _peak_rss_gb()
  use = resource.getrusage(resource.RUSAGE_SELF)
  cpu0 = use.ru_utime + use.ru_stime
  t0 = time.perf_counter()
  res = evaluate_rank_streaming(q, g, qp, gp, qc, gc, metric="euclidean",
                                query_block=args.query_block, gallery_block=args.gallery_block)
  secs = time.perf_counter() - t0
  use = resource.getrusage(resource.RUSAGE_SELF)
  return {"seconds": secs, "peak_rss_gb": _peak_rss_gb(), "rss_data_gb": rss_data,
          "cpu_seconds": use.ru_utime + use.ru_stime - cpu0,
          "rank1": float(res["cmc"][0]), "mAP": res["mAP"], "mINP": res["mINP"],
          "num_valid_queries": res["num_valid_queries"]}


def worker_million_check(args) -> dict:
  """Streaming vs evaluate_rank on the full matrix for the first 200 queries."""
  from reid_jax.evaluation import evaluate_rank, evaluate_rank_streaming, pairwise_distance
  q, g, qp, gp, qc, gc = million_like(args.num_query, args.num_gallery)
  sub = np.arange(0, len(q), len(q) // 200)[:200]
  a = evaluate_rank_streaming(q[sub], g, qp[sub], gp, qc[sub], gc,
                              gallery_block=args.gallery_block)
  d = pairwise_distance(q[sub], g, block_size=args.gallery_block)
  b = evaluate_rank(d, qp[sub], gp, qc[sub], gc)
  return {"max_cmc_diff": float(np.abs(a["cmc"] - b["cmc"]).max()),
          "mAP_diff": abs(a["mAP"] - b["mAP"]), "mINP_diff": abs(a["mINP"] - b["mINP"]),
          "mAP": b["mAP"]}


def run_worker(argv: list[str]) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def bench_evaluate_rank(dim: int, rows: list, data_dir: str | None, do_rerank_ref: bool):
  from reid_jax.evaluation import evaluate_rank, pairwise_distance
  q, g, qp, gp, qc, gc = market_like(dim)
  t0 = time.perf_counter()
  dist = pairwise_distance(q, g)
  t_dist = time.perf_counter() - t0
  t0 = time.perf_counter()
  ref = loop_evaluate(dist, qp, gp, qc, gc)
  t_loop = time.perf_counter() - t0
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    ours = evaluate_rank(dist, qp, gp, qc, gc)
    times.append(time.perf_counter() - t0)
  t_ours = float(np.median(times))
  diff = max(float(np.abs(ours["cmc"] - ref["cmc"]).max()), abs(ours["mAP"] - ref["mAP"]),
             abs(ours["mINP"] - ref["mINP"]))
  rows.append((f"evaluate_rank {dim}-d", f"{t_loop:.2f} s", f"{t_ours:.3f} s",
               f"{t_loop / t_ours:.1f}x", f"max abs diff {diff:.1e}; R1 {ours['cmc'][0]:.3f} "
               f"mAP {ours['mAP']:.3f} mINP {ours['mINP']:.3f}; distances {t_dist:.2f} s"))
  if data_dir is None:
    return
  np.save(os.path.join(data_dir, "qg.npy"), dist)
  np.save(os.path.join(data_dir, "qq.npy"), pairwise_distance(q, q))
  np.save(os.path.join(data_dir, "gg.npy"), pairwise_distance(g, g))
  del dist
  ours = run_worker(["--worker", "rerank_ours", "--data_dir", data_dir])
  if do_rerank_ref:
    ref = run_worker(["--worker", "rerank_reference", "--data_dir", data_dir])
    a = np.load(os.path.join(data_dir, "rr_ours.npy"))
    b = np.load(os.path.join(data_dir, "rr_reference.npy"))
    diff = float(np.abs(a - b).max())
    rows.append((f"re_ranking {dim}-d", f"{ref['seconds']:.1f} s", f"{ours['seconds']:.2f} s",
                 f"{ref['seconds'] / ours['seconds']:.1f}x",
                 f"max abs diff {diff:.1e}; peak RSS ref {ref['peak_rss_gb']:.2f} GiB, ours "
                 f"{ours['peak_rss_gb']:.2f} GiB (inputs {ours['rss_before_gb']:.2f} GiB)"))
  else:
    rows.append((f"re_ranking {dim}-d", "skipped", f"{ours['seconds']:.2f} s", "-",
                 f"peak RSS ours {ours['peak_rss_gb']:.2f} GiB (inputs "
                 f"{ours['rss_before_gb']:.2f} GiB)"))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--worker", default=None)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--dims", default="128,2048")
  p.add_argument("--skip_rerank", action="store_true")
  p.add_argument("--skip_rerank_reference", action="store_true")
  p.add_argument("--skip_1m", action="store_true")
  p.add_argument("--num_query", type=int, default=10_000)
  p.add_argument("--num_gallery", type=int, default=1_000_000)
  p.add_argument("--query_block", type=int, default=256)
  p.add_argument("--gallery_block", type=int, default=8192)
  args = p.parse_args()

  if args.worker:
    if args.worker.startswith("rerank_"):
      out = worker_rerank(args.worker[len("rerank_"):], args.data_dir)
    elif args.worker == "million":
      out = worker_million(args)
    else:
      out = worker_million_check(args)
    print(json.dumps(out))
    return

  import jax
  rows = []
  for dim in (int(d) for d in args.dims.split(",")):
    with tempfile.TemporaryDirectory() as tmp:
      bench_evaluate_rank(dim, rows, None if args.skip_rerank else tmp,
                          not args.skip_rerank_reference)
      print(rows[-1] if args.skip_rerank else rows[-2], flush=True)
      if not args.skip_rerank:
        print(rows[-1], flush=True)
  if not args.skip_1m:
    common = ["--num_query", str(args.num_query), "--num_gallery", str(args.num_gallery),
              "--query_block", str(args.query_block), "--gallery_block", str(args.gallery_block)]
    chk = run_worker(["--worker", "million_check"] + common)
    res = run_worker(["--worker", "million"] + common)
    rows.append((f"streaming {args.num_query:,} x {args.num_gallery:,} 128-d", "(no baseline)",
                 f"{res['seconds']:.1f} s", "-",
                 f"CPU time {res['cpu_seconds']:.0f} s; peak RSS {res['peak_rss_gb']:.2f} GiB (data {res['rss_data_gb']:.2f} GiB); "
                 f"R1 {res['rank1']:.3f} mAP {res['mAP']:.3f} mINP {res['mINP']:.3f}; 200-query"
                 f" slice vs full matrix: max abs diff {max(chk['max_cmc_diff'], chk['mAP_diff'], chk['mINP_diff']):.1e}"))
    print(rows[-1], flush=True)

  load = os.getloadavg()
  print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}, numpy {np.__version__}; "
        f"load average after run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  header = ("case", "numpy loop", "reid_jax", "speed-up", "notes")
  print("\n| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
  main()
