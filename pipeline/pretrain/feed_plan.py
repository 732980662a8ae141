"""What a rank's feed is told (`pipeline.pretrain.feed` reads it): the corpus, the order's settings and
the step structure; light (no torch), so the driver's plan builds it before any worker starts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.pretrain.order import EpochOrder
from vit.patches import PatchGeometry
from vit.recipe import BatchSplit


@dataclass(frozen=True)
class Corpus:
    """What a worker needs to read the split: its files, their row counts and geometry; for a study's
    subset, the rows of each file it holds (sorted)."""

    files: tuple[str, ...]
    counts: tuple[int, ...]
    geometry: PatchGeometry
    selected: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class FeedPlan:
    """How a rank reads: the corpus, the order's settings and the step structure."""

    corpus: Corpus
    seed: int
    window: int  # rows shuffled together (shuffle_buffer); 0 keeps the files' own row order
    steps_per_epoch: int
    batch: BatchSplit  # split for the largest group (the worker re-splits its recipe's for its group)
    threads: int = 2
    depth: int = 4  # reads in flight ahead of the trainer

    def order(self, epoch: int) -> EpochOrder:
        rows = self.corpus.selected
        selected = None if rows is None else tuple(np.asarray(r, np.int64) for r in rows)
        return EpochOrder(self.corpus.counts, self.seed, epoch, self.window, selected)

    @property
    def epoch_samples(self) -> int:
        return self.steps_per_epoch * self.batch.global_batch
