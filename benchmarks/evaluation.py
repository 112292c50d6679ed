"""Benchmark of reid_jax.evaluation against per-query / loop-by-loop numpy baselines.

    python benchmarks/evaluation.py                 # everything (~15-25 min on 2 cores)
    python benchmarks/evaluation.py --skip_rerank_reference --skip_1m   # quick look
    # Market-scale re-ranking and evaluate_rank, before/after, with phase times
    # (the reference loop's output is cached in --cache_dir after the first run):
    git show HEAD:reid_jax/evaluation/rerank.py > /tmp/rerank_before.py
    git show HEAD:reid_jax/evaluation/metrics.py > /tmp/metrics_before.py
    python benchmarks/evaluation.py --dims=128 --skip_1m --phases --cache_dir=/tmp/eval_cache \
        --before_rerank=/tmp/rerank_before.py --before_metrics=/tmp/metrics_before.py

Prints one table, side by side, on Market-scale random data (3,368 queries,
19,732 gallery items: 750 identities in 6 cameras, 2,793 id-0 distractors,
3,819 id -1 junk; 128-d and 2048-d embeddings = identity centre + camera bias +
noise):
  * evaluate_rank: torchreid-style per-query numpy loop vs ours (identical to 1e-6);
  * re-ranking: the published algorithm item by item (per-row numpy loops) vs
    ours, from the three distance matrices and from the embeddings (the
    low-memory path), each in its own process for peak memory (max RSS,
    inputs included);
  * the streaming exact evaluator on 10,000 queries x 1,000,000 gallery items
    at 128-d (no [Q, G] matrix), plus a check that it equals `evaluate_rank` on
    the full matrix for a 200-query slice.
Times are wall-clock and process CPU time (all threads; on a machine shared
with other jobs wall time is inflated, CPU time much less so): the first run
in a fresh process ("cold": includes first-touch page faults of the output),
and the minimum over --repeats runs. --before_rerank / --before_metrics load
another implementation (a file with the same functions, e.g. an older
revision) and add its rows, for before/after tables; --phases adds the time of
each re-ranking phase (neighbour search, k-reciprocal sets, V weights, local
query expansion, Jaccard, final combination).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
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


def _cpu_seconds() -> float:
  use = resource.getrusage(resource.RUSAGE_SELF)
  return use.ru_utime + use.ru_stime


def load_impl(path: str | None, name: str):
  """The library module reid_jax.evaluation.<name>, or the same from another file."""
  if not path:
    return importlib.import_module(f"reid_jax.evaluation.{name}")
  spec = importlib.util.spec_from_file_location(f"reid_jax.evaluation._bench_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# Re-ranking phases: (label, functions whose exclusive time it is). What no
# function covers (input checks, normalisation, the neighbour search itself in
# older revisions, distances on device in the embeddings path) is "neighbour search".
PHASES = (("k-reciprocal sets", ("k_reciprocal_sets",)),
          ("V weights", ("encode",)),
          ("local query expansion", ("query_expansion",)),
          ("Jaccard", ("jaccard_terms", "jaccard_sums", "jaccard_rows")),
          ("final combination", ("_final",)))


class PhaseTimer:
  """Wraps module functions; exclusive wall / CPU seconds per function."""

  def __init__(self, mod):
    self.stats: dict[str, list[float]] = {}
    self._stack: list[list[float]] = []
    for _, names in PHASES:
      for name in names:
        if hasattr(mod, name):
          setattr(mod, name, self._wrap(name, getattr(mod, name)))

  def _wrap(self, name, fn):
    @functools.wraps(fn)
    def timed(*a, **k):
      self._stack.append([0.0, 0.0])
      t0, c0 = time.perf_counter(), _cpu_seconds()
      try:
        return fn(*a, **k)
      finally:
        dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
        child = self._stack.pop()
        s = self.stats.setdefault(name, [0.0, 0.0])
        s[0] += dt - child[0]
        s[1] += dc - child[1]
        if self._stack:
          self._stack[-1][0] += dt
          self._stack[-1][1] += dc
    return timed

  def phases(self, wall: float, cpu: float) -> dict[str, list[float]]:
    out = {}
    for label, names in PHASES:
      got = [self.stats[n] for n in names if n in self.stats]
      if got:
        out[label] = [sum(g[0] for g in got), sum(g[1] for g in got)]
    out = {"neighbour search": [wall - sum(v[0] for v in out.values()),
                                cpu - sum(v[1] for v in out.values())], **out}
    self.stats.clear()
    return out


def worker_rerank(method: str, data_dir: str, args) -> dict:
  """re_ranking ("ref", "ours", "before") or re_ranking_from_embeddings ("emb_*")."""
  emb = method.startswith("emb_")
  if emb:
    lab = np.load(os.path.join(data_dir, "emb.npz"))
    inputs = (lab["q"], lab["g"])
  else:
    inputs = tuple(np.load(os.path.join(data_dir, f"{n}.npy")) for n in ("qg", "qq", "gg"))
  mod = load_impl(args.before_rerank if method.endswith("before") else None, "rerank")
  start_rss = _peak_rss_gb()  # inputs + interpreter + numpy/scipy/JAX
  timer = None
  if method == "reference":
    fn = loop_re_ranking
    repeats = 1
  else:
    timer = PhaseTimer(mod) if args.phases else None
    fn = mod.re_ranking_from_embeddings if emb else mod.re_ranking
    if args.threads and "num_threads" in fn.__code__.co_varnames:
      fn = functools.partial(fn, num_threads=args.threads)
    repeats = args.repeats
  runs, phases = [], []
  out = None
  for _ in range(repeats):
    out = None  # the previous output is freed first
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = fn(*inputs)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    runs.append((wall, cpu))
    if timer is not None:
      phases.append(timer.phases(wall, cpu))
    if len(runs) == 1:
      peak = _peak_rss_gb()
      np.save(os.path.join(data_dir, f"rr_{method}.npy"), out)
  return {"runs": runs, "peak_rss_gb": peak, "rss_before_gb": start_rss, "phases": phases,
          "load": os.getloadavg()[0]}


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


def _fmt_runs(runs) -> str:
  runs = np.asarray(runs)
  return (f"{runs[0, 0]:.2f} s wall / {runs[0, 1]:.2f} s CPU cold; best of {len(runs)}: "
          f"{runs[:, 0].min():.2f} s wall / {runs[:, 1].min():.2f} s CPU")


def _time_evaluate(fn, args, repeats: int):
  runs, res = [], None
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), _cpu_seconds()
    res = fn(*args)
    runs.append((time.perf_counter() - t0, _cpu_seconds() - c0))
  return res, np.asarray(runs)


def _metrics_diff(a: dict, b: dict) -> float:
  return max(float(np.abs(a["cmc"] - b["cmc"]).max()), abs(a["mAP"] - b["mAP"]),
             abs(a["mINP"] - b["mINP"]))


def bench_evaluate_rank(dim: int, rows: list, data_dir: str | None, do_rerank_ref: bool,
                        args, phase_lines: list):
  from reid_jax.evaluation import pairwise_distance
  q, g, qp, gp, qc, gc = market_like(dim)
  t0 = time.perf_counter()
  dist = pairwise_distance(q, g)
  t_dist = time.perf_counter() - t0
  t0 = time.perf_counter()
  ref = loop_evaluate(dist, qp, gp, qc, gc)
  t_loop = time.perf_counter() - t0
  impls = [("ours", load_impl(None, "metrics"))]
  if args.before_metrics:
    impls.insert(0, ("before", load_impl(args.before_metrics, "metrics")))
  results = {}
  for name, mod in impls:
    fn = mod.evaluate_rank
    if args.threads and "num_threads" in fn.__code__.co_varnames:
      fn = functools.partial(fn, num_threads=args.threads)
    results[name], runs = _time_evaluate(fn, (dist, qp, gp, qc, gc), max(3, args.repeats))
    res = results[name]
    same = ""
    if name == "ours" and "before" in results:
      b = results["before"]
      same = ("; identical to before" if np.array_equal(res["cmc"], b["cmc"]) and
              res["mAP"] == b["mAP"] and res["mINP"] == b["mINP"] else "; DIFFERS from before")
    best = runs[:, 0].min()
    rows.append((f"evaluate_rank {dim}-d ({name})", f"{t_loop:.2f} s", f"{best:.3f} s",
                 f"{t_loop / best:.1f}x",
                 f"best of {len(runs)}; CPU {runs[:, 1].min():.3f} s (median wall "
                 f"{np.median(runs[:, 0]):.3f} s); max abs diff {_metrics_diff(res, ref):.1e}"
                 f"{same}; R1 {res['cmc'][0]:.3f} mAP {res['mAP']:.3f} mINP {res['mINP']:.3f};"
                 f" distances {t_dist:.2f} s"))
  if data_dir is None:
    return
  have = all(os.path.exists(os.path.join(data_dir, f"{n}.npy")) for n in ("qg", "qq", "gg"))
  if not have:
    np.save(os.path.join(data_dir, "qg.npy"), dist)
    np.save(os.path.join(data_dir, "qq.npy"), pairwise_distance(q, q))
    np.save(os.path.join(data_dir, "gg.npy"), pairwise_distance(g, g))
  np.savez(os.path.join(data_dir, "emb.npz"), q=q, g=g)
  del dist
  ref_path = os.path.join(data_dir, "rr_reference.npy")
  ref_json = os.path.join(data_dir, "reference.json")
  ref_out, ref_secs = None, None
  if do_rerank_ref and not os.path.exists(ref_json):
    r = run_worker(["--worker", "rerank_reference", "--data_dir", data_dir])
    with open(ref_json, "w") as f:
      json.dump(r, f)
  if os.path.exists(ref_json):  # computed now, or cached in --cache_dir
    with open(ref_json) as f:
      r = json.load(f)
    ref_out, ref_secs = np.load(ref_path), r["runs"][0][0]
    rows.append((f"re_ranking {dim}-d reference loop", f"{ref_secs:.1f} s", "-", "-",
                 f"{r['runs'][0][1]:.1f} s CPU; peak RSS {r['peak_rss_gb']:.2f} GiB (inputs "
                 f"{r['rss_before_gb']:.2f} GiB)"))
  flags = ["--data_dir", data_dir, "--repeats", str(args.repeats)]
  flags += ["--phases"] if args.phases else []
  flags += ["--threads", str(args.threads)] if args.threads else []
  flags += ["--before_rerank", args.before_rerank] if args.before_rerank else []
  methods = (["before"] if args.before_rerank else []) + ["ours"]
  if not args.skip_embeddings:
    methods += (["emb_before"] if args.before_rerank else []) + ["emb_ours"]
  for method in methods:
    r = run_worker(["--worker", f"rerank_{method}"] + flags)
    runs = np.asarray(r["runs"])
    diff = ""
    if ref_out is not None:
      got = np.load(os.path.join(data_dir, f"rr_{method}.npy"))
      diff = f"max abs diff {np.abs(got - ref_out).max():.1e}; "
    path = "embeddings" if method.startswith("emb_") else "distances"
    label = f"re_ranking {dim}-d, {path} ({method.split('_')[-1]})"
    best = runs[:, 0].min()
    rows.append((label, f"{ref_secs:.1f} s" if ref_secs else "-", f"{best:.2f} s",
                 f"{ref_secs / best:.1f}x" if ref_secs else "-",
                 f"{diff}{_fmt_runs(runs)}; peak RSS {r['peak_rss_gb']:.2f} GiB (before the "
                 f"call {r['rss_before_gb']:.2f} GiB); load {r['load']:.1f}"))
    if r["phases"]:
      ph = r["phases"]
      best_i = int(np.argmin(runs[:, 1]))
      cells = "; ".join(f"{k} {v[0]:.2f} s / {v[1]:.2f} s CPU" for k, v in ph[best_i].items())
      phase_lines.append(f"{label}, run {best_i + 1} of {len(ph)} (least CPU): {cells}")


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
  p.add_argument("--repeats", type=int, default=3, help="timed runs of each case")
  p.add_argument("--threads", type=int, default=0,
                 help="num_threads for re_ranking / evaluate_rank (0: their default)")
  p.add_argument("--phases", action="store_true", help="time each re-ranking phase")
  p.add_argument("--before_rerank", default="",
                 help="another rerank.py (e.g. from git show) to time beside ours")
  p.add_argument("--before_metrics", default="",
                 help="another metrics.py to time beside ours (evaluate_rank)")
  p.add_argument("--skip_embeddings", action="store_true",
                 help="skip re_ranking_from_embeddings (the low-memory path)")
  p.add_argument("--cache_dir", default="",
                 help="keep the distance matrices and the reference re-ranking output here")
  args = p.parse_args()

  if args.worker:
    if args.worker.startswith("rerank_"):
      out = worker_rerank(args.worker[len("rerank_"):], args.data_dir, args)
    elif args.worker == "million":
      out = worker_million(args)
    else:
      out = worker_million_check(args)
    print(json.dumps(out))
    return

  import jax
  rows, phase_lines = [], []
  for dim in (int(d) for d in args.dims.split(",")):
    with tempfile.TemporaryDirectory() as tmp:
      data_dir = os.path.join(args.cache_dir, f"{dim}d") if args.cache_dir else tmp
      os.makedirs(data_dir, exist_ok=True)
      n0 = len(rows)
      bench_evaluate_rank(dim, rows, None if args.skip_rerank else data_dir,
                          not args.skip_rerank_reference, args, phase_lines)
      for r in rows[n0:]:
        print(r, flush=True)
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
  header = ("case", "numpy loop", "reid_jax (best wall)", "speed-up", "notes")
  print("\n| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    print("| " + " | ".join(r) + " |")
  if phase_lines:
    print("\nRe-ranking phases (wall / CPU; neighbour search = all not in another phase):")
    for line in phase_lines:
      print("  * " + line)


if __name__ == "__main__":
  main()
