"""IDE, the ID-discriminative embedding (Zheng, Yang & Hauptmann 2016, arXiv 1610.02984),
with the recipe of the public Person_reID_baseline_pytorch (layumi; `train.py`,
`model.py`): ImageNet ResNet-50, GAP, Linear 2048->512 + BatchNorm -> Dropout 0.5 ->
softmax over the training identities; test feature = BN feature of image + mirror,
L2-normalised (cosine). That baseline reports Market-1501 88.84 rank-1 / 71.59 mAP
(ResNet-50, --train_all); the original IDE paper 73.9 / 47.8.

Variants (`configs/ide.py:VARIANT[,...]`):
  synthetic      small ResNet on the embedded synthetic set (CPU, minutes)
  mobilenetv2    ImageNet MobileNetV2 1.0 backbone (Gluon weights, see README)
  market_cpu     the 2-core CPU budget of benchmarks/RESULTS.md: 128x64, 3,000 steps,
                 x0.1 at 2,250 (use with mobilenetv2)
  label_smoothing  cross-entropy with label smoothing 0.1 (Szegedy et al. 2016)
  triplet        + batch-hard soft-margin triplet on the pre-BN (BNNeck) feature, PK
                 batches P=8 K=4 (Luo et al. 2019, "Bag of tricks")
"""

from __future__ import annotations

import ml_collections

from reid_jax import config_lib as common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = common.classification_config()
  c.method = "ide"
  c.dataset.name = "market1501"
  # Baseline train.py transforms: Resize((256,128)) -> Pad(10) -> RandomCrop((256,128))
  # -> RandomHorizontalFlip; no erasing by default.
  c.input.height, c.input.width = 256, 128
  c.input.augment.resize_scale = 1.0
  c.input.augment.pad = 10
  c.input.augment.flip_prob = 0.5
  c.input.augment.erasing_prob = 0.0
  c.input.sampler = "shuffle"
  c.input.batch_size = 32                 # train.py --batchsize 32
  c.model.backbone = "resnet50"            # ImageNet ResNet-50 (ft_net)
  c.model.pretrained = "imagenet"          # model.py ft_net: models.resnet50(pretrained=True)
  c.model.last_stride = 2                  # ft_net stride=2 default
  c.model.bottleneck = 512                 # ClassBlock linear=512
  c.model.bottleneck_relu = False          # ClassBlock relu=False
  c.model.dropout = 0.5                    # train.py --droprate 0.5
  # SGD, Nesterov momentum 0.9, weight decay 5e-4; lr 0.05 for the new layers (the
  # whole ClassBlock) and 0.1 x 0.05 = 0.005 for the ImageNet backbone (train.py).
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.lr_mult.backbone = 0.1
  # 60 epochs, StepLR(step_size=40, gamma=0.1), stepped per epoch; Market-1501's 12,936
  # training images in batches of 32 (the last incomplete batch skipped) = 404 steps/epoch.
  c.train.steps = 60 * 404
  c.optimizer.decay_steps = (40 * 404,)
  c.optimizer.decay_factor = 0.1
  c.train.checkpoint_every = 2_000
  c.train.eval_every = 0
  c.eval.tta = "flip"                      # test.py: f(x) + f(fliplr(x)), then L2 norm
  for v in common.parse_variants(variant):
    _apply_variant(c, v)
  return c


def _apply_variant(c: ml_collections.ConfigDict, v: str) -> None:
  if v == "synthetic":
    common.classification_synthetic(c)
  elif v == "mobilenetv2":
    c.model.backbone = "mobilenetv2"
    c.model.pretrained = "imagenet"  # the Gluon weights (reid_jax.pretrained)
  elif v == "market_cpu":
    # The CPU budget (benchmarks/RESULTS.md): Market's own 128x64 crops, 3,000
    # steps of batch 32 (~7.4 epochs), x0.1 at 2,250 (the baseline's 2/3 -> 3/4 here).
    c.input.height, c.input.width = 128, 64
    c.train.steps = 3_000
    c.optimizer.decay_steps = (2_250,)
    c.train.checkpoint_every = 500
  elif v == "label_smoothing":
    c.loss.label_smoothing = 0.1
  elif v == "triplet":
    c.input.sampler = "pk"
    c.input.P, c.input.K = 8, 4
    c.loss.triplet_weight = 1.0
    c.loss.bnneck = True
  else:
    raise ValueError(f"unknown configs/ide.py variant {v!r}; choose from synthetic, "
                     "mobilenetv2, market_cpu, label_smoothing, triplet")
