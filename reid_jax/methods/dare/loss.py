"""Multi-exit triplet loss: TriNet (one exit) and DaRe deep supervision (every exit).

DaRe (Wang et al., CVPR 2018, §3.2) sums the batch-hard soft-margin triplet loss of every
stage embedding and of the fused embedding; the ablation trains the fused one only.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from reid_jax.losses import triplet_loss

LOSSES = ("triplet",)  # config.loss.name values of this family
MINING = ("global", "device")


def parse_margin(margin) -> str | float:
  """'soft' stays soft; anything else (a float or a numeric string from a flag) is a hinge."""
  if isinstance(margin, str) and margin == "soft":
    return "soft"
  try:
    return float(margin)
  except (TypeError, ValueError):
    raise ValueError(f"config.loss.margin={margin!r}: use 'soft' or a number such as 0.2")


def multi_exit_triplet_loss(outputs: dict[str, jnp.ndarray], batch: dict[str, jnp.ndarray],
                            cfg: ml_collections.ConfigDict
                            ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Sum of triplet losses over `cfg.exits`; logs loss, active fraction and top-1 per exit."""
  margin = parse_margin(cfg.margin)
  valid = batch.get("mask")
  total = 0.0
  metrics = {}
  for name in cfg.exits:
    if name not in outputs:
      raise ValueError(f"config.loss.exits names {name!r} but the model outputs "
                       f"{sorted(outputs)}; fix config.loss.exits")
    loss, m = triplet_loss(outputs[name], batch["person_id"], cfg.kind, margin, valid)
    total = total + loss
    metrics[f"loss/{name}"] = loss
    metrics[f"active/{name}"] = m["active"]
    metrics[f"top1/{name}"] = m["top1"]
  return total, metrics
