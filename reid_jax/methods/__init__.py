"""Method registry: each method names the loss the shared train step optimises.

A loss function has the signature
  loss_fn(outputs: dict[str, Array], batch: dict[str, Array], cfg: ConfigDict)
    -> (scalar loss, dict of scalar metrics)
where `outputs` is the model's output dict (embeddings per exit, optional logits or
feature maps) and `batch` the (possibly globally gathered) input batch. New methods
(IDE classification, MSP-CNN Siamese losses, ...) register a function here and reuse
the train step, checkpointing and evaluation untouched.
"""

from __future__ import annotations

from typing import Callable

LOSSES: dict[str, Callable] = {}


def register_loss(name: str):
  """Decorator registering `fn` under `name` (the value of config.loss.name)."""
  def wrap(fn):
    LOSSES[name] = fn
    return fn
  return wrap


def get_loss(name: str) -> Callable:
  """Looks up a registered loss, importing the built-in methods first."""
  from reid_jax.methods import triplet  # noqa: F401  (registers "triplet")
  if name not in LOSSES:
    raise ValueError(f"config.loss.name={name!r} is not a registered loss; "
                     f"choose one of {sorted(LOSSES)}")
  return LOSSES[name]
