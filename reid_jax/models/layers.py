"""Small building blocks shared by the backbones: PyTorch-faithful conv, BatchNorm, pooling.

PyTorch and Flax differ in three places that matter for importing ImageNet weights:
padding (flax 'SAME' pads asymmetrically for stride 2, PyTorch pads symmetrically),
BatchNorm momentum (PyTorch 0.1 is flax 0.9) and kernel layout (OIHW vs HWIO). The
helpers here fix the first two; `reid_jax.pretrained` handles the layout.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision ResNet/DenseNet: kaiming_normal_(mode='fan_out', nonlinearity='relu').
torch_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch nn.Linear default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

NUM_STAGES = 4

_PLAIN = threading.local()


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
  """Within this block, models traced use the plain XLA ops (`lax.conv`, grouped conv,
  `nn.max_pool`, a plain dot for 1x1 convs) whatever the backend, instead of the CPU
  custom-VJP layers: what an exporter (ONNX) can convert, with the same values.

  Read at trace time: a function jitted before the block keeps its first trace, so
  trace (jit, export) a fresh function inside it. Nests; per thread.
  """
  depth = getattr(_PLAIN, "depth", 0)
  _PLAIN.depth = depth + 1
  try:
    yield
  finally:
    _PLAIN.depth = depth


def _plain_path() -> bool:
  """True where layers use the plain XLA ops: off CPU, or inside `plain_ops()`."""
  return getattr(_PLAIN, "depth", 0) > 0 or jax.default_backend() != "cpu"


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Module:
  """A bias-free square conv with explicit symmetric padding, as PyTorch's Conv2d.

  1x1 convs without padding are `Conv1x1`, other ungrouped convs `ConvKxK`: the same
  parameter, init and function as `nn.Conv`, with a backward pass that is several
  times faster on CPU (see their docstrings). Grouped convs are `nn.Conv`.
  """
  if kernel == 1 and padding == 0 and groups == 1:
    return Conv1x1(features, stride, dtype=dtype, name=name)
  if groups == 1:
    return ConvKxK(features, kernel, stride, padding, dtype=dtype, name=name)
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


@jax.custom_vjp
def pointwise_dot(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """`x @ kernel` over the last axis of x ([..., Cin] x [Cin, Cout] -> [..., Cout]).

  The custom backward contracts the flattened positions directly for the kernel
  gradient (dk = x^T dy as one [Cin, M] x [M, Cout] dot). Autodiff's transpose of
  the same dot instead asks for dy transposed to [Cout, M]; XLA:CPU then spends most
  of the time of a MobileNetV2 train step on that copy and a slow dot (5x slower
  for a 1x1 conv's gradient at 72x32x16, 16->96 channels, one EPYC core; issue 16).
  """
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_fwd(x, kernel):
  return pointwise_dot(x, kernel), (x, kernel)


def _pointwise_bwd(res, g):
  x, kernel = res
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dk = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
  dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


pointwise_dot.defvjp(_pointwise_fwd, _pointwise_bwd)


def _view(xp: jnp.ndarray, dy: int, dx: int, stride: int, ho: int, wo: int) -> jnp.ndarray:
  """The [n, ho, wo, C] map of a padded input's tap (dy, dx) under a window with `stride`."""
  return xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride, :]


def _im2col(xp: jnp.ndarray, k: int, stride: int, ho: int, wo: int) -> jnp.ndarray:
  """[n, ho, wo, k*k*C] patches of a padded map, taps in (dy, dx, c) order (HWIO)."""
  return jnp.concatenate(
      [_view(xp, dy, dx, stride, ho, wo) for dy in range(k) for dx in range(k)], axis=-1)


def _conv_nhwc(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_kxk(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
  """Ungrouped NHWC conv (HWIO kernel) whose kernel gradient is im2col + one dot per
  chunk of the batch.

  XLA:CPU computes a conv's kernel gradient as a convolution whose window is the
  whole feature map; with the patches of a few images at a time (at most 1 MiB, so
  they stay in cache) and one [k*k*Cin, M] x [M, Cout] dot each it is up to 5x faster
  (one EPYC core, batch 72: ResNet-50's stem at 128x64 703 ms -> 155 ms, MobileNetV2's
  stem at 64x32 27 -> 4 ms; issue 16). The input gradient stays XLA's transposed conv.
  """
  return _conv_nhwc(x, kernel, stride, padding)


def _conv_kxk_fwd(x, kernel, stride, padding):
  return _conv_nhwc(x, kernel, stride, padding), (x, kernel)


def _conv_kxk_bwd(stride, padding, res, g):
  x, kernel = res
  k, cin, cout = kernel.shape[0], kernel.shape[2], kernel.shape[3]
  n, ho, wo = g.shape[0], g.shape[1], g.shape[2]
  dx = jax.vjp(lambda v: _conv_nhwc(v, kernel, stride, padding), x)[1](g)[0]
  acc = jnp.promote_types(x.dtype, jnp.float32)

  def chunk_grad(xg: tuple[jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
    xc, gc = xg
    xp = jnp.pad(xc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = _im2col(xp, k, stride, ho, wo).reshape(-1, k * k * cin)
    return jax.lax.dot_general(cols, gc.reshape(-1, cout), (((0,), (0,)), ((), ())),
                               preferred_element_type=acc)

  m = _batch_chunk(n, ho * wo * k * k * cin * x.dtype.itemsize, 1 << 20)
  dk = _sum_over_chunks(chunk_grad, x, g, m, (k * k * cin, cout), acc)
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


class ConvKxK(nn.Module):
  """Bias-free square conv, `nn.Conv(features, (k, k), stride, symmetric padding)`'s
  function and parameter (`kernel`, HWIO), computed by `conv_kxk` on CPU and by XLA's
  convolution (and its autodiff) on GPU/TPU, where the chunked kernel gradient would
  only add a sequential loop."""

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param("kernel", torch_conv_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    if _plain_path():  # cuDNN / TPU convs: autodiff's backward is fine
      return _conv_nhwc(x, kernel, self.stride, self.padding)
    return conv_kxk(x, kernel, self.stride, self.padding)

  def cost_macs(self, args: tuple, output: Any) -> int:
    """Per-image multiply-adds (for `reid_jax.models.cost`)."""
    return math.prod(output.shape[1:]) * self.kernel_size**2 * int(args[0].shape[-1])


class Conv1x1(nn.Module):
  """Bias-free 1x1 conv (optionally strided), `nn.Conv(features, (1, 1))`'s function.

  Same parameter (`kernel`, HWIO (1, 1, Cin, Cout)), init and name as the `nn.Conv`
  it replaces, so checkpoints and imported weights are interchangeable. A stride
  subsamples first (what a 1x1 conv with that stride computes), then `pointwise_dot`.
  """

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", torch_conv_init, (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    if self.stride > 1:
      x = x[:, ::self.stride, ::self.stride, :]
    if getattr(_PLAIN, "depth", 0):  # `plain_ops()`: the same dot, without the custom VJP
      return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    return pointwise_dot(x, kernel[0, 0])

  def cost_macs(self, args: tuple, output: Any) -> int:
    """Per-image multiply-adds (for `reid_jax.models.cost`)."""
    return math.prod(output.shape[1:]) * int(args[0].shape[-1])


def _shift_taps(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """sum over the 9 taps of x (zero-padded by 1) shifted and strided, times kernel[dy, dx]."""
  h, w = x.shape[1], x.shape[2]
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = None
  for dy in range(3):
    for dx in range(3):
      tap = _view(xp, dy, dx, stride, ho, wo) * kernel[dy, dx]
      out = tap if out is None else out + tap
  return out


def _batch_chunk(n: int, image_bytes: int, target: int = 1 << 19) -> int:
  """Largest divisor of n whose chunk of images holds at most `target` bytes (>= 1)."""
  best = 1
  for d in range(1, n + 1):
    if n % d == 0 and d * image_bytes <= target:
      best = d
  return best


def _sum_over_chunks(fn, x: jnp.ndarray, g: jnp.ndarray, m: int,
                     shape: tuple[int, ...], dtype: Any) -> jnp.ndarray:
  """sum_i fn((x_i, g_i)) over consecutive chunks of m images, accumulated in a scan
  carry (a stacked [chunks, ...] result summed afterwards is slower on CPU); one call
  when the whole batch is one chunk."""
  n = x.shape[0]
  if m == n:
    return fn((x, g))
  xs = x.reshape(n // m, m, *x.shape[1:])
  gs = g.reshape(n // m, m, *g.shape[1:])
  step = lambda acc, xg: (acc + fn(xg), None)
  return jax.lax.scan(step, jnp.zeros(shape, dtype), (xs, gs))[0]


def _depthwise_kernel_grad(x: jnp.ndarray, g: jnp.ndarray, stride: int) -> jnp.ndarray:
  """d(loss)/d(kernel) [3, 3, C] of `_shift_taps`, summed over chunks of the batch.

  Each tap's sum of x_shifted * g needs the shifted copy of x in memory (the
  reduction runs in a library kernel that XLA cannot fuse the slice into); over a
  chunk of a few images those copies stay in cache. On the 2-core EPYC this is
  4x faster than one pass over a batch of 72 (72x32x16x96, one core: 116 ms -> 29 ms).
  """
  n, h, w, c = x.shape
  ho, wo = g.shape[1], g.shape[2]
  acc = jnp.promote_types(x.dtype, jnp.float32)

  def chunk_grad(xg: tuple[jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
    xc, gc = xg
    xp = jnp.pad(xc, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [jnp.sum(_view(xp, dy, dx, stride, ho, wo) * gc, axis=(0, 1, 2), dtype=acc)
            for dy in range(3) for dx in range(3)]
    return jnp.stack(taps).reshape(3, 3, c)

  m = _batch_chunk(n, h * w * c * x.dtype.itemsize)
  return _sum_over_chunks(chunk_grad, x, g, m, (3, 3, c), acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shift(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """3x3 depthwise conv, padding 1, as 9 shifted multiply-adds (kernel [3, 3, C]).

  The backward pass is written out: the input gradient is the same shifted sum over
  the (stride-dilated) output gradient with the kernel flipped, one fused loop; the
  kernel gradient is `_depthwise_kernel_grad`. Autodiff of the forward instead
  materialises nine padded copies of the input at full batch size.
  """
  return _shift_taps(x, kernel, stride)


def _depthwise_fwd(x, kernel, stride):
  return _shift_taps(x, kernel, stride), (x, kernel)


def _depthwise_bwd(stride, res, g):
  x, kernel = res
  h, w = x.shape[1], x.shape[2]
  ho, wo = g.shape[1], g.shape[2]
  dk = _depthwise_kernel_grad(x, g, stride)
  if stride > 1:  # put g back on the input grid (zeros between), then a stride-1 sum
    zero = jnp.zeros((), g.dtype)
    g = jax.lax.pad(g, zero, ((0, 0, 0), (0, h - stride * (ho - 1) - 1, stride - 1),
                              (0, w - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
  dx = _shift_taps(g, kernel[::-1, ::-1], 1)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


depthwise_shift.defvjp(_depthwise_fwd, _depthwise_bwd)


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
      impl = "conv" if _plain_path() else "shift"
    s = self.stride
    if impl == "conv":
      return jax.lax.conv_general_dilated(
          x, kernel, (s, s), ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    if impl != "shift":
      raise ValueError(f"depthwise impl must be 'auto', 'conv' or 'shift', got {impl!r}")
    return depthwise_shift(x, kernel[:, :, 0, :], s)

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


_WINDOW_3X3 = tuple((dy, dx) for dy in range(3) for dx in range(3))


def _pool_taps(xp: jnp.ndarray, ho: int, wo: int) -> list[jnp.ndarray]:
  """The 9 stride-2 views of a padded map, in window (row-major) order."""
  return [_view(xp, dy, dx, 2, ho, wo) for dy, dx in _WINDOW_3X3]


def _max_pool_fwd(x: jnp.ndarray) -> tuple[jnp.ndarray, tuple]:
  h, w = x.shape[1], x.shape[2]
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  y = functools.reduce(jnp.maximum, _pool_taps(xp, ho, wo))
  return y, (x, y)


def _max_pool_bwd(res: tuple, g: jnp.ndarray) -> tuple[jnp.ndarray]:
  """Each output's gradient goes to the first position of its window holding the max
  (PyTorch's and XLA's choice on ties), scattered back by interior padding so that
  the nine taps add up in one fused loop."""
  x, y = res
  h, w = x.shape[1], x.shape[2]
  ho, wo = y.shape[1], y.shape[2]
  zero = jnp.zeros((), g.dtype)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  free = jnp.ones(y.shape, bool)
  dxp = None
  for (dy, dx), tap in zip(_WINDOW_3X3, _pool_taps(xp, ho, wo)):
    hit = free & (tap == y)
    free = free & ~hit
    back = jax.lax.pad(jnp.where(hit, g, zero), zero,
                       ((0, 0, 0), (dy, h + 2 - dy - 2 * (ho - 1) - 1, 1),
                        (dx, w + 2 - dx - 2 * (wo - 1) - 1, 1), (0, 0, 0)))
    dxp = back if dxp is None else dxp + back
  return (dxp[:, 1:h + 1, 1:w + 1, :],)


def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """PyTorch MaxPool2d(kernel_size=3, stride=2, padding=1) (padding never wins the max):
  `max_pool_taps` on CPU, `nn.max_pool` on GPU/TPU and inside `plain_ops()`. Same
  values either way."""
  if getattr(_PLAIN, "depth", 0):  # `plain_ops()`: a -inf pad and a VALID 2-D pool, the
    # form ONNX converters map to MaxPool (jax2onnx patches nn.max_pool, string padding)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(xp, window_shape=(3, 3), strides=(2, 2), padding="VALID")
  if jax.default_backend() != "cpu":
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return max_pool_taps(x)


@jax.custom_vjp
def max_pool_taps(x: jnp.ndarray) -> jnp.ndarray:
  """3x3 max pool, stride 2, padding 1, as the max of 9 strided views, with a
  written-out backward: autodiff of `nn.max_pool` builds four index maps per step
  and is 4x slower on CPU
  (ResNet-50's stem at 128x64, batch 72, one EPYC core: 497 ms -> 131 ms; issue 16).
  """
  return _max_pool_fwd(x)[0]


max_pool_taps.defvjp(_max_pool_fwd, _max_pool_bwd)


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
