"""An exponential moving average of the fp32 master weights, kept by each rank for its own fragments.

Each rank averages only the slices of the weights its optimizer holds (`vit.fragments`), beside them on
their device: no collective per step, and the memory of one more fp32 partition. Saved per rank as
fragments, it loads into a group of any size (`load` takes full tensors, from `assemble` of every rank
file), so a resized run carries its EMA on exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vit.fragments import Fragment, Fragments


class Ema:
    """ema <- decay * ema + (1 - decay) * weights after every optimizer step; it starts as a copy of the
    weights (step 0, or a resumed checkpoint that holds no EMA)."""

    def __init__(self, fragments: Fragments, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1) (got {decay})")
        self.fragments = fragments
        self.decay = decay
        self._weights = [piece.tensor for piece in fragments]
        self._averages = [weights.detach().to(torch.float32, copy=True) for weights in self._weights]

    def update(self) -> None:
        """Fold in the weights as they are now (after an optimizer step); queued on their device, no sync."""
        torch._foreach_lerp_(self._averages, self._weights, 1.0 - self.decay)

    def pieces(self) -> Fragments:
        """The average's fragments (the same names and offsets as the weights'), for saving or gathering."""
        pieces = [
            Fragment(piece.name, piece.offset, average)
            for piece, average in zip(self.fragments, self._averages, strict=True)
        ]
        return Fragments(pieces, self.fragments.replicated)

    def load(self, full_state: Mapping[str, torch.Tensor]) -> None:
        """Take this rank's slices of full EMA tensors (saved by any number of ranks, then assembled)."""
        for piece, average in zip(self.fragments, self._averages, strict=True):
            full = full_state.get(piece.name)
            if full is None:
                raise ValueError(f"the saved EMA has no {piece.name}; saved from another model?")
            if full.numel() < piece.offset + average.numel():
                raise ValueError(
                    f"the saved EMA's {piece.name} has {full.numel()} elements, this model's more "
                    f"(a piece ends at {piece.offset + average.numel()}); saved from another model?"
                )
            average.copy_(full.reshape(-1)[piece.offset : piece.offset + average.numel()])
