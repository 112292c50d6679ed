"""PUL outside training: the last round's checkpoints and its IDE embedder (the
round's K-way classifier read from the variables; nothing of any dataset is read)."""

from __future__ import annotations

import functools
from typing import Any

import ml_collections

from reid_jax.core import embedding, experiment, loop
from reid_jax.methods.classification import inference as ide_inference
from reid_jax.methods.pul import train


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The folder of the last round's checkpoints (the final model)."""
  return loop.stage_dir(workdir, train.round_name(int(config.pul.rounds)))


def run_embedder(config: ml_collections.ConfigDict, variables: Any, tta: str = ""
                 ) -> embedding.Embedder:
  """jitted images -> {'pul': L2-normalised IDE feature}, as the rounds evaluate."""
  classes = experiment.infer_classes(
      functools.partial(ide_inference.abstract_params, train.round_config(config)),
      variables["params"])
  return train.make_embedder(config, tta, classes)
