"""Small building blocks shared by the backbones: PyTorch-faithful conv, BatchNorm, pooling.

PyTorch and Flax differ in three places that matter for importing ImageNet weights:
padding (flax 'SAME' pads asymmetrically for stride 2, PyTorch pads symmetrically),
BatchNorm momentum (PyTorch 0.1 is flax 0.9) and kernel layout (OIHW vs HWIO). The
helpers here fix the first two; `reid_jax.pretrained` handles the layout.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
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
