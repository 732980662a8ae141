"""Test-set metrics: top-1, top-5, per-class accuracy and confusion counts, accumulated over batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_vit_device import count_host_reads
from vit.config import ViTConfig
from vit.evaluate import ClassificationMeter, evaluate_classifier, extract_features
from vit.model import VisionTransformer

CPU = torch.device("cpu")


def test_metrics_accumulated_in_batches_equal_the_direct_computation():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(103, 7)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 7, 103))
    meter = ClassificationMeter(7)
    for start in range(0, 103, 10):
        meter.update(logits[start : start + 10], labels[start : start + 10])
    result = meter.result()
    predicted = logits.argmax(1).numpy()
    truth = labels.numpy()
    assert result.top1 == pytest.approx(np.mean(predicted == truth))
    top5 = np.argsort(-logits.numpy(), axis=1)[:, :5]
    assert result.top5 == pytest.approx(np.mean([t in row for t, row in zip(truth, top5, strict=True)]))
    for cls in range(7):
        assert result.confusion[cls].sum() == np.sum(truth == cls)
        assert result.confusion[cls, cls] == np.sum((truth == cls) & (predicted == cls))
        assert result.per_class[cls] == pytest.approx(np.mean(predicted[truth == cls] == cls))
    assert result.samples == 103


def test_a_class_without_examples_has_no_accuracy_and_few_classes_cap_top_k():
    meter = ClassificationMeter(3)
    meter.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), torch.tensor([0, 0]))
    result = meter.result()
    assert result.per_class == [0.5, None, None]
    assert result.top_k == 3
    assert result.top5 == 1.0


def test_labels_outside_the_head_are_an_error_when_the_counts_are_read():
    meter = ClassificationMeter(3)
    meter.update(torch.zeros(2, 3), torch.tensor([1, 5]))  # no read of the device on an update
    meter.update(torch.zeros(2, 3), torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="label 5 outside the model's 3 classes"):
        meter.result()


def tiny_model(num_classes: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        ViTConfig(image_size=8, patch_size=4, num_classes=num_classes, width=16, depth=1, heads=2, mlp_dim=32)
    )
    torch.nn.init.normal_(model.head.weight)  # the head starts at zero: every logit would tie
    return model


def uint8_batches(count: int, size: int, num_classes: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (count * size, 4, 48), dtype=np.uint8)
    labels = rng.integers(0, num_classes, count * size)
    return [(patches[i : i + size], labels[i : i + size]) for i in range(0, count * size, size)]


def test_evaluation_and_features_run_the_model_over_uint8_batches():
    model = tiny_model()
    patches = np.random.default_rng(0).integers(0, 256, (10, 4, 48), dtype=np.uint8)
    labels = np.arange(10) % 3
    batches = [(patches[:6], labels[:6]), (patches[6:], labels[6:])]
    result = evaluate_classifier(model, batches, 3, torch.device("cpu"))
    expected = model(torch.as_tensor(patches)).argmax(1).numpy()
    assert result.top1 == pytest.approx(np.mean(expected == labels))
    features, feature_labels = extract_features(model, batches, torch.device("cpu"))
    assert features.shape == (10, 16)
    torch.testing.assert_close(features, model.features(torch.as_tensor(patches)))
    assert feature_labels.tolist() == labels.tolist()


def test_bf16_autocast_evaluation_agrees_with_float32():
    """bf16 keeps 8 bits of mantissa: the logits move by about 1%, so only the near-ties among 1000 images
    may change their answer, and the features stay within bf16's precision."""
    model = tiny_model(num_classes=10)
    batches = uint8_batches(count=10, size=100, num_classes=10)
    full = evaluate_classifier(model, batches, 10, CPU)
    half = evaluate_classifier(model, batches, 10, CPU, bf16=True)
    assert half.samples == full.samples == 1000
    assert half.top1 == pytest.approx(full.top1, abs=0.01)
    assert 0.05 < full.top1 < 0.95  # the comparison means something: neither all right nor all wrong
    features, _ = extract_features(model, batches, CPU)
    half_features, _ = extract_features(model, batches, CPU, bf16=True)
    assert half_features.dtype == torch.float32
    torch.testing.assert_close(half_features, features, rtol=0.05, atol=0.05)
    assert not torch.equal(half_features, features)  # autocast was on


def test_evaluation_reads_the_device_a_fixed_number_of_times_however_many_batches(monkeypatch):
    """Each read back to the host waits for the device: the meter counts on the device and is read once,
    at the end, so a long test split costs no more waits than a short one."""
    model = tiny_model()
    counts = count_host_reads(monkeypatch)
    reads = []
    for count in (2, 7):
        evaluate_classifier(model, uint8_batches(count, size=4), 3, CPU)
        extract_features(model, uint8_batches(count, size=4), CPU)
        reads.append(sum(counts.values()))
        counts.clear()
    assert reads[0] == reads[1]
