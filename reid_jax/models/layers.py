"""Small building blocks shared by the backbones: PyTorch-faithful conv, BatchNorm, pooling.

PyTorch and Flax differ in three places that matter for importing ImageNet weights:
padding (flax 'SAME' pads asymmetrically for stride 2, PyTorch pads symmetrically),
BatchNorm momentum (PyTorch 0.1 is flax 0.9) and kernel layout (OIHW vs HWIO). The
helpers here fix the first two; `reid_jax.pretrained` handles the layout.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision ResNet/DenseNet: kaiming_normal_(mode='fan_out', nonlinearity='relu').
torch_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch nn.Linear default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

NUM_STAGES = 4


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
  """A bias-free square conv with explicit symmetric padding, as PyTorch's Conv2d."""
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      feature_group_count=groups,
      use_bias=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_conv_init,
      name=name,
  )


class DepthwiseConv3x3(nn.Module):
  """Bias-free 3x3 depthwise conv, padding 1: `conv(C, 3, stride, 1, groups=C)`'s math.

  Same parameter (`kernel`, HWIO (3, 3, 1, C)) and init as the `nn.Conv` it replaces,
  so checkpoints and imported weights are interchangeable. `impl='shift'` computes the
  9 taps as shifted multiply-adds, which XLA fuses into elementwise loops; on CPU that is
  far faster than XLA's grouped convolution (MobileNetV2 train step at 128x64, batch 72,
  2 cores: see benchmarks/RESULTS.md). `'auto'` picks 'shift' on CPU and 'conv' (cuDNN /
  TPU grouped convolutions) elsewhere.
  """

  stride: int = 1
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    kernel = self.param("kernel", torch_conv_init, (3, 3, 1, c), jnp.float32)
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = "shift" if jax.default_backend() == "cpu" else "conv"
    s = self.stride
    if impl == "conv":
      return jax.lax.conv_general_dilated(
          x, kernel, (s, s), ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    if impl != "shift":
      raise ValueError(f"depthwise impl must be 'auto', 'conv' or 'shift', got {impl!r}")
    h, w = x.shape[1], x.shape[2]
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = None
    for dy in range(3):
      for dx in range(3):
        tap = xp[:, dy:dy + s * (ho - 1) + 1:s, dx:dx + s * (wo - 1) + 1:s, :] * kernel[dy, dx, 0]
        out = tap if out is None else out + tap
    return out

  def cost_macs(self, args: tuple, output: Any) -> int:
    """Per-image multiply-adds (for `reid_jax.models.cost`): 9 per output element."""
    del args
    return math.prod(output.shape[1:]) * 9


def batch_norm(
    train: bool,
    dtype: Dtype = jnp.float32,
    axis_name: str | None = None,
    name: str | None = None,
) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 == flax 0.9, eps 1e-5).

  `axis_name` averages the batch statistics across pmap devices, so N devices with
  B/N images each normalise exactly like one device with B images. Running variance
  is updated with the biased batch variance (flax), not PyTorch's unbiased one; for
  re-ID batch sizes the factor n/(n-1) is below 2%.
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      axis_name=axis_name,
      use_fast_variance=False,
      name=name,
  )


def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """PyTorch MaxPool2d(kernel_size=3, stride=2, padding=1) (padding never wins the max)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over H and W of an NHWC map, accumulated in float32, returned in x's dtype."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def check_max_stage(max_stage: int | None) -> int:
  """Returns the number of stages to compute; `None` means all four."""
  if max_stage is None:
    return NUM_STAGES
  if not 1 <= int(max_stage) <= NUM_STAGES:
    raise ValueError(f"max_stage must be in 1..{NUM_STAGES} or None, got {max_stage}")
  return int(max_stage)


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  """x / |x| over the last axis (a zero vector stays zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
