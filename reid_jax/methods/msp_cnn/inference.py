"""MSP-CNN outside training: a checkpoint's folder and an embedder needing only the
run's config and variables (the class count comes from the saved classifier)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from reid_jax.core import embedding, experiment, loop
from reid_jax.methods.msp_cnn import train


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The folder of the last stage's checkpoints (stage 2 'ncc' when it ran)."""
  return loop.stage_dir(workdir, train.stage_names(config)[-1])


def abstract_params(config: ml_collections.ConfigDict, classes: int) -> Any:
  """Parameter shapes of the JSTL network with `classes` identities (no compute)."""
  model = train.build_model(config, classes)
  x = jnp.zeros((1, config.input.height, config.input.width, 3), jnp.float32)
  rng = jax.random.PRNGKey(0)
  return jax.eval_shape(functools.partial(model.init, train=False),
                        {"params": rng, "dropout": rng}, x)["params"]


def run_embedder(config: ml_collections.ConfigDict, variables: Any, tta: str = ""
                 ) -> embedding.Embedder:
  """jitted images -> {'msp_cnn': L2-normalised FC7}, as the method evaluates."""
  classes = experiment.infer_classes(functools.partial(abstract_params, config),
                                     variables["params"])
  return train.make_embedder(config, tta, classes=classes)
