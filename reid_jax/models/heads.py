"""Embedding heads: DaRe (one embedding per stage + learned fusion) and TriNet.

Heads take the backbone's list of stage maps and return a dict of float32 embeddings
(so losses run in fp32 even when the network computes in bfloat16). Submodules are
named after the exit they serve (`stage2`, `stage2_prenorm`, `fused`, `final`); the
cost model (`reid_jax.models.cost`) relies on this to attribute head MACs to exits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reid_jax.models.layers import (
    NUM_STAGES,
    Dtype,
    batch_norm,
    global_avg_pool,
    torch_linear_init,
)


def _torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch nn.Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dense(features: int, fan_in: int, dtype: Dtype, name: str) -> nn.Dense:
  """nn.Dense with PyTorch nn.Linear's default init (as in the official DaRe code)."""
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_linear_init,
      bias_init=_torch_bias_init(fan_in),
      name=name,
  )


class EmbeddingMLP(nn.Module):
  """Dense(hidden) + BatchNorm + ReLU + Dense(embed) on a pooled feature vector."""

  hidden_dim: int = 1024
  embed_dim: int = 128
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = dense(self.hidden_dim, x.shape[-1], self.dtype, "fc1")(x)
    x = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "bn")(x))
    return dense(self.embed_dim, self.hidden_dim, self.dtype, "fc2")(x)


class Fusion(nn.Module):
  """Learned weighted sum of stage embeddings: sum_s w_s * e_s (one scalar per stage).

  `init_scheme='torch'` draws w ~ U(-1/sqrt(S), 1/sqrt(S)), the PyTorch default init of the
  official DaRe code's `fusion_conv = nn.Conv1d(4, 1, kernel_size=1, bias=False)`
  (github.com/mileyan/DARENet, models/dare_resnet.py and dare_densenet.py; the
  weights are never re-initialised there). `init_scheme='mean'` starts at w_s = 1/S.
  """

  num_inputs: int = NUM_STAGES
  init_scheme: str = "torch"

  def _init_weights(self, key: jax.Array, shape: Sequence[int]) -> jax.Array:
    if self.init_scheme == "torch":
      bound = 1.0 / math.sqrt(self.num_inputs)
      return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    if self.init_scheme == "mean":
      return jnp.full(shape, 1.0 / self.num_inputs, jnp.float32)
    raise ValueError(f"fusion init must be 'torch' or 'mean', got {self.init_scheme!r}")

  @nn.compact
  def __call__(self, embeddings: Sequence[jnp.ndarray]) -> jnp.ndarray:
    if len(embeddings) != self.num_inputs:
      raise ValueError(f"Fusion expects {self.num_inputs} embeddings, got {len(embeddings)}")
    w = self.param("weights", self._init_weights, (self.num_inputs,))
    stacked = jnp.stack([e.astype(jnp.float32) for e in embeddings], axis=0)
    return jnp.tensordot(w, stacked, axes=1)

  def cost_macs(self, args: tuple, output: jnp.ndarray) -> int:
    """Per-image multiply-adds of the weighted sum (read by the cost model)."""
    return self.num_inputs * int(output.shape[-1])


class DaReHead(nn.Module):
  """DaRe head (Wang et al., CVPR 2018, Sec. 3.1) on every backbone stage.

  Per stage s: global average pool -> Dense(hidden) + BN + ReLU -> Dense(embed) gives
  `stage{s}`; `fused` = Fusion of the four stage embeddings. With fewer stage maps
  (early exit) only the available stages are embedded and there is no `fused`.

  Attributes:
    hidden_dim: width of the hidden layer (1024 in the paper).
    embed_dim: embedding size (128 in the paper).
    fusion_init: 'torch' (official code) or 'mean' (1/num_stages); see `Fusion`.
    prenorm_stages: stages whose map gets an extra BatchNorm + ReLU before pooling.
      The official DenseNet-201 DaRe does this for stages 1-3, whose dense-block
      outputs are not normalised (`build_model` sets it for densenet201).
    dtype: compute dtype; outputs are cast to float32.
    bn_axis_name: pmap axis over which BatchNorm statistics are averaged in training.
  """

  hidden_dim: int = 1024
  embed_dim: int = 128
  fusion_init: str = "torch"
  prenorm_stages: Sequence[int] = ()
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], train: bool = False) -> dict[str, jnp.ndarray]:
    if not 1 <= len(features) <= NUM_STAGES:
      raise ValueError(f"DaReHead expects 1..{NUM_STAGES} stage maps, got {len(features)}")
    out = {}
    for s, fmap in enumerate(features, start=1):
      x = jnp.asarray(fmap, self.dtype)
      if s in self.prenorm_stages:
        x = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, f"stage{s}_prenorm")(x))
      emb = EmbeddingMLP(
          self.hidden_dim, self.embed_dim, self.dtype, self.bn_axis_name, name=f"stage{s}"
      )(global_avg_pool(x), train)
      out[f"stage{s}"] = emb.astype(jnp.float32)
    if len(features) == NUM_STAGES:
      stage_embs = [out[f"stage{s}"] for s in range(1, NUM_STAGES + 1)]
      out["fused"] = Fusion(NUM_STAGES, self.fusion_init, name="fused")(stage_embs)
    return out


class TriNetHead(nn.Module):
  """TriNet head (Hermans et al., 2017): GAP of the last stage -> Dense + BN + ReLU -> Dense.

  Returns `{'final': embedding}` (float32); with an early exit before the last stage
  (stage `num_stages`; < 4 for a truncated backbone) the result is `{}`.
  """

  hidden_dim: int = 1024
  embed_dim: int = 128
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  num_stages: int = NUM_STAGES

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], train: bool = False) -> dict[str, jnp.ndarray]:
    if len(features) < self.num_stages:
      return {}
    x = global_avg_pool(jnp.asarray(features[self.num_stages - 1], self.dtype))
    emb = EmbeddingMLP(self.hidden_dim, self.embed_dim, self.dtype, self.bn_axis_name, name="final")(x, train)
    return {"final": emb.astype(jnp.float32)}
