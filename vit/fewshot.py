"""Few-shot linear evaluation as in the ViT paper: frozen features, closed-form regularised least squares
to {-1, 1} one-hot targets, top-1 of the argmax on the test set.

Features are standardised with the few-shot training set's statistics and the bias is fitted without
penalty (the data are centred), as scikit-learn's `Ridge(fit_intercept=True)` does, so the two agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

STD_EPSILON = 1e-5  # keeps constant features finite after standardisation


@dataclass(frozen=True)
class RidgeProbe:
    """A fitted linear probe: logits = ((features - mean) / std) @ weight + bias."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [features, classes]
    bias: torch.Tensor  # [classes]

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        standardized = (features.double() - self.mean) / self.std
        return standardized @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features).argmax(dim=1)


def ridge_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot targets rescaled to {-1, 1}, as the paper regresses onto."""
    return 2.0 * torch.nn.functional.one_hot(labels.long(), num_classes).double() - 1.0


def fit_ridge(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float) -> RidgeProbe:
    """Solve min ||X W + b - Y||^2 + l2 ||W||^2 in closed form (float64).

    With fewer samples than features (the usual few-shot case) the dual form `X^T (X X^T + l2 I)^-1 Y`
    is solved instead of the primal `(X^T X + l2 I)^-1 X^T Y`: the same answer from the smaller system.
    """
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features {list(features.shape)} and labels {list(labels.shape)} do not pair up")
    x = features.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False) + STD_EPSILON
    x = (x - mean) / std
    y = ridge_targets(labels, num_classes)
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    samples, dims = xc.shape
    if samples >= dims:
        gram = xc.T @ xc + l2 * torch.eye(dims, dtype=x.dtype)
        weight = torch.linalg.solve(gram, xc.T @ yc)
    else:
        gram = xc @ xc.T + l2 * torch.eye(samples, dtype=x.dtype)
        weight = xc.T @ torch.linalg.solve(gram, yc)
    bias = y_mean - x_mean @ weight
    return RidgeProbe(mean, std, weight, bias)


def sample_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of every class, drawn with `seed`. For one seed the draws are nested:
    the 5-shot set holds the 1-shot set, as each class's order is fixed by the seed alone."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise ValueError(f"class {label} has {len(members)} training example(s), fewer than {shots}")
        chosen.append(rng.permutation(members)[:shots])
    return np.concatenate(chosen)


def fewshot_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    l2: float,
) -> float:
    """Top-1 on the test features of a ridge probe fitted on the few-shot training features."""
    probe = fit_ridge(train_features, train_labels, num_classes, l2)
    return float((probe.predict(test_features) == test_labels.long()).double().mean())


def fewshot_scores(
    features: torch.Tensor,
    labels: torch.Tensor,
    draws: Mapping[int, Sequence[np.ndarray]],
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    num_classes: int,
    l2: float,
) -> dict[int, list[float]]:
    """A few-shot table scored on given evaluation rows (a validation split, or a test split): for every
    shot count, the top-1 of a ridge probe fitted on each of its draws (rows of `features`, one per seed)."""
    return {
        shots: [
            fewshot_accuracy(
                features[torch.as_tensor(rows)],
                labels[torch.as_tensor(rows)],
                eval_features,
                eval_labels,
                num_classes,
                l2,
            )
            for rows in seeded
        ]
        for shots, seeded in draws.items()
    }
