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

Batch = tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]  # uint8 patches [B, N, D], labels [B]


class ClassificationMeter:
    """Counts of a classifier's answers: a confusion matrix (rows: true class) and top-k hits."""

    def __init__(self, num_classes: int, top_k: int = 5) -> None:
        self.num_classes = num_classes
        self.top_k = min(top_k, num_classes)
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.top_k_hits = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.long().cpu()
        logits = logits.float().cpu()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"label {int(labels.max())} outside the model's {self.num_classes} classes")
        predicted = logits.argmax(dim=1)
        pairs = (labels * self.num_classes + predicted).numpy()
        self.confusion += np.bincount(pairs, minlength=self.num_classes**2).reshape(self.confusion.shape)
        top = logits.topk(self.top_k, dim=1).indices
        self.top_k_hits += int((top == labels[:, None]).any(dim=1).sum())

    @property
    def samples(self) -> int:
        return int(self.confusion.sum())

    def result(self) -> Classification:
        total = self.samples
        if total == 0:
            raise ValueError("no samples were evaluated")
        per_class_total = self.confusion.sum(axis=1)
        diagonal = np.diag(self.confusion)
        per_class = [
            float(hit / count) if count else None
            for hit, count in zip(diagonal, per_class_total, strict=True)
        ]
        return Classification(
            top1=float(diagonal.sum() / total),
            top5=float(self.top_k_hits / total),
            top_k=self.top_k,
            per_class=per_class,
            confusion=self.confusion.copy(),
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


def _tensor(array: np.ndarray | torch.Tensor, device: torch.device, model: nn.Module) -> torch.Tensor:
    """A batch on the device as the model takes it: images stored larger than the model's resolution
    give their centre crop (the evaluation crop of the recipe's training crops)."""
    patches = torch.as_tensor(array).to(device, non_blocking=True)
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
    model: nn.Module, batches: Iterable[Batch], num_classes: int, device: torch.device
) -> Classification:
    """Run the model in eval mode over every batch and score its logits."""
    model.eval()
    meter = ClassificationMeter(num_classes)
    for patches, labels in batches:
        meter.update(model(_tensor(patches, device, model)), torch.as_tensor(labels))
    return meter.result()


@torch.no_grad()
def extract_features(
    model: nn.Module, batches: Iterable[Batch], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logits features (float32, on the CPU) and labels of every batch, in order."""
    model.eval()
    features, labels = [], []
    for patches, batch_labels in batches:
        features.append(model.features(_tensor(patches, device, model)).float().cpu())
        labels.append(torch.as_tensor(batch_labels).long())
    if not features:
        raise ValueError("no samples to extract features from")
    return torch.cat(features), torch.cat(labels)
