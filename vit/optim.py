"""Optimizer parameter groups and learning-rate schedules of the paper's recipe.

Weight decay applies to weight matrices only: biases, LayerNorm scales, the position embeddings and the
class token are left undecayed (they are not there to be shrunk towards zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token")


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Whether weight decay applies to this parameter: matrices yes, vectors and embeddings no."""
    return parameter.ndim >= 2 and not any(part in NO_DECAY_NAMES for part in name.split("."))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups, decayed weight matrices and the rest; frozen parameters are left out."""
    decayed, plain = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decayed if decays(name, parameter) else plain).append(parameter)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


@dataclass(frozen=True)
class WarmupDecay:
    """LR multiplier at an optimizer step: linear warmup to 1, then cosine or linear decay to `floor`.

    A callable object rather than a closure, so `LambdaLR.state_dict()` saves its settings with the
    checkpoint (it saves the `__dict__` of callable objects, nothing of plain functions).
    """

    total_steps: int
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    floor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.floor + (1.0 - self.floor) * shape
