"""Augmentations on patch tensors, on the device: the images never leave their patch layout.

Patches are `[B, N, P*P*C]` in `vit.patches` layout (row-major grid, each patch (row, col, channel)).
"""

from __future__ import annotations

import math

import torch

from vit.patches import PatchGeometry, patchify, unpatchify
from vit.recipe import Crop

Boxes = torch.Tensor  # [B, 4] float: top, left, height, width in pixels of the stored image


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


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: 1 - s + s/K on the label, s/K elsewhere."""
    targets = torch.full((labels.shape[0], num_classes), smoothing / num_classes, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + smoothing / num_classes)


def mixup(images: torch.Tensor, targets: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each normalised image and its soft target with the batch's reverse by `weight` (drawn by the
    caller from Beta(alpha, alpha), once per batch, as in Zhang et al. 2018)."""
    mixed = images.mul(weight).add_(images.flip(0), alpha=1.0 - weight)
    return mixed, targets.mul(weight).add_(targets.flip(0), alpha=1.0 - weight)


# ---------------------------------------------------------------- crops


def inception_boxes(
    batch: int,
    size: int,
    crop: Crop,
    device: torch.device,
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> Boxes:
    """A random box per image of a `size`-pixel square: area a fraction in `crop.area`, aspect ratio
    log-uniform in `crop.aspect`, whole pixels, inside the image (as Szegedy et al. and torchvision's
    RandomResizedCrop draw it); after `tries` draws that do not fit, the whole image."""
    shape = (batch, tries)
    area = torch.empty(shape, device=device).uniform_(*crop.area, generator=generator) * size * size
    log_ratio = torch.empty(shape, device=device).uniform_(*map(math.log, crop.aspect), generator=generator)
    ratio = log_ratio.exp()
    width, height = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    fits = (width >= 1) & (height >= 1) & (width <= size) & (height <= size)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((batch,), -1, device=device))
    pick = first.clamp(min=0).view(-1, 1)
    height = torch.where(
        first >= 0, height.gather(1, pick).squeeze(1), torch.full_like(first, size, dtype=torch.float)
    )
    width = torch.where(
        first >= 0, width.gather(1, pick).squeeze(1), torch.full_like(first, size, dtype=torch.float)
    )
    top = (torch.rand(batch, device=device, generator=generator) * (size - height + 1)).floor()
    left = (torch.rand(batch, device=device, generator=generator) * (size - width + 1)).floor()
    return torch.stack([top, left, height, width], dim=1)


def resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, out: int) -> torch.Tensor:
    """[B, out, size] weights that resample pixels [start, start + length) of a row of `size` to `out`
    pixels: a triangle (linear) filter, widened by the scale when shrinking (antialiased, as PIL's
    bilinear resize), normalised, pixels outside the box weightless."""
    scale = (length / out).view(-1, 1, 1)
    centres = start.view(-1, 1, 1) + (torch.arange(out, device=start.device).view(1, -1, 1) + 0.5) * scale
    pixels = torch.arange(size, device=start.device).view(1, 1, -1) + 0.5
    support = scale.clamp(min=1.0)
    weights = (1 - (pixels - centres).abs() / support).clamp(min=0)
    inside = (pixels > start.view(-1, 1, 1)) & (pixels < (start + length).view(-1, 1, 1))
    weights = weights * inside
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)


def resized_crop(
    patches: torch.Tensor,
    stored: PatchGeometry,
    target: PatchGeometry,
    boxes: Boxes,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each image's box resized to the target's size, on the patch layout: uint8 or float patches of the
    stored geometry in, float pixel patches (0-255) of the target geometry out. Two batched matmuls
    (rows then columns), so the cost is small next to the model's; `flip` [B] mirrors those images."""
    images = unpatchify(patches, stored.patch_size, stored.channels).float()  # [B, H, W, C]
    rows = resize_weights(boxes[:, 0], boxes[:, 2], stored.image_size, target.image_size)
    cols = resize_weights(boxes[:, 1], boxes[:, 3], stored.image_size, target.image_size)
    if flip is not None:  # mirrored output columns: the flip costs nothing more
        cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    out = torch.einsum("boh,bhwc,bpw->bopc", rows, images, cols)
    return patchify(out, target.patch_size)


def center_crop(patches: torch.Tensor, stored: PatchGeometry, target: PatchGeometry) -> torch.Tensor:
    """The central target-size square of each stored image, pixels as they are (evaluation's crop): the
    same dtype in, patches of the target geometry out."""
    if stored.image_size == target.image_size:
        return patches
    offset = (stored.image_size - target.image_size) // 2
    images = unpatchify(patches, stored.patch_size, stored.channels)
    window = images[:, offset : offset + target.image_size, offset : offset + target.image_size]
    return patchify(window, target.patch_size)


def stored_geometry(target: PatchGeometry, input_size: int | None) -> PatchGeometry:
    """The geometry batches arrive in: the model's patches and channels at the stored image size."""
    if input_size is None or input_size == target.image_size:
        return target
    return PatchGeometry(input_size, target.patch_size, target.channels)
