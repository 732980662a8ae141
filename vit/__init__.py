"""vit: the Vision Transformer and the math of training it. Plain PyTorch/DeepSpeed; never imports Ray.

The names below are loaded on first use, so that `vit.variants` (which the config schema imports)
does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ViTConfig": "vit.config",
    "VisionTransformer": "vit.model",
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
