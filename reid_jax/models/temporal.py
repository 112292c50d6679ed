"""Temporal pooling of frame features into one feature per tracklet (video re-ID).

Training batches of video sets hold B tracklets x T frames laid out tracklet-major
([B*T, ...]: the frames of tracklet i at rows i*T .. i*T+T-1, see
`reid_jax.data.pipeline.train_loader(sampler='tracklets')`); the loss is computed on
the pooled [B, ...] tracklet features. 'mean' is the temporal average pooling of Gao &
Nevatia 2018 (jiyanggao/Video-Person-ReID, `resnet50tp`); 'max' the element-wise max
the official MARS evaluation code pools test features with (MARS-evaluation,
`utils/process_box_feat.m`).
"""

from __future__ import annotations

import jax.numpy as jnp

POOLS = ("mean", "max")


def check_pool(mode: str, field: str = "config.model.temporal_pool") -> str:
  """The pooling mode, or a one-line error naming the setting."""
  if mode not in POOLS:
    raise ValueError(f"{field}={mode!r}: use one of {POOLS}")
  return mode


def temporal_pool(x: jnp.ndarray, frames: int, mode: str = "mean") -> jnp.ndarray:
  """[B*frames, ...] tracklet-major -> [B, ...] (mean in float32, or element-wise max).

  frames=1 returns x unchanged (image training).
  """
  check_pool(mode)
  if frames == 1:
    return x
  if x.shape[0] % frames:
    raise ValueError(f"{x.shape[0]} frames do not split into tracklets of {frames}")
  y = x.reshape((x.shape[0] // frames, frames) + x.shape[1:])
  if mode == "mean":
    return jnp.mean(y.astype(jnp.float32), axis=1).astype(x.dtype)
  return jnp.max(y, axis=1)
