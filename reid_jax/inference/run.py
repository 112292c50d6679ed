"""A trained run, loaded from its workdir alone: the saved config, the final
checkpoint's variables and the method's embedder.

Everything comes from the run (image size, normalisation, model, test-time
augmentation), never from the user's memory, and nothing of the training dataset is
read: a run copied to another machine without its data still embeds images.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from reid_jax import methods
from reid_jax.core import embedding, experiment

CONFIG_NAME = "config.json"


@dataclasses.dataclass
class Run:
  """A loaded run. `embed(images)` maps normalised float32 [B, H, W, 3] images to
  {exit: [B, D] float32}, the features its evaluation ranks (Euclidean distance)."""

  workdir: str
  config: ml_collections.ConfigDict
  step: int
  variables: Any
  tta: str
  _embed: embedding.Embedder

  @property
  def method(self) -> str:
    return self.config.method

  @property
  def input_hw(self) -> tuple[int, int]:
    """The run's training input size (height, width)."""
    return int(self.config.input.height), int(self.config.input.width)

  def input_size(self, height: int, width: int) -> tuple[int, int]:
    """The size an image of height x width is embedded at, as in the run's evaluation:
    the run's input size, or the image's own rounded size for methods that embed each
    image at its own size (Re-ID done right). With five_crop TTA the images are loaded
    at x `input.augment.resize_scale` and cropped by the embedder, as evaluation does."""
    family = methods.get(self.method)
    fn = getattr(family, "input_size", None)
    return fn(self.config, height, width) if fn else embedding.load_size(self.config, self.tta)

  def embed(self, images: np.ndarray) -> dict[str, np.ndarray]:
    out = self._embed(self.variables, jnp.asarray(images, jnp.float32))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}

  def identity(self) -> dict[str, Any]:
    """What a features file records of its run, to refuse mixing two runs' features."""
    return {"workdir": os.path.abspath(self.workdir), "method": self.method,
            "step": int(self.step), "model": json.loads(self.config.model.to_json()),
            "input_hw": list(self.input_hw), "tta": self.tta}


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir/config.json` (one-line errors)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir}: no such folder; pass the --workdir of a "
                            "training run (python -m reid_jax.train --workdir=...)")
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir (a run "
                            "writes its config.json when it starts)")
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}); restore it from the "
                     "run's backup or retrain") from None
  method = config.get("method", "")
  if method not in methods.METHODS:
    raise ValueError(f"{path}: config.method={method!r} is not a method this version of "
                     f"reid_jax knows ({sorted(methods.METHODS)}); use the reid_jax version "
                     "that trained it")
  return config


def load_run(workdir: str, checkpoint: int | None = None, tta: str | None = None) -> Run:
  """Loads `workdir`'s config, checkpoint `checkpoint` (default newest) of its final
  stage and the method's embedder; `tta` defaults to the run's `eval.tta`."""
  config = load_config(workdir)
  family = methods.get(config.method)
  ckpt_dir = family.checkpoint_dir(config, workdir)
  variables, step = experiment.restore_variables(ckpt_dir, None, checkpoint)
  tta = embedding.check_tta(config.eval.get("tta", "") if tta is None else tta, "--tta")
  try:
    embed = family.run_embedder(config, variables, tta)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{workdir}: the checkpoint does not fit the model of its "
                     f"config.json ({type(e).__name__}: {e}); was config.json edited?"
                     ) from None
  return Run(workdir=workdir, config=config, step=step, variables=variables, tta=tta,
             _embed=embed)
