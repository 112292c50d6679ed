"""DenseNet-BC (torchvision `densenet201` layout) returning all four stage maps.

Naming follows torchvision's `features.*` one to one (the `features.` prefix is dropped):

  torchvision key                                       flax path
  features.conv0.weight                                 params/conv0/kernel
  features.norm0.{weight,bias}                          params/norm0/{scale,bias}
  features.norm0.{running_mean,running_var}             batch_stats/norm0/{mean,var}
  features.denseblock2.denselayer7.conv1.weight         params/denseblock2/denselayer7/conv1/kernel
  features.transition1.norm.running_var                 batch_stats/transition1/norm/var
  features.norm5.weight                                 params/norm5/scale
  classifier.*, *.num_batches_tracked                   dropped

Old checkpoints spell dense-layer modules `norm.1`, `conv.2`, ...; `reid_jax.pretrained`
renames them as torchvision's `_load_state_dict` does.

Stages: stage s (1..3) = output of `denseblock{s}` (before `transition{s}`), stage 4 =
relu(norm5(denseblock4)), i.e. torchvision's final feature map. Strides 4, 8, 16, 32;
with `last_stride=1` transition3 keeps its norm/ReLU/1x1 conv but skips its 2x2
average pool, so stage 4 stays at stride 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from reid_jax.models.layers import (
    Dtype,
    batch_norm,
    check_max_stage,
    conv,
    max_pool_3x3_s2,
)


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (bn_size*growth) - BN-ReLU-3x3 conv (growth); concatenated to x."""

  growth_rate: int = 32
  bn_size: int = 4
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    bn = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    y = nn.relu(bn("norm1")(x))
    y = conv(self.bn_size * self.growth_rate, 1, dtype=self.dtype, name="conv1")(y)
    y = nn.relu(bn("norm2")(y))
    y = conv(self.growth_rate, 3, 1, 1, dtype=self.dtype, name="conv2")(y)
    return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
  """`num_layers` dense layers named denselayer1..denselayerN."""

  num_layers: int
  growth_rate: int = 32
  bn_size: int = 4
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    for i in range(self.num_layers):
      x = DenseLayer(
          self.growth_rate,
          self.bn_size,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          name=f"denselayer{i + 1}",
      )(x, train)
    return x


class Transition(nn.Module):
  """BN-ReLU-1x1 conv (halves channels), then 2x2/2 average pool unless `pool=False`."""

  features: int
  pool: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "norm")(x))
    x = conv(self.features, 1, dtype=self.dtype, name="conv")(x)
    if self.pool:
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return x


class DenseNet(nn.Module):
  """DenseNet-BC backbone; `__call__` returns the list of stage maps (NHWC).

  Attributes:
    block_config: dense layers per block; (6, 12, 48, 32) is DenseNet-201.
    growth_rate: channels each dense layer adds.
    bn_size: bottleneck width factor (1x1 conv has bn_size * growth_rate channels).
    num_init_features: stem channels.
    last_stride: 1 drops transition3's average pool (stage 4 at stride 16).
    dtype: compute dtype (params stay float32).
    bn_axis_name: pmap axis over which BatchNorm statistics are averaged in training.
  """

  block_config: Sequence[int] = (6, 12, 48, 32)
  growth_rate: int = 32
  bn_size: int = 4
  num_init_features: int = 64
  last_stride: int = 2
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
      self, x: jnp.ndarray, train: bool = False, max_stage: int | None = None
  ) -> list[jnp.ndarray]:
    num_stages = check_max_stage(max_stage)
    if len(self.block_config) != 4:
      raise ValueError(f"DenseNet needs 4 blocks, got {tuple(self.block_config)}")
    if self.last_stride not in (1, 2):
      raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
    bn = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    x = jnp.asarray(x, self.dtype)
    x = conv(self.num_init_features, 7, 2, 3, dtype=self.dtype, name="conv0")(x)
    x = max_pool_3x3_s2(nn.relu(bn("norm0")(x)))
    features = []
    for i in range(num_stages):
      x = DenseBlock(
          self.block_config[i],
          self.growth_rate,
          self.bn_size,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          name=f"denseblock{i + 1}",
      )(x, train)
      if i < 3:
        features.append(x)
        if i + 1 < num_stages:
          x = Transition(
              x.shape[-1] // 2,
              pool=not (i == 2 and self.last_stride == 1),
              dtype=self.dtype,
              bn_axis_name=self.bn_axis_name,
              name=f"transition{i + 1}",
          )(x, train)
      else:
        features.append(nn.relu(bn("norm5")(x)))
    return features


def densenet201(**kwargs: Any) -> DenseNet:
  """DenseNet-201: growth 32, bn_size 4, blocks (6, 12, 48, 32), 64 init features.

  Stage channels 256, 512, 1792, 1920.
  """
  return DenseNet(block_config=(6, 12, 48, 32), growth_rate=32, bn_size=4, num_init_features=64, **kwargs)
