"""Training identities as softmax classes: read from the dataset, never set by hand.

A class is the rank of an identity among the sorted training identities (ids >= 1;
distractors 0 and junk -1 are not classes). Shared by every method with a classifier.
"""

from __future__ import annotations

import functools
import json

import ml_collections
import numpy as np

from reid_jax.data import samplers as smp
from reid_jax.data import sources


@functools.lru_cache(maxsize=8)
def _train_ids(dataset_json: str) -> np.ndarray:
  cfg = ml_collections.ConfigDict(json.loads(dataset_json))
  labels = smp.read_labels(sources.open_split(cfg, cfg.train_split))
  pids = labels["person_id"]
  return np.unique(pids[pids >= 1]).astype(np.int32)


def train_identities(dataset: ml_collections.ConfigDict) -> np.ndarray:
  """Sorted identities of `dataset`'s training split (ids >= 1)."""
  return _train_ids(dataset.to_json())


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The softmax size: the training split's identity count (checked against the config)."""
  n = len(train_identities(config.dataset))
  if config.model.num_classes not in (0, n):
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but "
                     f"{sources.full_name(config.dataset)} has {n} training identities; "
                     "leave it 0 (it is read from the dataset)")
  return n


def class_labels(ids: np.ndarray, person_ids: np.ndarray) -> np.ndarray:
  """person_id -> class index (position in the sorted training identities `ids`)."""
  cls = np.searchsorted(ids, person_ids)
  ok = (cls < len(ids)) & (ids[np.minimum(cls, len(ids) - 1)] == person_ids)
  if not ok.all():
    raise ValueError(f"training batch holds identities {np.unique(person_ids[~ok])[:5]} "
                     "that are not training classes")
  return cls.astype(np.int32)
