"""DaRe / TriNet outside training: the checkpoint folder and an embedder with the
run's test-time augmentation (no classifier, so nothing of the dataset is read)."""

from __future__ import annotations

from typing import Any

import ml_collections

from reid_jax.core import embedding, loop
from reid_jax.methods.dare import train


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """DaRe trains in one stage: `workdir/checkpoints`."""
  del config
  return loop.stage_dir(workdir)


def run_embedder(config: ml_collections.ConfigDict, variables: Any, tta: str = ""
                 ) -> embedding.Embedder:
  """jitted images -> {exit: embedding} (stage1..4 + fused for DaRe), TTA averaged."""
  del variables
  tta = embedding.check_tta(tta, "--tta")
  return embedding.with_tta(train.make_embedder(config), tta,
                            (config.input.height, config.input.width))
