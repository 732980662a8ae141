"""vit: the Vision Transformer, the BiT ResNet it is compared with, and the math of training them.
Plain PyTorch/DeepSpeed; never imports Ray.

The names below are loaded on first use, so that `vit.variants` (which the config schema imports)
does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ViTConfig": "vit.config",
    "BiTConfig": "vit.config",
    "VisionTransformer": "vit.model",
    "ResNetV2": "vit.bit",
    "build_model": "vit.models",
    "patchify": "vit.patches",
    "unpatchify": "vit.patches",
    "forward_flops": "vit.flops",
    "train_flops": "vit.flops",
    "save_pretrained": "vit.weights",
    "load_pretrained": "vit.weights",
    "export_hf": "vit.hf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vit' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
