"""Augmentations on patch tensors, on the device: the images never leave their patch layout.

Patches are `[B, N, P*P*C]` in `vit.patches` layout (row-major grid, each patch (row, col, channel)).
"""

from __future__ import annotations

import torch

from vit.patches import PatchGeometry


def hflip_patches(
    patches: torch.Tensor, geometry: PatchGeometry, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Mirror images left-right: reverse the patch columns of the grid and the pixel columns of each
    patch. `flip` is a bool mask [B] of which images to mirror (all when None)."""
    grid, size = geometry.grid, geometry.patch_size
    shaped = patches.view(patches.shape[0], grid, grid, size, size, geometry.channels)
    mirrored = shaped.flip(2).flip(4).reshape(patches.shape)
    if flip is None:
        return mirrored
    return torch.where(flip.view(-1, 1, 1), mirrored, patches)


def random_hflip(
    patches: torch.Tensor, geometry: PatchGeometry, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror each image with probability 1/2."""
    flip = torch.rand(patches.shape[0], device=patches.device, generator=generator) < 0.5
    return hflip_patches(patches, geometry, flip)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: 1 - s + s/K on the label, s/K elsewhere."""
    targets = torch.full((labels.shape[0], num_classes), smoothing / num_classes, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + smoothing / num_classes)


def mixup(images: torch.Tensor, targets: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each normalised image and its soft target with the batch's reverse by `weight` (drawn by the
    caller from Beta(alpha, alpha), once per batch, as in Zhang et al. 2018)."""
    mixed = images.mul(weight).add_(images.flip(0), alpha=1.0 - weight)
    return mixed, targets.mul(weight).add_(targets.flip(0), alpha=1.0 - weight)
