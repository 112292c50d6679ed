"""Re-ID done right outside training: the ranking stage's checkpoints and its
embedder (the ranking model has no classifier, so nothing of the dataset is read)."""

from __future__ import annotations

from typing import Any

import ml_collections

from reid_jax.core import embedding, loop
from reid_jax.methods.done_right import sizes, train


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The ranking stage's checkpoint folder (the final model)."""
  return loop.stage_dir(workdir, "ranking")


def run_embedder(config: ml_collections.ConfigDict, variables: Any, tta: str = ""
                 ) -> embedding.Embedder:
  """jitted images -> {'done_right': FC + l2, 'gmp': l2 of the pooled map}."""
  del variables  # the ranking model's shapes do not depend on the dataset
  return train.make_embedder(config, tta, "ranking")


def input_size(config: ml_collections.ConfigDict, height: int, width: int
               ) -> tuple[int, int]:
  """The size an image of `height` x `width` is embedded at: its own size rounded as in
  evaluation (longer side `input.longer_side`, sides multiples of `size_multiple`)."""
  inp = config.input
  return sizes.target_shape(height, width, inp.longer_side, inp.size_multiple,
                                  train.min_side(config))
