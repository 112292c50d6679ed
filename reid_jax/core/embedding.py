"""Embedding a split with any method's embedder, with test-time augmentation.

An embedder is `embed(variables, images) -> {name: [B, D]}` (one entry per exit,
stripe set or feature a method exposes; jitted by the caller or here). The evaluators
rank whatever names come back.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reid_jax.data import pipeline, sources
from reid_jax.evaluation import tta as tta_lib

Embedder = Callable[[Any, jnp.ndarray], dict[str, jnp.ndarray]]
TTA_MODES = ("", "flip", "five_crop")
_BATCH_ONLY = ("image", "mask", "index")


def check_tta(tta: str, field: str = "config.eval.tta") -> str:
  """'' / 'none' / 'flip' / 'five_crop' -> the mode ('' for none); else a one-line error."""
  tta = "" if tta in ("none", None) else tta
  if tta not in TTA_MODES:
    raise ValueError(f"{field}={tta!r}: use none, flip or five_crop")
  return tta


def tta_views(x: jnp.ndarray, tta: str, out_hw: tuple[int, int]) -> list[jnp.ndarray]:
  """Test-time views of a batch: none, flip, or TriNet's 5 crops + flips (10 views)."""
  if not tta:
    return [x]
  if tta == "flip":
    return [x, tta_lib.flip(x)]
  if tta == "five_crop":
    return tta_lib.ten_crops(x, out_hw)
  raise ValueError(f"tta={tta!r}: use flip or five_crop")


def with_tta(embed: Embedder, tta: str, out_hw: tuple[int, int],
             combine: Callable[[list[jnp.ndarray]], jnp.ndarray] | None = None) -> Embedder:
  """jitted embedder averaging (or `combine`-ing) the embeddings of the TTA views."""
  combine = combine or (lambda a: jnp.mean(jnp.stack(a).astype(jnp.float32), 0))

  @jax.jit
  def embed_tta(variables, images):
    outs = [embed(variables, v) for v in tta_views(images, tta, out_hw)]
    return jax.tree_util.tree_map(lambda *a: combine(list(a)), *outs)
  return embed_tta


def load_size(config: ml_collections.ConfigDict, tta: str) -> tuple[int, int]:
  """The size images are loaded at: the input size, or x resize_scale for five_crop."""
  h, w = config.input.height, config.input.width
  if tta == "five_crop":  # TriNet: crops of the x1.125 image.
    s = config.input.augment.resize_scale
    return int(round(h * s)), int(round(w * s))
  return h, w


def embed_split(dataset: ml_collections.ConfigDict, split: str, embed: Embedder,
                variables: Any, *, height: int, width: int, batch_size: int
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Embeds every record of `split` once, in order.

  Returns (name -> [N, D] float32, label field -> [N]): the label fields are whatever
  integer fields the records carry (identity, camera, tracklet, ...).
  """
  source = sources.open_split(dataset, split)
  loader = pipeline.eval_loader(source, height=height, width=width, batch_size=batch_size)
  embs: dict[str, list] = {}
  labels: dict[str, list] = {}
  for batch in loader:
    out = jax.device_get(embed(variables, jnp.asarray(batch["image"])))
    keep = np.asarray(batch["mask"], bool)
    for k, v in out.items():
      embs.setdefault(k, []).append(np.asarray(v, np.float32)[keep])
    for k, v in batch.items():
      if k not in _BATCH_ONLY:
        labels.setdefault(k, []).append(np.asarray(v)[keep])
  return ({k: np.concatenate(v) for k, v in embs.items()},
          {k: np.concatenate(v) for k, v in labels.items()})
