"""ResNet-18/34/50/101 (torchvision layout, v1.5) returning all four stage maps.

Parameter naming follows torchvision one to one so ImageNet state dicts convert
mechanically (`reid_jax.pretrained`):

  torchvision key                          flax path
  conv1.weight                             params/conv1/kernel          (OIHW -> HWIO)
  bn1.{weight,bias}                        params/bn1/{scale,bias}
  bn1.{running_mean,running_var}           batch_stats/bn1/{mean,var}
  layer2.0.conv1.weight                    params/layer2_0/conv1/kernel
  layer2.0.downsample.0.weight             params/layer2_0/downsample_0/kernel
  layer2.0.downsample.1.running_mean       batch_stats/layer2_0/downsample_1/mean
  fc.*, *.num_batches_tracked              dropped (classifier / counter)

i.e. `layer{i}.{j}.` -> `layer{i}_{j}/` and `downsample.{k}` -> `downsample_{k}`.
Stage s (1..4) output = output of `layer{s}` (strides 4, 8, 16, 32; layer4 stride 16
with `last_stride=1`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from reid_jax.models.layers import (
    Dtype,
    batch_norm,
    check_max_stage,
    conv,
    max_pool_3x3_s2,
)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: two 3x3 convs; stride on the first."""

  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    bn = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    y = conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(y)
    y = bn("bn2")(y)
    if self.downsample:
      x = conv(self.planes * self.expansion, 1, self.stride, dtype=self.dtype, name="downsample_0")(x)
      x = bn("downsample_1")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): 1x1, 3x3 (carries the stride), 1x1 x4."""

  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    bn = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    y = conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(bn("bn2")(y))
    y = conv(self.planes * self.expansion, 1, dtype=self.dtype, name="conv3")(y)
    y = bn("bn3")(y)
    if self.downsample:
      x = conv(self.planes * self.expansion, 1, self.stride, dtype=self.dtype, name="downsample_0")(x)
      x = bn("downsample_1")(x)
    return nn.relu(y + x)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """ResNet backbone; `__call__` returns the list of stage maps (NHWC).

  Attributes:
    stage_sizes: blocks per stage (4 entries), e.g. (3, 4, 6, 3) for ResNet-50.
    block: 'basic' or 'bottleneck'.
    width: channels of the stem and of stage 1's blocks (64 in torchvision); stage s
      uses width * 2**(s-1) planes.
    last_stride: stride of layer4's first block (2 = torchvision, 1 = re-ID trick).
    dtype: compute dtype (params stay float32).
    bn_axis_name: pmap axis over which BatchNorm statistics are averaged in training.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  width: int = 64
  last_stride: int = 2
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
      self, x: jnp.ndarray, train: bool = False, max_stage: int | None = None
  ) -> list[jnp.ndarray]:
    num_stages = check_max_stage(max_stage)
    if len(self.stage_sizes) != 4:
      raise ValueError(f"ResNet needs 4 stage sizes, got {tuple(self.stage_sizes)}")
    if self.last_stride not in (1, 2):
      raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
    block_cls = BLOCKS[self.block]
    x = jnp.asarray(x, self.dtype)
    x = conv(self.width, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x))
    x = max_pool_3x3_s2(x)
    features = []
    for i in range(num_stages):
      planes = self.width * 2**i
      stride = 1 if i == 0 else (self.last_stride if i == 3 else 2)
      for j in range(self.stage_sizes[i]):
        s = stride if j == 0 else 1
        needs_downsample = s != 1 or x.shape[-1] != planes * block_cls.expansion
        x = block_cls(
            planes,
            s,
            needs_downsample,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            name=f"layer{i + 1}_{j}",
        )(x, train)
      features.append(x)
    return features


def resnet18(**kwargs: Any) -> ResNet:
  """ResNet-18 (BasicBlock, 2-2-2-2); stage channels 64/128/256/512."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block="basic", **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
  """ResNet-34 (BasicBlock, 3-4-6-3); stage channels 64/128/256/512."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block="basic", **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
  """ResNet-50 (Bottleneck, 3-4-6-3); stage channels 256/512/1024/2048."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", **kwargs)


def resnet101(**kwargs: Any) -> ResNet:
  """ResNet-101 (Bottleneck, 3-4-23-3); stage channels 256/512/1024/2048."""
  return ResNet(stage_sizes=(3, 4, 23, 3), block="bottleneck", **kwargs)


def resnet_small(width: int = 16, **kwargs: Any) -> ResNet:
  """Tiny CPU-friendly ResNet (BasicBlock, 1-1-1-1) for synthetic-data runs and tests."""
  kwargs.setdefault("stage_sizes", (1, 1, 1, 1))
  return ResNet(block="basic", width=width, **kwargs)
