"""The patch layout, defined once: images [..., H, W, C] <-> patch tensors [..., N, P*P*C].

Patches follow the image's row-major grid; each patch is flattened in (row, col, channel) order:
`patches[n] = img[r*P:(r+1)*P, c*P:(c+1)*P, :].reshape(-1)` with `n = r * (W // P) + c`.
Preprocessing writes this layout, the model's stem reads it, `inspect` inverts it. Works on numpy
arrays and torch tensors alike, and never copies dtype: uint8 in, uint8 out.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _permute(x: Array, axes: tuple[int, ...]) -> Array:
    return x.permute(*axes) if isinstance(x, torch.Tensor) else np.transpose(x, axes)


def _contiguous(x: Array) -> Array:
    return x.contiguous() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x)


def patchify(images: Array, patch_size: int) -> Array:
    """Cut images [..., H, W, C] into patch tensors [..., (H/P)*(W/P), P*P*C]."""
    if images.ndim < 3:
        raise ValueError(f"patchify expects images [..., H, W, C], got shape {tuple(images.shape)}")
    *lead, height, width, channels = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image of {height}x{width} pixels is not a whole number of {patch_size}x{patch_size} patches"
        )
    rows, cols = height // patch_size, width // patch_size
    n = len(lead)
    grid = images.reshape(*lead, rows, patch_size, cols, patch_size, channels)
    # [..., rows, P, cols, P, C] -> [..., rows, cols, P, P, C]
    axes = (*range(n), n, n + 2, n + 1, n + 3, n + 4)
    patches = _contiguous(_permute(grid, axes))
    return patches.reshape(*lead, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: Array, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> Array:
    """Reassemble images [..., H, W, C] from patch tensors [..., N, P*P*C]; `grid` (rows, cols) defaults
    to square."""
    if patches.ndim < 2:
        raise ValueError(f"unpatchify expects patches [..., N, P*P*C], got shape {tuple(patches.shape)}")
    *lead, num_patches, patch_dim = patches.shape
    if patch_dim != patch_size * patch_size * channels:
        raise ValueError(
            f"patch vectors of length {patch_dim} do not hold {patch_size}x{patch_size}x{channels} pixels "
            f"(expected {patch_size * patch_size * channels})"
        )
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches is not a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    rows, cols = grid
    if rows * cols != num_patches:
        raise ValueError(f"grid {rows}x{cols} holds {rows * cols} patches, got {num_patches}")
    n = len(lead)
    blocks = patches.reshape(*lead, rows, cols, patch_size, patch_size, channels)
    # [..., rows, cols, P, P, C] -> [..., rows, P, cols, P, C]
    axes = (*range(n), n, n + 2, n + 1, n + 3, n + 4)
    images = _contiguous(_permute(blocks, axes))
    return images.reshape(*lead, rows * patch_size, cols * patch_size, channels)


def describe_patch_dim(patch_dim: int) -> str:
    """Name the (patch size, channels) pairs a patch vector length fits, for error messages."""
    fits = [
        f"{size}x{size}x{channels}"
        for channels in (3, 1)
        if patch_dim % channels == 0
        for size in [math.isqrt(patch_dim // channels)]
        if size * size * channels == patch_dim
    ]
    return f" (fits {' or '.join(fits)} patches)" if fits else ""
