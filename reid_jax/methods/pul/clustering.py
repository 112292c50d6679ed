"""PUL's clustering step (Fan et al., TOMM 2018; public code PUL/unsupervised.py).

k-means groups the target features into K clusters; each cluster's centre is the image
nearest its centroid (`np.argmin(kmeans.transform(features), axis=0)` in the public
code, over all images); an image is reliable when the cosine similarity of its feature
to a centre exceeds lambda. Only reliable images are fine-tuned on, with their cluster
as the label. A round's result (`PseudoLabels`) is saved atomically beside the round's
checkpoints and read back on resume, so a resumed run never clusters again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

RULES = ("own", "any")
_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class Clusters:
  """k-means result: cluster of every image, and each cluster's centre image."""
  assignment: np.ndarray   # [N] int32, cluster index in [0, K)
  centres: np.ndarray      # [K] int64, index of the image nearest each centroid
  iterations: int


def cluster(features: np.ndarray, k: int, *, seed: int, n_init: int = 1,
            max_iter: int = 300, tol: float = 1e-4) -> Clusters:
  """scikit-learn KMeans (Lloyd, k-means++ seeding, `random_state=seed`) into `k`
  clusters; centre of a cluster = the image nearest its centroid (Euclidean, as
  `kmeans.transform`), found in blocks so no [N, K] matrix is kept for large N."""
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  x = np.asarray(features, np.float32)
  if not 1 <= k <= len(x):
    raise ValueError(f"config.pul.num_clusters={k}: must be in [1, {len(x)}] (the number "
                     "of target training images)")
  km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=tol, random_state=seed)
  assignment = km.fit_predict(x).astype(np.int32)
  best = np.full(k, np.inf)
  centres = np.zeros(k, np.int64)
  for start in range(0, len(x), _CHUNK):
    d = km.transform(x[start:start + _CHUNK])  # [n, K] distances to the centroids
    i = np.argmin(d, axis=0)
    better = d[i, np.arange(k)] < best  # strict: the first image wins ties, as argmin
    best[better] = d[i, np.arange(k)][better]
    centres[better] = start + i[better]
  return Clusters(assignment=assignment, centres=centres, iterations=int(km.n_iter_))


def l2n(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class Selection:
  similarity: np.ndarray  # [N] cosine similarity to the own cluster's centre
  reliable: np.ndarray    # [N] bool


def select_reliable(features: np.ndarray, assignment: np.ndarray, centres: np.ndarray,
                    lam: float, rule: str = "own") -> Selection:
  """Reliable images: cosine similarity to their own cluster's centre > `lam` (rule
  'own': the paper's selection step), or to any centre > `lam` (rule 'any': the public code's
  `np.unique(np.argwhere(similarities > LAMBDA)[:, 1])`); labels stay the own cluster."""
  if rule not in RULES:
    raise ValueError(f"config.pul.reliable_rule={rule!r}: use 'own' (similar to its own "
                     "cluster's centre, the paper) or 'any' (to any centre, the public code)")
  f = l2n(features)
  c = f[np.asarray(centres)]
  own = np.einsum("nd,nd->n", f, c[np.asarray(assignment)])
  if rule == "own":
    return Selection(similarity=own, reliable=own > lam)
  best = np.full(len(f), -np.inf, np.float32)
  for start in range(0, len(f), _CHUNK):
    best[start:start + _CHUNK] = (f[start:start + _CHUNK] @ c.T).max(axis=1)
  return Selection(similarity=own, reliable=best > lam)


def purity(assignment: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None
           ) -> float:
  """sum over clusters of the largest true-label count in it / number of images
  (over the images of `mask`, default all); NaN when `mask` selects none."""
  a, t = np.asarray(assignment), np.asarray(truth)
  if mask is not None:
    a, t = a[np.asarray(mask, bool)], t[np.asarray(mask, bool)]
  if not len(a):
    return float("nan")
  pairs, counts = np.unique(np.stack([a, t]), axis=1, return_counts=True)
  best = np.zeros(int(a.max()) + 1, np.int64)
  np.maximum.at(best, pairs[0], counts)
  return float(best.sum() / len(a))


# ----------------------------------------------------------------------------- files


@dataclasses.dataclass(frozen=True)
class PseudoLabels:
  """One round's clustering, as saved: what the round trains on and how it was made."""
  assignment: np.ndarray   # [N] int32 cluster of every target training image
  centres: np.ndarray      # [K] int64
  similarity: np.ndarray   # [N] float32
  reliable: np.ndarray     # [N] bool
  settings: dict           # num_clusters, lam, rule, feature, seed, num_images

  @property
  def indices(self) -> np.ndarray:
    """Target record numbers of the reliable images (what the round trains on)."""
    return np.flatnonzero(self.reliable)

  @property
  def labels(self) -> np.ndarray:
    """Cluster index of each reliable image (the round's class labels)."""
    return self.assignment[self.reliable]


def labels_path(stage_dir: str) -> str:
  """Beside the round's checkpoint folder: `checkpoints/round_01.pseudo_labels.npz`."""
  return stage_dir.rstrip(os.sep) + ".pseudo_labels.npz"


def save(path: str, labels: PseudoLabels) -> None:
  """Writes `path` atomically (a temporary file in the same folder, then os.replace)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".pseudo_labels.", suffix=".npz",
                             dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, assignment=labels.assignment, centres=labels.centres,
               similarity=labels.similarity, reliable=labels.reliable,
               settings=np.array(json.dumps(labels.settings, sort_keys=True)))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def load(path: str, settings: dict) -> PseudoLabels:
  """Reads a round's pseudo-labels; settings that differ from the saved ones (another
  K, lambda, rule, feature, seed or target) are a one-line error."""
  with np.load(path) as z:
    out = PseudoLabels(assignment=z["assignment"], centres=z["centres"],
                       similarity=z["similarity"], reliable=z["reliable"],
                       settings=json.loads(str(z["settings"])))
  if out.settings != settings:
    diff = sorted(k for k in set(settings) | set(out.settings)
                  if settings.get(k) != out.settings.get(k))
    what = ", ".join(f"{k}: saved {out.settings.get(k)!r}, now {settings.get(k)!r}"
                     for k in diff)
    raise ValueError(f"{path} was clustered with other settings ({what}); use the config "
                     "that made it or a new --workdir")
  return out
