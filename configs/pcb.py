"""PCB, the part-based convolutional baseline (Sun, Zheng, Yang, Tian & Wang, ECCV 2018),
as in the authors' public code (syfafterzy/PCB_RPP_for_reID: `reid/models/resnet.py`,
`train_PCB.sh`): ImageNet ResNet-50 with last stride 1, 384x128 input, the last map cut
into 6 horizontal stripes, each average-pooled (g_i) -> Dropout 0.5 -> 1x1 conv to 256 +
BN + ReLU (h_i) -> its own classifier; loss = the sum of the 6 softmax losses; test
features h (6 x 256, `pcb`) and g (6 x 2048, `pcb_g`), each part L2-normalised.
Reported (paper): Market-1501 92.3 rank-1 / 77.4 mAP; with refined part pooling (RPP,
variant `rpp`, a second stage) 93.8 / 81.6.

Variants: synthetic, mobilenetv2, market_cpu (128x64 with 4 stripes, see RESULTS.md),
rpp.
"""

from __future__ import annotations

import ml_collections

from reid_jax import config_lib as common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = common.classification_config()
  c.method = "pcb"
  c.dataset.name = "market1501"
  # train_PCB.sh: --height 384 --width 128; RectScale + RandomHorizontalFlip only.
  c.input.height, c.input.width = 384, 128
  c.input.augment.resize_scale = 1.0
  c.input.augment.pad = 0
  c.input.augment.flip_prob = 0.5
  c.input.sampler = "shuffle"
  c.input.batch_size = 64                   # train_PCB.sh -b 64
  c.model.backbone = "resnet50"
  c.model.pretrained = "imagenet"           # the paper: ImageNet-trained ResNet-50
  c.model.last_stride = 1                   # layer4[0] strides set to 1 (resnet.py)
  c.model.num_parts = 6                     # paper §3.1, p = 6
  c.model.reduce_dim = 256                  # --feature 256 (1x1 conv to 256)
  c.model.dropout = 0.5                     # PCB.py --dropout 0.5 (before local_conv)
  # PCB.py: SGD lr 0.1, momentum 0.9, weight decay 5e-4, Nesterov; backbone lr_mult 0.1;
  # 60 epochs with x0.1 at 40 (train_PCB.sh --epochs 60 --step-size 40). Market-1501's
  # 12,936 images / 64 = 202 steps per epoch.
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.lr_mult.backbone = 0.1
  c.train.steps = 60 * 202
  c.optimizer.decay_steps = (40 * 202,)
  # RPP (train_RPP.sh / RPP.py): from the trained PCB, the part classifier added and the
  # whole network trained at lr 0.1 for 50 epochs, x0.1 every 20 (the public code trains
  # all layers together; the paper §3.2 first trains the part classifier alone).
  c.optimizer.rpp_lr = 0.1
  c.optimizer.rpp_decay_steps = (20 * 202, 40 * 202)
  c.train.rpp_steps = 50 * 202
  c.train.checkpoint_every = 2_000
  c.eval.tta = ""
  for v in common.parse_variants(variant):
    _apply_variant(c, v)
  return c


def _apply_variant(c: ml_collections.ConfigDict, v: str) -> None:
  if v == "synthetic":
    common.classification_synthetic(c)
    c.input.augment.pad = 0
    c.model.num_parts = 6                   # 96x48, resnet_small, last stride 1: 6 rows
    c.model.reduce_dim = 32
    c.optimizer.rpp_lr = 0.01
    c.train.rpp_steps = 300
    c.eval.tta = ""
  elif v == "mobilenetv2":
    c.model.backbone = "mobilenetv2"
    c.model.pretrained = "imagenet"  # the Gluon weights (reid_jax.pretrained)
  elif v == "market_cpu":
    # 2-core CPU budget (benchmarks/RESULTS.md): Market's own 128x64 crops; with last
    # stride 1 the MobileNetV2 map is 8x4, cut into 4 stripes of 2 rows; batch 32,
    # 3,000 steps, x0.1 at 2,250 (as the IDE CPU recipe).
    c.input.height, c.input.width = 128, 64
    c.model.num_parts = 4
    c.input.batch_size = 32
    c.optimizer.lr = 0.05
    c.train.steps = 3_000
    c.optimizer.decay_steps = (2_250,)
    c.train.rpp_steps = 500
    c.optimizer.rpp_lr = 0.005
    c.optimizer.rpp_decay_steps = ()
    c.train.checkpoint_every = 500
  elif v == "rpp":
    c.model.rpp = True
  else:
    raise ValueError(f"unknown configs/pcb.py variant {v!r}; choose from synthetic, "
                     "mobilenetv2, market_cpu, rpp")
