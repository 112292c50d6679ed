"""Times PUL's clustering step (k-means, centres, reliable images) at Market-1501 size.

`python benchmarks/pul_kmeans.py [--n=12936] [--dim=512] [--k=750]` draws
Market-shaped features (751 identity centres + noise, L2-normalised: "random-ish"
points with cluster structure, as a trained model's features have) and times
scikit-learn's KMeans (Lloyd, k-means++, n_init=1 and the public code's n_init=10 if
--n_init=1,10) and MiniBatchKMeans, plus `reid_jax.methods.pul.clustering.select_reliable`,
one row per setting. Prints wall and CPU seconds and the number of Lloyd iterations.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def features(n: int, dim: int, ids: int, noise: float, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(ids, dim)).astype(np.float32)
  x = centres[rng.integers(0, ids, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=12_936)   # Market-1501 training images
  p.add_argument("--dim", type=int, default=512)    # IDE bottleneck
  p.add_argument("--k", type=int, default=750)      # PUL's NUM_CLUSTER for Market
  p.add_argument("--noise", type=float, default=1.5)
  p.add_argument("--n_init", default="1")
  p.add_argument("--minibatch", action="store_true")
  p.add_argument("--threads", type=int, default=0, help="OpenMP/BLAS threads (0: all)")
  a = p.parse_args()
  if a.threads:
    from threadpoolctl import threadpool_limits
    threadpool_limits(a.threads)
  from sklearn.cluster import KMeans, MiniBatchKMeans
  from reid_jax.methods.pul import clustering
  x = features(a.n, a.dim, 751, a.noise)
  print(f"{a.n} x {a.dim} points, k={a.k}, {os.cpu_count()} CPUs, threads "
        f"{a.threads or 'all'}, load average {os.getloadavg()[0]:.1f}")
  print(f"{'algorithm':<28}{'wall s':>9}{'cpu s':>9}{'iters':>7}")
  rows = [("KMeans", int(n)) for n in a.n_init.split(",")]
  if a.minibatch:
    rows.append(("MiniBatchKMeans", 3))
  for name, n_init in rows:
    cls = KMeans if name == "KMeans" else MiniBatchKMeans
    km = cls(n_clusters=a.k, n_init=n_init, random_state=0)
    t, c = time.perf_counter(), time.process_time()
    km.fit(x)
    print(f"{name + f' n_init={n_init}':<28}{time.perf_counter() - t:9.2f}"
          f"{time.process_time() - c:9.2f}{km.n_iter_:7d}", flush=True)
  t = time.perf_counter()
  res = clustering.cluster(x, a.k, seed=0, n_init=1)
  sel = clustering.select_reliable(x, res.assignment, res.distances, 0.85)
  print(f"{'clustering.cluster+select':<28}{time.perf_counter() - t:9.2f}{'':>9}"
        f"{'':>7}  reliable {int(sel.reliable.sum())}")


if __name__ == "__main__":
  main()
