"""Few-shot linear evaluation: the closed-form ridge probe agrees with scikit-learn on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge, RidgeClassifier

from vit.fewshot import STD_EPSILON, fewshot_accuracy, fewshot_scores, fit_ridge, ridge_targets, sample_shots


def clustered_features(samples: int, dims: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy class clusters with features on different scales, as pre-logits features are."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    centres = rng.normal(size=(classes, dims)) * 2
    scales = rng.uniform(0.1, 10, dims)
    features = (centres[labels] + rng.normal(size=(samples, dims))) * scales + rng.normal(size=dims)
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def standardized(features: torch.Tensor) -> np.ndarray:
    x = features.double().numpy()
    return (x - x.mean(axis=0)) / (x.std(axis=0) + STD_EPSILON)


@pytest.mark.parametrize(("samples", "dims"), [(200, 16), (30, 64)], ids=["primal", "dual"])
def test_ridge_probe_equals_sklearn_ridge_on_the_same_features(samples, dims):
    features, labels = clustered_features(samples, dims, classes=5, seed=0)
    probe = fit_ridge(features, labels, num_classes=5, l2=3.0)
    targets = np.where(np.eye(5, dtype=bool)[labels.numpy()], 1.0, -1.0)  # {-1, 1}, written out here
    np.testing.assert_array_equal(ridge_targets(labels, 5).numpy(), targets)
    reference = Ridge(alpha=3.0, fit_intercept=True).fit(standardized(features), targets)
    np.testing.assert_allclose(probe.weight.numpy(), reference.coef_.T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(probe.bias.numpy(), reference.intercept_, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("l2", [0.01, 1.0, 100.0])
def test_ridge_probe_predicts_what_sklearn_ridge_classifier_predicts(l2):
    train_x, train_y = clustered_features(40, 32, classes=4, seed=1)
    test_x, test_y = clustered_features(500, 32, classes=4, seed=2)
    probe = fit_ridge(train_x, train_y, num_classes=4, l2=l2)
    x = train_x.double().numpy()
    mean, std = x.mean(axis=0), x.std(axis=0) + STD_EPSILON
    reference = RidgeClassifier(alpha=l2).fit((x - mean) / std, train_y.numpy())
    expected = reference.predict((test_x.double().numpy() - mean) / std)
    np.testing.assert_array_equal(probe.predict(test_x).numpy(), expected)
    accuracy = fewshot_accuracy(train_x, train_y, test_x, test_y, 4, l2)
    assert accuracy == pytest.approx(float(np.mean(expected == test_y.numpy())))


def test_probe_separates_separable_classes_and_handles_constant_features():
    features, labels = clustered_features(100, 8, classes=3, seed=3)
    features = torch.cat([features, torch.full((100, 1), 7.0)], dim=1)  # a constant feature
    probe = fit_ridge(features, labels, num_classes=3, l2=1e-3)
    assert torch.isfinite(probe.weight).all()
    assert (probe.predict(features) == labels).float().mean() > 0.95


def test_shots_are_drawn_per_class_nested_and_reproducible():
    labels = np.repeat(np.arange(4), 30)
    np.random.default_rng(0).shuffle(labels)
    five = sample_shots(labels, 4, 5, seed=11)
    assert np.bincount(labels[five], minlength=4).tolist() == [5, 5, 5, 5]
    one = sample_shots(labels, 4, 1, seed=11)
    assert set(one) <= set(five)  # the 1-shot draw is inside the 5-shot draw of the same seed
    np.testing.assert_array_equal(sample_shots(labels, 4, 5, seed=11), five)
    assert set(sample_shots(labels, 4, 5, seed=12)) != set(five)


def test_too_few_examples_of_a_class_is_an_error_naming_it():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ValueError, match="class 1 has 3 training example"):
        sample_shots(labels, 2, 5, seed=0)


def test_a_few_shot_table_scores_each_draw_on_the_given_evaluation_rows_alone():
    features, labels = clustered_features(300, 8, classes=3, seed=5)
    train_x, train_y, eval_x, eval_y = features[:200], labels[:200], features[200:], labels[200:]
    draws = {shots: [sample_shots(train_y.numpy(), 3, shots, seed) for seed in (0, 1)] for shots in (2, 10)}
    table = fewshot_scores(train_x, train_y, draws, eval_x, eval_y, 3, 1.0)
    expected = {
        shots: [fewshot_accuracy(train_x[rows], train_y[rows], eval_x, eval_y, 3, 1.0) for rows in seeded]
        for shots, seeded in draws.items()
    }
    assert table == expected
    wrong = fewshot_scores(train_x, train_y, draws, eval_x, (eval_y + 1) % 3, 3, 1.0)
    assert max(max(scores) for scores in wrong.values()) < min(table[10])  # scored on the rows given
