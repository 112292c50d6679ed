"""Backbones (all four stage maps), embedding heads, the ReID model and its cost model.

The MobileNetV2 constructor is `reid_jax.models.mobilenetv2.mobilenetv2` (or
`BACKBONES['mobilenetv2']`); it is not re-exported so the submodule name stays usable.
"""

from reid_jax.models.cost import exit_costs, format_costs
from reid_jax.models.densenet import DenseNet, densenet201
from reid_jax.models.heads import DaReHead, EmbeddingMLP, Fusion, TriNetHead
from reid_jax.models.mobilenetv2 import MobileNetV2
from reid_jax.models.reid_model import (
    BACKBONES,
    ReIDModel,
    build_model,
    default_model_config,
)
from reid_jax.models.resnet import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet_small,
)

__all__ = [
    "BACKBONES",
    "DaReHead",
    "DenseNet",
    "EmbeddingMLP",
    "Fusion",
    "MobileNetV2",
    "ReIDModel",
    "ResNet",
    "TriNetHead",
    "build_model",
    "default_model_config",
    "densenet201",
    "exit_costs",
    "format_costs",
    "resnet101",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet_small",
]
