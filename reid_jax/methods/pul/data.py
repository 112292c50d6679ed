"""The unlabelled target domain as PUL's training path sees it.

Every read of the target training split on the training path goes through `Unlabelled`,
whose records carry the image and camera only, with `person_id` set to -1 ("unknown"):
the true identity is dropped when the record is read, so neither clustering nor
fine-tuning can see it. `PseudoLabelled` then exposes a round's reliable images with
their cluster (+1, so that ids >= 1 are training identities) as `person_id`. Only the
reporting code (`report.py`) reads the true labels, after a round.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reid_jax.core import embedding
from reid_jax.data import pipeline, sources

UNKNOWN = -1
_KEPT = ("image", "camera_id")


class Unlabelled:
  """Random-access view of a source whose records lose their identity on read.

  Records come back as {'image', 'camera_id', 'person_id': -1}; tfds sources are read
  as raw bytes and parsed (the image stays encoded, as in the training pipeline).
  """

  def __init__(self, source: Any):
    self._reader = pipeline.RecordReader(source)

  def __len__(self) -> int:
    return len(self._reader)

  def __getitems__(self, keys: Sequence[int]) -> list[dict]:
    return [{**{k: rec[k] for k in _KEPT}, "person_id": UNKNOWN}
            for rec in self._reader.read(list(keys))]

  def __getitem__(self, key: int) -> dict:
    return self.__getitems__([key])[0]


class PseudoLabelled:
  """The reliable images of a round with their cluster as identity (cluster + 1)."""

  def __init__(self, target: Unlabelled, indices: np.ndarray, clusters: np.ndarray):
    if len(indices) != len(clusters):
      raise ValueError("one cluster per reliable image expected")
    self.target = target
    self.indices = np.asarray(indices, np.int64)
    self.person_ids = np.asarray(clusters, np.int32) + 1

  def __len__(self) -> int:
    return len(self.indices)

  def labels(self) -> dict[str, np.ndarray]:
    """What the sampler reads (`pipeline.train_loader(labels=...)`)."""
    return {"person_id": self.person_ids}

  def __getitems__(self, keys: Sequence[int]) -> list[dict]:
    keys = [int(k) for k in keys]
    recs = self.target.__getitems__([int(self.indices[k]) for k in keys])
    return [{**r, "person_id": int(self.person_ids[k])} for r, k in zip(recs, keys)]

  def __getitem__(self, key: int) -> dict:
    return self.__getitems__([key])[0]


def open_target(config: ml_collections.ConfigDict) -> Unlabelled:
  """The target training split (`config.dataset`), identities dropped."""
  return Unlabelled(sources.open_split(config.dataset, config.dataset.train_split))


def embed_unlabelled(target: Unlabelled, embed: embedding.Embedder, variables: Any, *,
                     height: int, width: int, batch_size: int) -> np.ndarray:
  """[N, D] float32 features of every target image, in record order (no augmentation)."""
  loader = pipeline.eval_loader(target, height=height, width=width, batch_size=batch_size)
  out = []
  for batch in loader:
    feats = jax.device_get(embed(variables, jnp.asarray(batch["image"])))
    out.append(np.asarray(feats, np.float32)[np.asarray(batch["mask"], bool)])
  return np.concatenate(out)
