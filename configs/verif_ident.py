"""Verification + identification (Zheng, Zheng & Yang, "A Discriminatively Learned CNN
Embedding for Person Re-identification", TOMM 2017), after the authors' MatConvNet code
(layumi/2016_person_re-ID: `resnet52_2stream.m`, `train_id_net_res_2stream.m`): a
Siamese ResNet-50 (shared weights); each image's identity softmax plus a verification
softmax (same / different) on the squared difference of the two pooled features;
loss weights 0.5 + 0.5 (identities) + 1 (verification); the negative share of the pairs
grows from 1:1 towards 1:4 during training. Test feature: the pooled feature of image +
mirror, L2-normalised. Reported: Market-1501 79.5 rank-1 / 59.9 mAP (single query).

Variants: synthetic, mobilenetv2, market_cpu.
"""

from __future__ import annotations

import ml_collections

from reid_jax import config_lib as common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = common.classification_config()
  c.method = "verif_ident"
  c.dataset.name = "market1501"
  c.input.height, c.input.width = 256, 128   # the public code: 224x224 crops of 256x256
  c.input.augment.resize_scale = 1.0
  c.input.augment.pad = 10
  c.input.sampler = "pairs"
  c.input.batch_size = 48                    # train_id_net_res_2stream.m: 48 pairs
  # dividor = min(5, 2 * 1.01^epoch), positives = batch / dividor: 1:1 at the start,
  # 1:4 at most; here linear from 1 to 4 over the run (a simplification of the
  # per-epoch exponential ramp, which reaches ~1:3.2 at its last epoch).
  c.input.neg_per_pos = 1.0
  c.input.neg_per_pos_end = 4.0
  c.model.backbone = "resnet50"
  c.model.pretrained = "imagenet"          # the paper fine-tunes an ImageNet ResNet-50
  c.model.dropout = 0.5
  c.model.bottleneck = 512
  # resnet52_2stream.m: Dropout 0.9 on the squared difference before the 2-way fc.
  c.model.verif_dropout = 0.9
  c.loss.id_weight = 0.5                     # derOutputs: 0.5, 0.5, 1
  c.loss.verif_weight = 1.0
  # The public code: SGD, lr 0.1 for 70 epochs then 0.01 for 5, weight decay 5e-4,
  # backbone at a lower rate; 12,936 / 48 ~ 270 pair steps per epoch.
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.lr_mult.backbone = 0.1
  c.train.steps = 75 * 270
  c.optimizer.decay_steps = (70 * 270,)
  c.input.neg_ramp_steps = 75 * 270
  c.train.checkpoint_every = 2_000
  c.eval.tta = "flip"
  for v in common.parse_variants(variant):
    _apply_variant(c, v)
  return c


def _apply_variant(c: ml_collections.ConfigDict, v: str) -> None:
  if v == "synthetic":
    common.classification_synthetic(c)
    c.input.batch_size = 16
    c.input.neg_ramp_steps = c.train.steps
  elif v == "mobilenetv2":
    c.model.backbone = "mobilenetv2"
    c.model.pretrained = "imagenet"  # the Gluon weights (reid_jax.pretrained)
  elif v == "market_cpu":
    # 2-core CPU budget (benchmarks/RESULTS.md): 128x64, 16 pairs (32 images) per step
    # as the IDE recipe's 32 images, 3,000 steps, x0.1 at 2,250, lr as IDE's.
    c.input.height, c.input.width = 128, 64
    c.input.batch_size = 16
    c.optimizer.lr = 0.05
    c.optimizer.nesterov = True
    c.train.steps = 3_000
    c.optimizer.decay_steps = (2_250,)
    c.input.neg_ramp_steps = 3_000
    c.train.checkpoint_every = 500
  else:
    raise ValueError(f"unknown configs/verif_ident.py variant {v!r}; choose from "
                     "synthetic, mobilenetv2, market_cpu")
