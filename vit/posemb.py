"""Position-embedding resampling for a new patch grid (the paper's fine-tuning at higher resolution)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_posemb(
    posemb: torch.Tensor,
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resample position embeddings [1, prefix + gh*gw, D] to a new (rows, cols) grid by bilinear
    interpolation (as big_vision does).

    The prefix rows (the class token's entry) are kept as they are. An unchanged grid returns an exact
    copy. Downsampling is antialiased so that the result is a smoothed, not aliased, embedding.
    """
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"position embeddings must be [1, tokens, width], got {list(posemb.shape)}")
    prefix, grid_part = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    tokens, width = grid_part.shape[1], grid_part.shape[2]
    if old_grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(
                f"{tokens} position embeddings after {num_prefix_tokens} prefix token(s) are not a square "
                "grid; pass old_grid=(rows, cols)"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != tokens:
        raise ValueError(f"old grid {old_grid} does not hold {tokens} position embeddings")
    if tuple(old_grid) == tuple(new_grid):
        return posemb.detach().clone()
    dtype = posemb.dtype
    image = grid_part.detach().float().reshape(1, *old_grid, width).permute(0, 3, 1, 2)
    downsampling = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    resized = F.interpolate(
        image, size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=downsampling
    )
    resized = resized.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], width)
    return torch.cat([prefix.detach().float(), resized], dim=1).to(dtype)
