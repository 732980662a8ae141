"""A model from its architecture: the one place a config's family meets its module (ViT or BiT)."""

from __future__ import annotations

from torch import nn

from vit.bit import ResNetV2
from vit.config import Architecture, BiTConfig
from vit.model import VisionTransformer


def build_model(config: Architecture) -> nn.Module:
    """A freshly initialised model of `config` (a ViTConfig or a BiTConfig)."""
    if isinstance(config, BiTConfig):
        return ResNetV2(config)
    return VisionTransformer(config)
