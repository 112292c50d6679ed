"""APR, attribute-person recognition (Lin, Zheng, Zheng, Wu, Hu & Yang, "Improving
Person Re-identification by Attribute and Identity Learning", Pattern Recognition 2019):
the IDE network plus one softmax classifier per attribute on the pooled feature;
loss = lambda * ID loss + the mean of the 27 attribute losses. Market-1501's
identity-level attributes: `--config.dataset.attributes=PATH/market_attribute.mat`
(the authors' Market-1501_Attribute release). Evaluation adds per-attribute and mean
accuracy on the gallery images of the test identities. Reported: Market 87.0 / 66.9.

Variants: synthetic (deterministic random attributes per identity), mobilenetv2,
market_cpu.
"""

from __future__ import annotations

import ml_collections

from configs import ide
from reid_jax import config_lib as common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = common.parse_variants(variant)
  # The IDE recipe (configs/ide.py) for everything APR does not change.
  c = ide.get_config(",".join(v for v in variants if v != "synthetic"))
  c.method = "apr"
  # lambda = 8: the ID loss weight of APR (Lin et al. 2019, §4.2, as we read it; the
  # attribute losses are averaged over the M = 27 attributes).
  c.loss.id_weight = 8.0
  # Not in the paper: the total is divided by (lambda + 1), so the ID term moves at about
  # the IDE recipe's rate. With lambda = 8 at IDE's lr 0.05 (no division) the run
  # diverged on Market-1501: ID loss 15.1 (> ln 751 = 6.6) at step 50 (measured).
  c.loss.normalize_weights = True
  c.dataset.attributes = ""
  if "synthetic" in variants:
    common.classification_synthetic(c)
    c.dataset.attributes = "synthetic"
  return c
