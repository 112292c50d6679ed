"""Deep Anytime Re-ID (DaRe): Wang et al., "Resource Aware Person Re-identification
across Multiple Resolutions", CVPR 2018. Paper settings for Market-1501 with ResNet-50.

Variants: `--config=configs/dare.py:VARIANT[,VARIANT...]`
  synthetic            small ResNet on the embedded synthetic dataset (CPU, minutes)
  mobilenetv2          ImageNet MobileNetV2 1.0 backbone (Gluon weights, see README)
  densenet201          DaRe(De): DenseNet-201 backbone
  no_deep_supervision  ablation: triplet loss on the fused embedding only (§5.2)
  market_cpu           reduced budget for a 2-core CPU: 64x32 input, last_stride=1,
                       2,000 steps at lr 1e-3 (see config_lib.market_cpu_overrides)
"""

from __future__ import annotations

import ml_collections

from reid_jax import config_lib as common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.method = "dare"

  config.dataset.name = "market1501"  # §5: Market-1501, also MARS, CUHK03, DukeMTMC-reID

  # §5.1 / TriNet preprocessing: images resized to 256x128 x1.125 = 288x144, random
  # 256x128 crop, horizontal flip; random erasing (Zhong et al. 2017) gives the paper's
  # "+RE" row (Table 1: 88.5 rank-1 / 74.2 mAP).
  config.input.height = 256
  config.input.width = 128
  config.input.augment.resize_scale = 1.125
  config.input.augment.flip_prob = 0.5
  config.input.augment.erasing_prob = 0.5
  # §5.1: batches of P=18 identities x K=4 images (TriNet's batch-hard sampling).
  config.input.P = 18
  config.input.K = 4

  # §3.1: ResNet-50 backbone; after each of the 4 stages GAP + FC1024 + BN + ReLU + FC128;
  # fused embedding = learned weighted sum of the stage embeddings.
  config.model.backbone = "resnet50"
  config.model.pretrained = "imagenet"  # the paper fine-tunes ImageNet-trained backbones
  config.model.head = "dare"
  config.model.hidden_dim = 1024
  config.model.embed_dim = 128

  # §3.2: batch-hard triplet loss with soft margin on every exit plus the fusion.
  config.loss.name = "triplet"
  config.loss.kind = "batch_hard"
  config.loss.margin = "soft"
  config.loss.exits = ("stage1", "stage2", "stage3", "stage4", "fused")

  # Official DaRe code (github.com/mileyan/DARENet): Adam lr 3e-4, 60k iterations,
  # exponential decay to 3e-7 from iteration 30k, beta1 0.9 -> 0.5 (TriNet schedule).
  config.train.steps = 60_000
  config.optimizer.decay_start = 30_000

  for v in common.parse_variants(variant):
    _apply_variant(config, v)
  return config


def _apply_variant(config: ml_collections.ConfigDict, v: str) -> None:
  if v == "synthetic":
    common.synthetic_overrides(config)
  elif v == "mobilenetv2":
    config.model.backbone = "mobilenetv2"
    config.model.pretrained = "imagenet"  # the Gluon weights (reid_jax.pretrained)
  elif v == "densenet201":
    config.model.backbone = "densenet201"  # DaRe(De), §5.
  elif v == "no_deep_supervision":
    config.loss.exits = ("fused",)  # §5.2 ablation.
  elif v == "market_cpu":
    common.market_cpu_overrides(config)
  else:
    raise ValueError(f"unknown configs/dare.py variant {v!r}; choose from synthetic, "
                     "mobilenetv2, densenet201, no_deep_supervision, market_cpu")
