"""Backbone + embedding head (+ optional ID classifier) and the config-driven builder."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from reid_jax.models.densenet import densenet201
from reid_jax.models.mobilenetv2 import mobilenetv2
from reid_jax.models.resnet import resnet18, resnet34, resnet50, resnet101, resnet_small
from reid_jax.models.heads import DaReHead, TriNetHead, dense
from reid_jax.models.layers import NUM_STAGES, global_avg_pool

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet_small": resnet_small,
    "densenet201": densenet201,
    "mobilenetv2": mobilenetv2,
}
HEADS = ("dare", "trinet")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ReIDModel(nn.Module):
  """Runs `backbone` then `head`; returns the head's dict of float32 embeddings.

  With `num_classes > 0` a Dense classifier (`classifier`) on the globally pooled
  last-stage map (the feature the embedding head starts from) adds float32 `'logits'`
  for classification losses; it is only computed when the last stage is reached.
  `num_stages < 4` truncates the backbone after that stage (a smaller single-exit
  network, e.g. a member of the sequential-ensemble baseline of DaRe §4.1); a
  `max_stage` beyond it runs the truncated network whole.
  Variables are `{'params': {'backbone', 'head', 'classifier'?}, 'batch_stats': ...}`.
  """

  backbone: nn.Module
  head: nn.Module
  num_classes: int = 0
  num_stages: int = NUM_STAGES

  @nn.compact
  def __call__(
      self, x: jnp.ndarray, train: bool = False, max_stage: int | None = None
  ) -> dict[str, jnp.ndarray]:
    stop = self.num_stages if max_stage is None else min(int(max_stage), self.num_stages)
    features = self.backbone(x, train=train, max_stage=stop)
    out = dict(self.head(features, train=train))
    if self.num_classes > 0 and len(features) == self.num_stages:
      pooled = global_avg_pool(features[-1])
      dtype = getattr(self.backbone, "dtype", jnp.float32)
      logits = dense(self.num_classes, pooled.shape[-1], dtype, "classifier")(pooled)
      out["logits"] = logits.astype(jnp.float32)
    return out


def default_model_config() -> ml_collections.ConfigDict:
  """The model section of an experiment config (DaRe on ResNet-50 by default)."""
  return ml_collections.ConfigDict({
      "backbone": "resnet50",  # one of BACKBONES
      "last_stride": 2,  # 1 keeps stage 4 at stride 16
      "width": 16,  # base channels; used by resnet_small only
      "head": "dare",  # 'dare' | 'trinet'
      "num_stages": 4,  # < 4: backbone cut after that stage (single-exit 'trinet' only)
      "embed_dim": 128,
      "hidden_dim": 1024,
      "num_classes": 0,  # > 0 adds an ID classifier ('logits')
      "dtype": "float32",  # compute dtype: 'float32' | 'bfloat16' (params stay fp32)
      "bn_axis_name": None,  # pmap axis name for cross-device BatchNorm statistics
      "fusion_init": "torch",  # DaRe fusion weights: 'torch' (official) | 'mean'
  })


def make_backbone(model_cfg: ml_collections.ConfigDict, bn_axis_name: str | None = None
                  ) -> nn.Module:
  """The backbone a `config.model` names (`backbone`, `last_stride`, `dtype`, and `width`
  for resnet_small), its BatchNorm statistics averaged over `bn_axis_name` in training."""
  kw = dict(last_stride=model_cfg.last_stride, dtype=DTYPES[model_cfg.dtype],
            bn_axis_name=bn_axis_name)
  if model_cfg.backbone == "resnet_small":
    kw["width"] = model_cfg.width
  return BACKBONES[model_cfg.backbone](**kw)


def build_model(config: ml_collections.ConfigDict | dict) -> ReIDModel:
  """Builds a `ReIDModel` from a model config; missing fields take `default_model_config`."""
  cfg = default_model_config()
  cfg.update(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config))
  if cfg.backbone not in BACKBONES:
    raise ValueError(f"model.backbone must be one of {sorted(BACKBONES)}, got {cfg.backbone!r}")
  if cfg.head not in HEADS:
    raise ValueError(f"model.head must be one of {HEADS}, got {cfg.head!r}")
  if cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
  if cfg.last_stride not in (1, 2):
    raise ValueError(f"model.last_stride must be 1 or 2, got {cfg.last_stride!r}")
  if cfg.num_stages not in range(1, NUM_STAGES + 1):
    raise ValueError(f"model.num_stages must be in 1..{NUM_STAGES}, got {cfg.num_stages!r}")
  if cfg.num_stages < NUM_STAGES and cfg.head != "trinet":
    raise ValueError(f"model.num_stages={cfg.num_stages} (a truncated backbone) needs a "
                     f"single-exit head: set model.head='trinet' (got {cfg.head!r})")
  dtype = DTYPES[cfg.dtype]
  backbone = make_backbone(cfg, cfg.bn_axis_name)
  if cfg.head == "dare":
    head = DaReHead(
        hidden_dim=cfg.hidden_dim,
        embed_dim=cfg.embed_dim,
        fusion_init=cfg.fusion_init,
        prenorm_stages=(1, 2, 3) if cfg.backbone == "densenet201" else (),
        dtype=dtype,
        bn_axis_name=cfg.bn_axis_name,
    )
  else:
    head = TriNetHead(
        hidden_dim=cfg.hidden_dim, embed_dim=cfg.embed_dim, dtype=dtype,
        bn_axis_name=cfg.bn_axis_name, num_stages=cfg.num_stages,
    )
  return ReIDModel(backbone=backbone, head=head, num_classes=cfg.num_classes,
                   num_stages=cfg.num_stages)
