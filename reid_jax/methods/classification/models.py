"""Classification heads of the Zheng tutorial family on any backbone of `reid_jax.models`.

* IDE (Zheng et al. 2016; the public Person_reID_baseline_pytorch `ClassBlock`): GAP of
  the last map -> Linear(bottleneck) -> BatchNorm -> Dropout -> Linear(classes). The
  test feature is the BatchNorm output.
* PCB (Sun et al., ECCV 2018; the authors' syfafterzy/PCB_RPP_for_reID code): the last
  map cut into `num_parts` horizontal stripes, each average-pooled (g_i) -> Dropout ->
  1x1 conv to 256 + BN + ReLU (h_i) -> its own classifier. Test features: the h_i concatenated (`pcb`) and the g_i (`pcb_g`).
  With `rpp=True` (refined part pooling, §3.2) a 1x1 conv + softmax over parts assigns
  every column vector of the map to the parts, and g_i is the assignment-weighted mean.
* Verification + identification (Zheng et al., TOMM 2017): IDE's classifier on each
  image of a pair plus a verification classifier on the squared difference of the two
  pooled features (Dropout -> Linear(2)).
* APR (Lin et al., PR 2019): IDE plus one classifier per attribute on the pooled feature.

Variables: `params` {'backbone', 'head', ...}, so `reid_jax.pretrained.load_pretrained`
fills the backbone. Outputs are float32 dicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reid_jax.models.layers import Dtype, global_avg_pool
from reid_jax.models.temporal import temporal_pool

# Public baseline (Person_reID_baseline_pytorch, model.py): add_block Linear kaiming_normal
# (fan_out), BatchNorm1d weight ~ N(1, 0.02), bias 0; classifier weight ~ N(0, 0.001), bias 0.
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_classifier_init = nn.initializers.normal(0.001)


def _bn_scale_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def bn1d(train: bool, dtype: Dtype, axis_name: str | None, name: str) -> nn.BatchNorm:
  """BatchNorm1d with PyTorch's defaults (momentum 0.1, eps 1e-5) and the baseline's init."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, param_dtype=jnp.float32, axis_name=axis_name,
                      use_fast_variance=False, scale_init=_bn_scale_init, name=name)


def classifier(num_classes: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_classifier_init, bias_init=nn.initializers.zeros, name=name)


class ClassBlock(nn.Module):
  """Linear(bottleneck) -> BN [-> ReLU] -> Dropout -> Linear(classes).

  Returns (pre-BN feature, BN feature, logits): the BN feature is the test descriptor
  (IDE); the pre-BN one is what a BNNeck-style triplet loss uses. With `frames` > 1 the
  input holds tracklets of that many frames ([B*frames, C], tracklet-major): BN runs on
  the frames, then both features are pooled per tracklet (`temporal_pool`) and the
  classifier sees the pooled BN feature, the per-frame test descriptor pooled as the
  video evaluation pools it; the outputs are [B, ...].
  """

  num_classes: int
  bottleneck: int = 512
  relu: bool = False
  dropout: float = 0.5
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  temporal_pool: str = "mean"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False, frames: int = 1):
    pre = nn.Dense(self.bottleneck, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=_kaiming_fan_out, bias_init=nn.initializers.zeros,
                   name="fc")(x)
    feat = bn1d(train, self.dtype, self.bn_axis_name, "bn")(pre)
    if self.relu:
      feat = nn.relu(feat)
    pre = temporal_pool(pre, frames, self.temporal_pool)
    feat = temporal_pool(feat, frames, self.temporal_pool)
    h = nn.Dropout(self.dropout, deterministic=not train)(feat)
    logits = classifier(self.num_classes, self.dtype, "classifier")(h)
    return pre, feat, logits


class IDEModel(nn.Module):
  """Backbone + IDE ClassBlock (+ APR attribute classifiers, + verification head).

  Outputs: `feature` (BN feature, [B, bottleneck]), `pre_bn`, `pool` (GAP, [B, C]),
  `logits` ([B, classes]); with `attribute_classes` one `attr/<i>` logits entry per
  attribute; with `verification` and `pairs=True` the input holds the two images of
  each pair stacked ([2B, ...]: all first images, then all second images) and
  `verif_logits` ([B, 2]) classifies same / different from (f_a - f_b)^2. With
  `frames` > 1 (video training, IDE only) x holds B tracklets of that many frames
  ([B*frames, ...]) and every output is per tracklet: `pool` and the features pooled
  by `temporal_pool` ('mean' or 'max'), the logits computed on the pooled feature.
  """

  backbone: nn.Module
  num_classes: int
  bottleneck: int = 512
  relu: bool = False
  dropout: float = 0.5
  attribute_classes: tuple[int, ...] = ()
  verification: bool = False
  verif_dropout: float = 0.5
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  temporal_pool: str = "mean"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False, pairs: bool = False,
               frames: int = 1):
    maps = self.backbone(x, train=train)
    pool = global_avg_pool(maps[-1])
    pre, feat, logits = ClassBlock(self.num_classes, self.bottleneck, self.relu,
                                   self.dropout, self.dtype, self.bn_axis_name,
                                   self.temporal_pool, name="head")(pool, train, frames)
    pool = temporal_pool(pool, frames, self.temporal_pool)
    out = {"pool": pool, "pre_bn": pre, "feature": feat, "logits": logits}
    for i, n in enumerate(self.attribute_classes):
      out[f"attr/{i}"] = classifier(n, self.dtype, f"attribute{i}")(pool)
    if self.verification and (pairs or self.is_initializing()):
      if pairs:
        fa, fb = jnp.split(pool, 2)
      else:  # init: build the parameters on any batch
        fa = fb = pool
      d = jnp.square(fa.astype(jnp.float32) - fb.astype(jnp.float32)).astype(self.dtype)
      d = nn.Dropout(self.verif_dropout, deterministic=not train)(d)
      out["verif_logits"] = classifier(2, self.dtype, "verification")(d)
    return {k: v.astype(jnp.float32) for k, v in out.items()}


def stripe_pool(fmap: jnp.ndarray, num_parts: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, P, C]: the mean of each of P equal horizontal stripes.

  H must be divisible by P (PCB: 24 rows / 6 parts at 384x128 with last stride 1).
  """
  b, h, w, c = fmap.shape
  if h % num_parts:
    raise ValueError(f"model.num_parts={num_parts} does not divide the last map's height "
                     f"{h}; change input.height or model.num_parts")
  x = fmap.astype(jnp.float32).reshape(b, num_parts, h // num_parts, w, c)
  return jnp.mean(x, axis=(2, 3)).astype(fmap.dtype)


def refined_pool(fmap: jnp.ndarray, part_logits: jnp.ndarray) -> jnp.ndarray:
  """RPP: g_i = sum_x p_i(x) f(x) / sum_x p_i(x), p = softmax over parts of a 1x1 conv.

  fmap [B, H, W, C], part_logits [B, H, W, P] -> [B, P, C].
  """
  p = jax.nn.softmax(part_logits.astype(jnp.float32), axis=-1)
  num = jnp.einsum("bhwp,bhwc->bpc", p, fmap.astype(jnp.float32))
  den = jnp.sum(p, axis=(1, 2))[..., None]
  return (num / den).astype(fmap.dtype)


class PCBModel(nn.Module):
  """PCB: stripes (or RPP) -> Dropout -> per-part 1x1 conv 256 + BN + ReLU -> classifier.

  Outputs: `parts_h` [B, P, reduce_dim], `parts_g` [B, P, C], `part_logits`
  [P, B, classes] (float32).
  """

  backbone: nn.Module
  num_classes: int
  num_parts: int = 6
  reduce_dim: int = 256
  dropout: float = 0.5
  rpp: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False):
    fmap = self.backbone(x, train=train)[-1]
    if self.rpp:
      part_logits = nn.Conv(self.num_parts, (1, 1), use_bias=False, dtype=self.dtype,
                            param_dtype=jnp.float32, name="rpp")(fmap)
      g = refined_pool(fmap, part_logits)
    else:
      g = stripe_pool(fmap, self.num_parts)
    hs, logits = [], []
    dropped = nn.Dropout(self.dropout, deterministic=not train)(g)
    for i in range(self.num_parts):
      # A 1x1 conv on a pooled 1x1 map is a Dense layer (the public code's local_conv).
      h = nn.Dense(self.reduce_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=_kaiming_fan_out, name=f"part{i}_conv")(dropped[:, i])
      h = nn.relu(bn1d(train, self.dtype, self.bn_axis_name, f"part{i}_bn")(h))
      hs.append(h)
      logits.append(classifier(self.num_classes, self.dtype, f"part{i}_classifier")(h))
    return {"parts_h": jnp.stack(hs, 1).astype(jnp.float32),
            "parts_g": g.astype(jnp.float32),
            "part_logits": jnp.stack(logits, 0).astype(jnp.float32)}
