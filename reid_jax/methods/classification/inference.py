"""The classification family's model outside training: a checkpoint's folder and an
embedder that needs nothing of the run but its config and variables (the class count
comes from the saved classifier, not from the training split)."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from reid_jax.core import embedding, experiment, loop
from reid_jax.methods.classification import train


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The folder of the checkpoints that hold the final model (the last stage's)."""
  return loop.stage_dir(workdir, train.stage_names(config)[-1] or None)


def abstract_params(config: ml_collections.ConfigDict, classes: int) -> Any:
  """Parameter shapes of the method's model with `classes` identities (no compute)."""
  model = train.build_model(config, classes)
  x = jnp.zeros((1, config.input.height, config.input.width, 3), jnp.float32)
  init = functools.partial(model.init, train=False)
  rng = jax.random.PRNGKey(0)
  return jax.eval_shape(init, {"params": rng, "dropout": rng}, x)["params"]


def run_embedder(config: ml_collections.ConfigDict, variables: Any, tta: str = ""
                 ) -> embedding.Embedder:
  """jitted images -> {exit: L2-normalised feature}, as the method evaluates."""
  classes = experiment.infer_classes(functools.partial(abstract_params, config),
                                     variables["params"])
  return train.make_embedder(config, tta, classes=classes)
