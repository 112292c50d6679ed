"""MobileNetV2 (GluonCV `mobilenetv2_1.0` layout) returning four stage maps.

Matches the GluonCV model whose ImageNet weights ship as
`../shared/pretrained/mobilenetv2_1.0_imagenet_gluon.npz`. Naming follows Gluon's with
the `mobilenetv20_features_` prefix dropped and `_` turned into `/` at module bounds:

  Gluon key                                             flax path
  mobilenetv20_features_conv0_weight                    params/conv0/kernel (OIHW -> HWIO)
  mobilenetv20_features_batchnorm0_{gamma,beta}         params/batchnorm0/{scale,bias}
  mobilenetv20_features_batchnorm0_running_{mean,var}   batch_stats/batchnorm0/{mean,var}
  ..._linearbottleneck{i}_conv{0,1,2}_weight            params/linearbottleneck{i}/conv{0,1,2}/kernel
  ..._linearbottleneck{i}_batchnorm{0,1,2}_*            .../linearbottleneck{i}/batchnorm{0,1,2}/*
  mobilenetv20_features_conv1_weight, batchnorm1_*      params/conv1/kernel, .../batchnorm1/*

Depthwise kernels (C,1,3,3) become flax (3,3,1,C) with feature_group_count=C.

Stages split the network where the stride changes:
  stage 1 = conv0 + bottlenecks 0-2   (stride 4,  24 ch)
  stage 2 = bottlenecks 3-5           (stride 8,  32 ch)
  stage 3 = bottlenecks 6-12          (stride 16, 96 ch)
  stage 4 = bottlenecks 13-16 + conv1 1x1 + BN + ReLU6 (stride 32, 1280 ch)
`last_stride=1` removes the stride of bottleneck 13 (stage 4 at stride 16).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from reid_jax.models.layers import Dtype, DepthwiseConv3x3, batch_norm, check_max_stage, conv

# Gluon's per-bottleneck settings: (output channels, expansion t, stride).
_CHANNELS = (16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320)
_EXPANSIONS = (1,) + (6,) * 16
_STRIDES = (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)
# Index of the first bottleneck of stages 2, 3, 4 (the stride-2 ones after stage 1).
_STAGE_STARTS = (0, 3, 6, 13, 17)
_LAST_STRIDE_BLOCK = 13


def relu6(x: jnp.ndarray) -> jnp.ndarray:
  """Gluon's ReLU6: clip(x, 0, 6)."""
  return jnp.clip(x, 0, 6)


class LinearBottleneck(nn.Module):
  """1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN (+ x)."""

  channels: int
  expansion: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  depthwise: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    bn = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    in_channels = x.shape[-1]
    hidden = in_channels * self.expansion
    y = relu6(bn("batchnorm0")(conv(hidden, 1, dtype=self.dtype, name="conv0")(x)))
    y = DepthwiseConv3x3(self.stride, self.depthwise, self.dtype, name="conv1")(y)
    y = relu6(bn("batchnorm1")(y))
    y = bn("batchnorm2")(conv(self.channels, 1, dtype=self.dtype, name="conv2")(y))
    if self.stride == 1 and in_channels == self.channels:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 backbone; `__call__` returns the list of stage maps (NHWC).

  Attributes:
    multiplier: width multiplier (1.0 for the pretrained Gluon weights); channels are
      int(c * multiplier) as in GluonCV, the last conv keeps 1280 unless multiplier > 1.
    last_stride: 1 removes the stride of bottleneck 13 (first block of stage 4).
    dtype: compute dtype (params stay float32).
    bn_axis_name: pmap axis over which BatchNorm statistics are averaged in training.
    depthwise: 3x3 depthwise conv implementation ('auto', 'conv', 'shift'; see
      `layers.DepthwiseConv3x3`); all give the same function and parameters.
  """

  multiplier: float = 1.0
  last_stride: int = 2
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  depthwise: str = "auto"

  @nn.compact
  def __call__(
      self, x: jnp.ndarray, train: bool = False, max_stage: int | None = None
  ) -> list[jnp.ndarray]:
    num_stages = check_max_stage(max_stage)
    if self.last_stride not in (1, 2):
      raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
    bn = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    m = self.multiplier
    x = jnp.asarray(x, self.dtype)
    x = conv(int(32 * m), 3, 2, 1, dtype=self.dtype, name="conv0")(x)
    x = relu6(bn("batchnorm0")(x))
    features = []
    for s in range(num_stages):
      for i in range(_STAGE_STARTS[s], _STAGE_STARTS[s + 1]):
        stride = _STRIDES[i]
        if i == _LAST_STRIDE_BLOCK and self.last_stride == 1:
          stride = 1
        x = LinearBottleneck(
            int(_CHANNELS[i] * m),
            _EXPANSIONS[i],
            stride,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            depthwise=self.depthwise,
            name=f"linearbottleneck{i}",
        )(x, train)
      if s == 3:
        last = int(1280 * m) if m > 1.0 else 1280
        x = relu6(bn("batchnorm1")(conv(last, 1, dtype=self.dtype, name="conv1")(x)))
      features.append(x)
    return features


def mobilenetv2(**kwargs: Any) -> MobileNetV2:
  """MobileNetV2 1.0; stage channels 24, 32, 96, 1280."""
  return MobileNetV2(**kwargs)
