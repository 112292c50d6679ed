"""Video (tracklet) training options shared by the method families that support them.

A config trains on tracklets when `config.input.video.T >= 1`: batches of P identities x
K tracklets x T frames (`reid_jax.data.samplers.TrackletSampler`), frame features pooled
per tracklet by `config.model.temporal_pool` before the loss (`reid_jax.models.temporal`).
Evaluation ranks tracklets pooled the same way: protocol `video` (mean) or `video_max`.
Configs without `config.input.video` (every image config) train on images as before.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from reid_jax.core import evaluators
from reid_jax.data import samplers as smp
from reid_jax.models import temporal

# The protocol that pools tracklets with each temporal pooling mode.
PROTOCOL_OF_POOL = {"mean": "video", "max": "video_max"}


def frames(config: ml_collections.ConfigDict) -> int:
  """T, the frames per training tracklet (0: image training)."""
  video = config.input.get("video", None)
  return int(video.T) if video is not None else 0


def pool_mode(config: ml_collections.ConfigDict) -> str:
  """config.model.temporal_pool ('mean' when unset)."""
  return config.model.get("temporal_pool", "mean")


def loader_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`pipeline.train_loader` arguments of the tracklet sampler."""
  v = config.input.video
  return dict(sampler="tracklets", P=config.input.P, K=config.input.K, T=int(v.T),
              frame_sample=v.sample, short=v.short)


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line errors for bad video settings (no-op for image training)."""
  t = frames(config)
  if "video" in config.input and t < 1:
    raise ValueError(f"config.input.video.T={t}: frames per tracklet must be >= 1 (or "
                     "drop config.input.video for image training)")
  if not t:
    return
  v = config.input.video
  if v.sample not in smp.FRAME_SAMPLES:
    raise ValueError(f"config.input.video.sample={v.sample!r}: use one of "
                     f"{smp.FRAME_SAMPLES}")
  if v.short not in smp.SHORT_TRACKLETS:
    raise ValueError(f"config.input.video.short={v.short!r}: use one of "
                     f"{smp.SHORT_TRACKLETS}")
  mode = temporal.check_pool(pool_mode(config))
  want = PROTOCOL_OF_POOL[mode]
  for name in evaluators.protocol_names(config.eval.get("protocol", "market")):
    pools = {"market": "mean", "video": "mean", "video_max": "max"}.get(name, mode)
    if pools != mode:
      raise ValueError(f"config.eval.protocol={name}: tracklets trained with "
                       f"config.model.temporal_pool={mode} are ranked pooled the same way; "
                       f"use {want}")
