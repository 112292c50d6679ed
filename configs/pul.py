"""PUL, progressive unsupervised learning (Fan, Zheng, Yan & Yang, "Unsupervised Person
Re-identification: Clustering and Fine-tuning", ACM TOMM 2018, arXiv 1705.10444; public
code hehefan/Unsupervised-Person-Re-identification-Clustering-and-Fine-tuning,
`PUL/unsupervised.py` and `baseline/train.py`).

Stage 0: IDE on the labelled source domain (`config.source_dataset`), with the IDE
recipe of configs/ide.py (the public code fine-tunes an ImageNet ResNet-50 + dropout
0.5 + fc8 on the source: `baseline/train.py`, SGD 0.001, 40 epochs, batch 16; we start
from the IDE family instead). Point `--config.pul.source_workdir=DIR` at a finished IDE
run (or another PUL run, whose stage 0 is taken) to skip it. Then `pul.rounds` rounds on
the unlabelled target (`config.dataset`; its identities are never read in training):
k-means, reliable images, fine-tuning from the source model; see
reid_jax/methods/pul/train.py. `WORKDIR/pul_rounds.json` holds one row per round.

Variants (`configs/pul.py:VARIANT[,...]`):
  synthetic    CI-sized: source synthetic_reid/tiny, target synthetic_reid/varied
               (K = 12), resnet_small 64x32, 200 source steps, 2 rounds x 40 steps
  mobilenetv2  ImageNet MobileNetV2 1.0 backbone (Gluon weights, see README)
  market_cpu   target Market-1501 (K = 750), source the default synthetic_reid set
               (600 ids; no second real dataset is prepared here), 128x64, the IDE
               market_cpu source budget (3,000 steps), 3 rounds x 500 steps, k-means
               n_init 1 (use with mobilenetv2; times in the README/report)
  duke         target DukeMTMC-reID (K = 700), source Market-1501 (the public code's
               default, "Duke <- Market")
"""

from __future__ import annotations

import ml_collections

from configs import ide
from reid_jax import config_lib as common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = common.parse_variants(variant)
  # The IDE recipe (configs/ide.py) for the network, input and stage-0 training.
  c = ide.get_config(",".join(v for v in variants if v in ("mobilenetv2", "market_cpu")))
  c.method = "pul"
  # The paper's experiments: Duke -> Market, Market -> Duke (and CUHK03); target = the
  # unlabelled training split of config.dataset, evaluated on its query/gallery.
  c.dataset.name = "market1501"
  c.source_dataset = ml_collections.ConfigDict(c.dataset.to_dict())
  c.source_dataset.name = "dukemtmc_reid"  # "" data_dir: the target's

  p = c.pul = ml_collections.ConfigDict()
  p.source_workdir = ""       # a finished IDE (or PUL) workdir: skips stage 0
  p.source_classes = 0        # recorded from the source (never set by hand)
  p.rounds = 25               # unsupervised.py: START = 1, END = 25
  p.num_clusters = 750        # unsupervised.py NUM_CLUSTER: Market 750, Duke 700, CUHK03 750
  p.lam = 0.85                # unsupervised.py LAMBDA
  # 'own': cosine similarity to the image's own cluster centre > lam (the paper's selection
  # step: v_i = 1 when the feature is near its cluster's centre);
  # 'any': to any centre (unsupervised.py: np.unique(np.argwhere(similarities > LAMBDA)[:,1])).
  p.reliable_rule = "own"
  # 'pool': the backbone's global-average-pooled feature, not normalised, into k-means
  # (unsupervised.py clusters the `avg_pool` output); 'feature': IDE's L2-normalised
  # BN test feature. Cosine similarity (reliability) normalises either way.
  p.feature = "pool"
  # unsupervised.py: KMeans(n_clusters=NUM_CLUSTER) with scikit-learn's defaults of the
  # time: k-means++, n_init=10, max_iter=300 (Lloyd); random_state = seed + round here.
  p.kmeans_n_init = 10
  p.kmeans_max_iter = 300
  # Fine-tuning (unsupervised.py): a new fc8 of NUM_CLUSTER classes (N(0, 0.001)) on the
  # reloaded source model (`load_model('checkpoint/0.ckpt')` every round), dropout 0.5,
  # SGD(lr=0.001, momentum=0.9) on every layer, BATCH_SIZE = 16, NUM_EPOCH = 20 of
  # len(images) / 16 + 1 steps each. steps > 0 replaces the epoch count.
  p.epochs = 20
  p.steps = 0
  p.batch_size = 16
  p.optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())
  p.optimizer.name = "sgd"
  p.optimizer.lr = 0.001
  p.optimizer.momentum = 0.9
  p.optimizer.nesterov = False     # Keras SGD default
  p.optimizer.weight_decay = 0.0   # Keras SGD: none
  p.optimizer.lr_mult = ml_collections.ConfigDict()  # one rate for every layer
  p.optimizer.decay_steps = ()     # constant rate
  p.optimizer.schedule = ""
  # Not in the paper: rank-1/mAP on the target test split after every round (the paper's
  # Fig. 4 curves); False: only after the last round.
  p.eval_each_round = True
  # Augmentation of the fine-tuning: config.input.augment (IDE: pad 10 + crop + flip);
  # the public code's rotation +-20 deg / shifts 0.2 / no flip has no equivalent here.

  for v in variants:
    _apply_variant(c, v)
  return c


def _apply_variant(c: ml_collections.ConfigDict, v: str) -> None:
  p = c.pul
  if v == "synthetic":
    common.classification_synthetic(c)
    c.dataset.name = c.source_dataset.name = "synthetic_reid"
    c.source_dataset.builder_config = "tiny"   # 12 ids x 6 images, 64x32
    c.dataset.builder_config = "varied"        # the tiny layout at varied sizes
    c.input.height, c.input.width = 64, 32
    c.train.steps = 200
    c.optimizer.decay_steps = (150,)
    c.train.checkpoint_every = 100
    c.train.log_every = 20
    p.num_clusters = 12        # the target's identity count, as 750/700 for Market/Duke
    p.rounds = 2
    p.steps = 40
    p.kmeans_n_init = 3
    p.optimizer.lr = 0.01      # not the paper's 0.001: a from-scratch source, 40 steps
  elif v == "mobilenetv2":
    pass  # the backbone is set by configs/ide.py:mobilenetv2
  elif v == "market_cpu":
    # 128x64 and IDE's 3,000 source steps (configs/ide.py:market_cpu); the source is the
    # synthetic set (no second real dataset is prepared here).
    c.source_dataset.name = "synthetic_reid"
    c.source_dataset.builder_config = ""
    p.rounds = 3
    p.steps = 500
    p.kmeans_n_init = 1
    c.train.checkpoint_every = 500
  elif v == "duke":
    c.dataset.name = "dukemtmc_reid"
    c.source_dataset.name = "market1501"
    p.num_clusters = 700
  else:
    raise ValueError(f"unknown configs/pul.py variant {v!r}; choose from synthetic, "
                     "mobilenetv2, market_cpu, duke")
