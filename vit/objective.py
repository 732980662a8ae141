"""The one training step of every loop (pretraining on DeepSpeed, fine-tuning, the benchmark baseline):
flip, normalise, soft targets, mixup, logits, soft-target cross-entropy, correct count; and the optimizer
a recipe names, over decay and no-decay groups.

Weight decay applies to weight matrices only: biases, LayerNorm scales, the position embeddings and the
class token are left undecayed (they are not there to be shrunk towards zero).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vit.augment import (
    center_crop,
    hflip_patches,
    inception_boxes,
    mixup,
    resized_crop,
    soft_targets,
    stored_geometry,
)
from vit.patches import PatchGeometry
from vit.recipe import Optimizer, Recipe

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


def make_optimizer(model: nn.Module, optimizer: Optimizer) -> torch.optim.Optimizer:
    """AdamW or SGD-momentum over the decay/no-decay groups, torch's fused kernels on every device (on CPUs
    AdamW's is 7.4x faster than its per-tensor loop: benchmarks/results/fused_optimizer.json)."""
    groups = param_groups(model, optimizer.weight_decay)
    if optimizer.name == "adamw":
        return torch.optim.AdamW(groups, lr=optimizer.lr, betas=optimizer.betas, fused=True)
    return torch.optim.SGD(groups, lr=optimizer.lr, momentum=optimizer.momentum, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the rate of the next optimizer step in every group (a DeepSpeed ZeRO optimizer's groups are
    its wrapped optimizer's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def use_bf16(setting: Literal["auto"] | bool, device: torch.device) -> bool:
    """`bf16: auto` is bf16 on a GPU that supports it (Ampere and newer), fp32 on CPUs and older GPUs."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(setting)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against soft targets (label smoothing, mixup), in fp32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def step_randomness(seed: int, rank: int, step: int) -> np.random.Generator:
    """Seed the step's randomness from (seed, rank, step): torch's generators on every device (crop boxes,
    flips, dropout, drop-path) and the returned numpy generator (mixup's weight). Each rank draws its own
    crops and masks, and a resumed run draws at each step exactly what an unbroken run drew there."""
    entropy = np.random.SeedSequence([seed, rank, step])
    torch.manual_seed(int(entropy.generate_state(1, np.uint64)[0] >> 1))  # a non-negative 63-bit seed
    return np.random.default_rng(entropy)


@dataclass
class StepLoss:
    """One micro-batch's loss (still attached to the graph) and how many of its images were right (a
    0-dim tensor on the device: reading it would wait for the step)."""

    loss: torch.Tensor
    correct: torch.Tensor
    images: int


def training_loss(
    model: nn.Module,
    patches: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    rng: np.random.Generator,
    forward: Callable[..., torch.Tensor] | None = None,
) -> StepLoss:
    """The forward half of a training step on uint8 patches already on the device: crop and flip,
    normalise, soft targets, mixup, logits, soft-target cross-entropy. `forward` is what computes the
    logits (a DeepSpeed engine wrapping `model`; default `model` itself); the caller runs backward and the
    optimizer."""
    config = model.config
    patches = training_view(patches, config.geometry, recipe)
    images = model.normalize(patches)
    targets = soft_targets(labels, config.num_classes, recipe.label_smoothing)
    if recipe.mixup_alpha > 0:
        images, targets = mixup(images, targets, float(rng.beta(recipe.mixup_alpha, recipe.mixup_alpha)))
    logits = (model if forward is None else forward)(images, normalized=True)
    correct = (logits.detach().argmax(-1) == labels).sum()
    return StepLoss(soft_cross_entropy(logits, targets), correct, labels.shape[0])


def training_view(patches: torch.Tensor, geometry: PatchGeometry, recipe: Recipe) -> torch.Tensor:
    """What the model trains on of patches stored at `recipe.input_size`: the recipe's random resized
    crop with its flip folded in (float pixels), else the flip on the stored uint8 and the centre crop
    (as evaluation takes it); patches of the model's `geometry` either way."""
    stored = stored_geometry(geometry, recipe.input_size)
    flip = torch.rand(patches.shape[0], device=patches.device) < 0.5 if recipe.flip else None
    if recipe.crop is not None:
        boxes = inception_boxes(patches.shape[0], stored.image_size, recipe.crop, patches.device)
        return resized_crop(patches, stored, geometry, boxes, flip)
    if flip is not None:
        patches = hflip_patches(patches, stored, flip)
    return center_crop(patches, stored, geometry)
