"""TriNet (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss", 2017): one exit
(FC1024-BN-ReLU-FC128 after the last stage), batch-hard soft-margin triplet loss.

Variants (`configs/trinet.py:VARIANT[,...]`): synthetic, mobilenetv2, resnet18,
resnet34, resnet50 (default), stages1/stages2/stages3 (backbone cut after that stage),
market_cpu. The sequential-ensemble baseline of DaRe §4.1 is resnet18, resnet34,
resnet50 (the paper's); with the ImageNet MobileNetV2 on hand it is mobilenetv2 cut
after stages 1, 2, 3 and whole (the four depths DaRe's exits see).
"""

from __future__ import annotations

import ml_collections

from reid_jax import config_lib as common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.method = "trinet"
  config.dataset.name = "market1501"
  # §4.2 / Table 4 of Hermans et al.: 256x128 from 288x144 random crops, flips, P=18 K=4.
  config.input.height = 256
  config.input.width = 128
  config.input.augment.resize_scale = 1.125
  config.input.augment.flip_prob = 0.5
  config.input.augment.erasing_prob = 0.0  # TriNet used no random erasing.
  config.input.P = 18
  config.input.K = 4
  config.model.backbone = "resnet50"  # TriNet: ImageNet ResNet-50.
  config.model.pretrained = "imagenet"  # TriNet fine-tunes an ImageNet ResNet-50
  config.model.head = "trinet"
  config.model.hidden_dim = 1024
  config.model.embed_dim = 128
  config.loss.name = "triplet"
  config.loss.kind = "batch_hard"
  config.loss.margin = "soft"
  config.loss.exits = ("final",)
  # Hermans et al. §4.2: 25,000 iterations, decay from 15,000.
  config.train.steps = 25_000
  config.optimizer.decay_start = 15_000
  for v in common.parse_variants(variant):
    if v == "synthetic":
      common.synthetic_overrides(config)
    elif v == "mobilenetv2":
      config.model.backbone = "mobilenetv2"
      config.model.pretrained = "imagenet"  # the Gluon weights (reid_jax.pretrained)
    elif v in ("resnet18", "resnet34", "resnet50", "resnet101"):
      config.model.backbone = v
    elif v in ("stages1", "stages2", "stages3"):
      config.model.num_stages = int(v[-1])
    elif v == "market_cpu":
      common.market_cpu_overrides(config)
    else:
      raise ValueError(f"unknown configs/trinet.py variant {v!r}; choose from synthetic, "
                       "mobilenetv2, resnet18, resnet34, resnet50, resnet101, stages1, "
                       "stages2, stages3, market_cpu")
  return config
