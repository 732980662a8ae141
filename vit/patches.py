"""The patch layout, defined once: images [..., H, W, C] <-> patch tensors [..., N, P*P*C].

Patches follow the image's row-major grid; each patch is flattened in (row, col, channel) order:
`patches[n] = img[r*P:(r+1)*P, c*P:(c+1)*P, :].reshape(-1)` with `n = r * (W // P) + c`.
Preprocessing writes this layout, the model's stem reads it, the sample grids invert it. Works on numpy
arrays and torch tensors alike, and never copies dtype: uint8 in, uint8 out.

`PatchGeometry` is the one description of a patch tensor's shape: the model config, the Parquet writer,
the manifest and every stage's plan hold one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch tensors are handled by their own methods; importing torch is not needed here
    import torch

Array = TypeVar("Array", np.ndarray, "torch.Tensor")


LAYOUT = "row-major patch grid; each patch flattened in (row, col, channel) order"


@dataclass(frozen=True)
class PatchGeometry:
    """Square images of `image_size` pixels and `channels` channels cut into `patch_size` patches: a
    uint8 tensor of `num_patches` rows of `patch_dim` bytes."""

    image_size: int
    patch_size: int
    channels: int

    def __post_init__(self) -> None:
        problems = geometry_problems(self.image_size, self.patch_size, self.channels)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: P*P*C."""
        return self.patch_size * self.patch_size * self.channels

    @property
    def shape(self) -> tuple[int, int]:
        """One sample's patch tensor shape: (num_patches, patch_dim)."""
        return self.num_patches, self.patch_dim

    @property
    def sample_bytes(self) -> int:
        return self.num_patches * self.patch_dim

    def to_dict(self) -> dict[str, Any]:
        """The geometry as a manifest and a file's metadata record it (derived sizes included, for readers
        without vitpipe)."""
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "channels": self.channels,
            "grid": [self.grid, self.grid],
            "num_patches": self.num_patches,
            "patch_dim": self.patch_dim,
            "dtype": "uint8",
            "layout": LAYOUT,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "geometry") -> PatchGeometry:
        """Read back what `to_dict` wrote; a missing or bad entry is a ValueError naming `source`."""
        try:
            return cls(int(data["image_size"]), int(data["patch_size"]), int(data["channels"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: no valid patch geometry ({error})") from None

    def describe(self) -> str:
        return f"{self.image_size}px / patch {self.patch_size}, {self.channels} channel(s)"


def geometry_problems(image_size: int, patch_size: int, channels: int) -> list[str]:
    """What makes three numbers no geometry (the ViT config lists these beside its own problems)."""
    sizes = {"image_size": image_size, "patch_size": patch_size, "channels": channels}
    problems = [
        f"{name} must be a positive integer (got {value!r})"
        for name, value in sizes.items()
        if not isinstance(value, int) or isinstance(value, bool) or value < 1
    ]
    if not problems and image_size % patch_size:
        problems.append(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return problems


def misfits(
    data: PatchGeometry,
    *,
    patch_size: int | None = None,
    channels: int | None = None,
    image_size: int | None = None,
) -> list[str]:
    """The one check that a model fits stored patches: each way a model with this patch size and channel
    count (None: it takes the data's), seeing this resolution (a crop of the stored images), cannot read
    patches stored as `data`; empty when it can. Callers add where the data is and the way on."""
    problems = []
    if patch_size is not None and patch_size != data.patch_size:
        problems.append(f"patch_size {data.patch_size} in the data, {patch_size} in the model")
    if channels is not None and channels != data.channels:
        problems.append(f"channels {data.channels} in the data, {channels} in the model")
    if image_size is not None and (image_size > data.image_size or image_size % data.patch_size):
        problems.append(
            f"image_size {image_size} must be a multiple of the patch size {data.patch_size} and at most the "
            f"stored {data.image_size} px"
        )
    return problems


def _permute(x: Array, axes: tuple[int, ...]) -> Array:
    return np.transpose(x, axes) if isinstance(x, np.ndarray) else x.permute(*axes)


def _contiguous(x: Array) -> Array:
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.contiguous()


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
