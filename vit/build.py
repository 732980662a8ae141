"""A model from its architecture: the one place a config's family meets its module (ViT or BiT)."""

from __future__ import annotations

import torch
from torch import nn

from vit.bit import ResNetV2
from vit.config import Architecture, BiTConfig
from vit.model import VisionTransformer


def build_model(config: Architecture, device: torch.device | str | None = None) -> nn.Module:
    """A freshly initialised model of `config` (a ViTConfig or a BiTConfig). Without `device`, built and
    initialised on the CPU; with one, built on the meta device (no memory) and initialised where it will
    live, so a large model is allocated once and never on the CPU first. From the same seed, the CPU
    weights of both ways are identical."""
    family = ResNetV2 if isinstance(config, BiTConfig) else VisionTransformer
    if device is None:
        return family(config)
    with torch.device("meta"):
        model = family(config)
    model.to_empty(device=device)
    model.reset_parameters()
    return model
