"""The MSP-CNN base network: the JSTL network of Xiao et al. (CVPR 2016, "Learning deep
feature representations with domain guided dropout"), as in its public Caffe model
`models/dgd/jstl_trainval.prototxt` (github.com/Cysu/dgd_person_reid).

  conv1-3   3x3, 32 channels each, BN + ReLU (full resolution)
  pool1     2x2 max pool, stride 2 (72x28x32 at 144x56): the NCC loss's map
  inception 1a/1b/2a/2b/3a/3b, C = 64/64/128/128/256/256 per branch
            "a" (keeps the size): 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | avg pool 3x3 - 1x1 -> 4C
            "b" (halves it): 1x1-3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2 -> 2C + C_in
  global average pooling, fc7 (256) + BN + ReLU, dropout 0.5, classifier.

Every conv is followed by BN + ReLU (bias-free, as BN removes a bias). Caffe's ceil-mode
3x3/2 max pools (with `pad_w: 1` in 3b) give the same sizes and windows as 'SAME'
pooling here. Initialisation: Caffe "xavier" (uniform, fan-in) for convs and fc7, a
Gaussian of std 0.001 for the classifier (the prototxt's fc8).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from reid_jax.models.layers import Dtype

_xavier = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # Caffe's "xavier"
_classifier_init = nn.initializers.normal(0.001)


class ConvBN(nn.Module):
  """Conv (no bias) + BN + ReLU."""
  features: int
  kernel: int = 3
  stride: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    pad = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_xavier,
                dtype=self.dtype, param_dtype=jnp.float32)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, param_dtype=jnp.float32,
                     axis_name=self.bn_axis_name if train else None)(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """The size-keeping inception module (5x5 as two 3x3): 4 branches of C channels."""
  features: int
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    c = self.features
    b1 = ConvBN(c, 1, name="1x1", **kw)(x, train)
    b2 = ConvBN(c, 1, name="3x3_reduce", **kw)(x, train)
    b2 = ConvBN(c, 3, name="3x3", **kw)(b2, train)
    b3 = ConvBN(c, 1, name="double_3x3_reduce", **kw)(x, train)
    b3 = ConvBN(c, 3, name="double_3x3_1", **kw)(b3, train)
    b3 = ConvBN(c, 3, name="double_3x3_2", **kw)(b3, train)
    b4 = nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))  # Caffe AVE, pad 1
    b4 = ConvBN(c, 1, name="pool_proj", **kw)(b4, train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionB(nn.Module):
  """The size-halving inception module: 2 conv branches of C channels + a max pool."""
  features: int
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    c = self.features
    b1 = ConvBN(c, 1, name="3x3_reduce", **kw)(x, train)
    b1 = ConvBN(c, 3, 2, name="3x3", **kw)(b1, train)
    b2 = ConvBN(c, 1, name="double_3x3_reduce", **kw)(x, train)
    b2 = ConvBN(c, 3, name="double_3x3_1", **kw)(b2, train)
    b2 = ConvBN(c, 3, 2, name="double_3x3_2", **kw)(b2, train)
    b3 = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    return jnp.concatenate([b1, b2, b3.astype(b1.dtype)], axis=-1)


class JSTLNet(nn.Module):
  """images [B, H, W, 3] -> {'pool1': [B, H/2, W/2, C0], 'fc7': [B, fc_dim],
  'logits': [B, num_classes] (when num_classes > 0)}.

  `fc7` is taken after BN + ReLU and before dropout: the test-time descriptor and the
  feature of the Euclidean loss; dropout only feeds the classifier.
  """
  num_classes: int = 0
  conv_channels: Sequence[int] = (32, 32, 32)
  inception_channels: Sequence[int] = (64, 64, 128, 128, 256, 256)
  fc_dim: int = 256
  dropout: float = 0.5
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    kw = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    x = x.astype(self.dtype)
    for i, c in enumerate(self.conv_channels, start=1):
      x = ConvBN(c, 3, name=f"conv{i}", **kw)(x, train)
    pool1 = nn.max_pool(x, (2, 2), (2, 2))
    x = pool1
    for i, c in enumerate(self.inception_channels):
      name = f"inception_{i // 2 + 1}{'ab'[i % 2]}"
      x = (InceptionA if i % 2 == 0 else InceptionB)(c, name=name, **kw)(x, train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # global average pooling
    x = nn.Dense(self.fc_dim, kernel_init=_xavier, dtype=self.dtype, param_dtype=jnp.float32,
                 name="fc7")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, param_dtype=jnp.float32,
                     axis_name=self.bn_axis_name if train else None, name="fc7_bn")(x)
    fc7 = nn.relu(x).astype(jnp.float32)
    out = {"pool1": pool1.astype(jnp.float32), "fc7": fc7}
    if self.num_classes:
      h = nn.Dropout(self.dropout, deterministic=not train)(fc7)
      out["logits"] = nn.Dense(self.num_classes, kernel_init=_classifier_init,
                               param_dtype=jnp.float32, name="classifier")(h)
    return out
