"""Test-set evaluation of a classifier: top-1, top-5, per-class accuracy and the confusion matrix,
accumulated batch by batch so a large test split never sits in memory as logits."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vit.augment import center_crop, stored_geometry
from vit.device import HostBatch, autocast, prefetch_to_device

Batch = HostBatch  # uint8 patches [B, N, D], labels [B]
NO_LABEL = torch.iinfo(torch.int64).min  # no label outside the head was seen


class ClassificationMeter:
    """Counts of a classifier's answers: a confusion matrix (rows: true class) and top-k hits.

    The counts stay on the device the meter was made for and are read once, by `result()`: an update never
    waits for the device. A label outside the head is remembered and refused there.
    """

    def __init__(self, num_classes: int, top_k: int = 5, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.top_k = min(top_k, num_classes)
        self.confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
        self.top_k_hits = torch.zeros((), dtype=torch.int64, device=device)
        self._outside = torch.full((), NO_LABEL, dtype=torch.int64, device=device)  # the largest seen

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.long()
        logits = logits.float()
        inside = (labels >= 0) & (labels < self.num_classes)
        if labels.numel():
            self._outside = torch.maximum(self._outside, torch.where(inside, NO_LABEL, labels).max())
        predicted = logits.argmax(dim=1)
        pairs = torch.where(inside, labels * self.num_classes + predicted, 0)  # one outside adds 0 at 0
        self.confusion.view(-1).index_add_(0, pairs, inside.long())
        top = logits.topk(self.top_k, dim=1).indices
        self.top_k_hits += ((top == labels[:, None]).any(dim=1) & inside).sum()

    @property
    def samples(self) -> int:
        return int(self.confusion.sum())

    def result(self) -> Classification:
        outside = int(self._outside)
        if outside != NO_LABEL:
            raise ValueError(f"label {outside} outside the model's {self.num_classes} classes")
        confusion = self.confusion.cpu().numpy()
        total = int(confusion.sum())
        if total == 0:
            raise ValueError("no samples were evaluated")
        per_class_total = confusion.sum(axis=1)
        diagonal = np.diag(confusion)
        per_class = [
            float(hit / count) if count else None
            for hit, count in zip(diagonal, per_class_total, strict=True)
        ]
        return Classification(
            top1=float(diagonal.sum() / total),
            top5=int(self.top_k_hits) / total,
            top_k=self.top_k,
            per_class=per_class,
            confusion=confusion,
            samples=total,
        )


@dataclass(frozen=True)
class Classification:
    top1: float
    top5: float  # top-k with k = min(5, classes): 1.0 by definition with five classes or fewer
    top_k: int
    per_class: list[float | None]  # None for a class the evaluated split has no example of
    confusion: np.ndarray
    samples: int


def _model_view(patches: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A batch as the model takes it: images stored larger than the model's resolution give their centre
    crop (the evaluation crop of the recipe's training crops)."""
    geometry = model.config.geometry
    if (
        patches.ndim == 3
        and patches.shape[1] > geometry.num_patches
        and patches.shape[2] == geometry.patch_dim
    ):
        side = math.isqrt(patches.shape[1]) * geometry.patch_size
        patches = center_crop(patches, stored_geometry(geometry, side), geometry)
    return patches


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, batches: Iterable[Batch], num_classes: int, device: torch.device, *, bf16: bool = False
) -> Classification:
    """Run the model (on `device`) in eval mode over every batch, under bf16 autocast when `bf16`, and score
    its logits."""
    model.eval()
    meter = ClassificationMeter(num_classes, device=device)
    for patches, labels in prefetch_to_device(batches, device):
        with autocast(device, bf16):
            logits = model(_model_view(patches, model))
        meter.update(logits, labels)
    return meter.result()


@torch.no_grad()
def extract_features(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, *, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logits features (float32, on the CPU) and labels of every batch, in order; computed under
    bf16 autocast when `bf16`. They are gathered on the device and moved once, at the end."""
    model.eval()
    features, labels = [], []
    for patches, batch_labels in prefetch_to_device(batches, device):
        with autocast(device, bf16):
            features.append(model.features(_model_view(patches, model)).float())
        labels.append(batch_labels)
    if not features:
        raise ValueError("no samples to extract features from")
    return torch.cat(features).cpu(), torch.cat(labels).cpu()
