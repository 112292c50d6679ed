"""faiss IndexIVFFlat against exact search: recall@10 and query time.

  python benchmarks/search_faiss.py --random=1000000          # clustered 128-d vectors
  python benchmarks/search_faiss.py --gallery=G.npz [--query=Q.npz] [--exit=fused]

Random data: 10,000 Gaussian centres in 128-d, each vector a centre + N(0, 0.7^2)
noise, 200 queries drawn the same way. Features files (python -m reid_jax.embed):
the query file's features, or 500 gallery rows as queries. Exact search is
`reid_jax.inference.search.exact_topk` (timed twice: the first call compiles).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from reid_jax.inference import images, search


def clustered(n: int, dim: int, centres: int, rng: np.random.Generator) -> np.ndarray:
  """n vectors around `centres` fixed centres (drawn once from rng's first call)."""
  c = np.random.default_rng(0).normal(size=(centres, dim)).astype(np.float32)
  out = np.empty((n, dim), np.float32)
  for s in range(0, n, 100_000):
    m = min(100_000, n - s)
    out[s:s + m] = c[rng.integers(0, centres, m)] + 0.7 * rng.normal(size=(m, dim))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--random", type=int, default=0, help="gallery size of random vectors")
  p.add_argument("--gallery", help="gallery features file")
  p.add_argument("--query", help="query features file (default: 500 gallery rows)")
  p.add_argument("--exit", default=None)
  p.add_argument("--nprobe", default="8,16,32,64,128")
  a = p.parse_args()
  rng = np.random.default_rng(1)
  if a.random:
    g, q = clustered(a.random, 128, 10_000, rng), clustered(200, 128, 10_000, rng)
  else:
    name, g = images.read_features(a.gallery, "--gallery").exit(a.exit)
    q = (images.read_features(a.query, "--query").exit(name)[1] if a.query
         else g[rng.choice(len(g), 500, replace=False)])
  t = time.perf_counter()
  exact, _ = search.exact_topk(q, g, 10)
  first = time.perf_counter() - t
  t = time.perf_counter()
  exact, _ = search.exact_topk(q, g, 10)
  again = time.perf_counter() - t
  print(f"gallery {g.shape}, {len(q)} queries; exact: {first:.2f} s (compiling), then "
        f"{again:.2f} s = {1000 * again / len(q):.2f} ms/query")
  t = time.perf_counter()
  index = search.FaissIVF(g)
  print(f"IndexIVFFlat nlist={index.nlist}: built in {time.perf_counter() - t:.1f} s")
  default = search.default_nprobe(index.nlist)
  for nprobe in sorted({default} | {int(x) for x in a.nprobe.split(",")}):
    if nprobe > index.nlist:
      continue
    t = time.perf_counter()
    idx, _ = index.search(q, 10, nprobe)
    took = time.perf_counter() - t
    print(f"  nprobe={nprobe}{' (default)' if nprobe == default else ''}: recall@10 "
          f"{search.recall_at_k(idx, exact):.3f}, {1000 * took / len(q):.3f} ms/query")


if __name__ == "__main__":
  main()
