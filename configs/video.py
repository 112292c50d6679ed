"""Video re-ID on MARS with temporal pooling in training: IDE and TriNet on tracklets.

Batches hold P identities x K tracklets x T frames (`config.input.video`; the public
video baselines' sampling); the frame features of each tracklet are pooled
(`config.model.temporal_pool`) and the loss is computed on the tracklet feature (IDE:
the classifier on the pooled BN feature; TriNet: batch-hard triplet over the pooled
embeddings). Evaluation ranks tracklets pooled the same way: protocol `video` (mean)
or `video_max` (max, the official MARS evaluation code's default).

Sources: Gao & Nevatia, "Revisiting Temporal Modeling for Video-based Person ReID"
(BMVC 2018), code jiyanggao/Video-Person-ReID `main_video_person_reid.py` (GAO below):
--seq-len 4, --train-batch 32 tracklets with RandomIdentitySampler --num-instances 4
(P=8 ids x K=4 tracklets), 224x112 with Random2DTranslation (x1.125 resize + random
crop) + flip, Adam lr 3e-4, weight decay 5e-4, x0.1 every 200 epochs, 800 epochs,
`resnet50tp` = temporal average pooling. torchreid `VideoDataset` (KaiyangZhou/
deep-person-reid, torchreid/data/datasets/dataset.py), sample_method='random': T
random frames in temporal order, short tracklets padded by repetition.
MARS-evaluation (liangzheng06) `utils/process_box_feat.m`: max pooling of frame features.

Variants (`configs/video.py:VARIANT[,...]`):
  ide (default)  IDE head (configs/ide.py: ResNet-50, Linear 512 + BN, dropout 0.5,
                 softmax) with GAO's sampling, input and optimiser
  trinet         TriNet head and recipe (configs/trinet.py: FC1024-BN-ReLU-FC128,
                 batch-hard soft-margin triplet, Adam 3e-4 decaying from 15k of 25k)
                 with GAO's sampling
  max            temporal max pooling, evaluated with video_max (MARS-evaluation)
  consecutive    T consecutive frames from a random start (GAO's video_loader 'random')
  drop_short     tracklets shorter than T are not sampled (instead of padded)
  synthetic      CI-sized: the embedded synthetic_video_reid/tiny set, a small ResNet at
                 64x32, P=4 K=2 T=3, 30 steps (not a paper value; a smoke run)
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from reid_jax import config_lib as common

# An MARS "epoch" of GAO's PK sampling: 625 train ids / P=8 = 78 batches.
_EPOCH = 625 // 8


def _load(name: str, variant: str):
  """configs/<name>.py's get_config(variant), loaded beside this file."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_reid_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _video(c: ml_collections.ConfigDict) -> None:
  """GAO's tracklet sampling on MARS."""
  c.dataset.name = "mars"
  c.dataset.builder_config = ""
  c.input.video = ml_collections.ConfigDict()
  c.input.video.T = 4                 # GAO --seq-len 4
  c.input.video.sample = "random"     # torchreid sample_method='random'
  c.input.video.short = "pad"         # GAO and torchreid repeat frames of short tracklets
  c.input.P, c.input.K = 8, 4         # GAO --train-batch 32, --num-instances 4
  c.model.temporal_pool = "mean"      # GAO resnet50tp (temporal average pooling)
  c.eval.protocol = "video"           # tracklets mean-pooled, as in training
  c.eval.tta = ""                     # GAO tests without flips


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = common.parse_variants(variant)
  family = "trinet" if "trinet" in variants else "ide"
  if family == "ide":
    c = _load("ide", "")
    _video(c)
    c.input.sampler = "tracklets"
    c.input.height, c.input.width = 224, 112        # GAO --height 224 --width 112
    c.input.augment.resize_scale = 1.125            # GAO Random2DTranslation (x1.125, crop)
    c.input.augment.pad = 0
    c.input.augment.flip_prob = 0.5                 # GAO RandomHorizontalFlip
    c.optimizer.name = "adam"                       # GAO torch.optim.Adam
    c.optimizer.schedule = "step"
    c.optimizer.lr = 3e-4                           # GAO --lr 0.0003
    c.optimizer.weight_decay = 5e-4                 # GAO --weight-decay 5e-4
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999     # torch Adam defaults
    c.optimizer.lr_mult = ml_collections.ConfigDict()  # GAO: one lr for all layers
    c.optimizer.decay_steps = tuple(k * 200 * _EPOCH for k in (1, 2, 3))  # --stepsize 200
    c.optimizer.decay_factor = 0.1                  # GAO --gamma 0.1
    c.train.steps = 800 * _EPOCH                    # GAO --max-epoch 800
  else:
    c = _load("trinet", "")
    _video(c)
  c.train.checkpoint_every = 2_000
  for v in variants:
    if v in ("ide", "trinet"):
      continue
    if v == "max":
      c.model.temporal_pool = "max"                 # MARS-evaluation process_box_feat.m
      c.eval.protocol = "video_max"
    elif v == "consecutive":
      c.input.video.sample = "consecutive"
    elif v == "drop_short":
      c.input.video.short = "drop"
    elif v == "synthetic":
      _synthetic(c, family)
    else:
      raise ValueError(f"unknown configs/video.py variant {v!r}; choose from ide, trinet, "
                       "max, consecutive, drop_short, synthetic")
  return c


def _synthetic(c: ml_collections.ConfigDict, family: str) -> None:
  """CI-sized run on the rendered video set (not paper values)."""
  c.dataset.name = "synthetic_video_reid"
  c.dataset.builder_config = "tiny"
  c.input.height, c.input.width = 64, 32
  c.input.worker_count = 0
  c.input.eval_batch_size = 64
  c.input.P, c.input.K, c.input.video.T = 4, 2, 3
  c.model.backbone = "resnet_small"
  c.model.width = 8
  c.model.last_stride = 1
  c.model.pretrained = "none"        # resnet_small: no ImageNet weights exist
  if family == "ide":
    c.model.bottleneck = 32
    c.optimizer.lr = 1e-3
    c.optimizer.decay_steps = (20,)
  else:
    c.model.hidden_dim, c.model.embed_dim = 64, 32
    c.optimizer.lr = 1e-3
    c.optimizer.decay_start = 20
  c.optimizer.weight_decay = 0.0
  c.train.steps = 30
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
