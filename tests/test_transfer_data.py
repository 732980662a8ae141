"""Reading a target's split inside a task: labels, ordered batches, rows by number, shuffled training
batches that never serve the validation hold-out."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.preprocess.summary import read_samples
from pipeline.transfer.data import SplitReader, holdout
from vit.patches import patchify


@pytest.fixture(scope="module")
def train(digits_patches) -> SplitReader:
    return SplitReader(digits_patches, "train")


def test_labels_and_ordered_batches_cover_the_split_once(train):
    labels = train.labels()
    assert len(train) == len(labels) == 1437
    assert len(train.files) == 4
    seen = [batch_labels for _, batch_labels in train.batches(100)]
    assert [len(b) for b in seen[:-1]] == [100] * (len(seen) - 1)
    np.testing.assert_array_equal(np.concatenate(seen), labels)


def test_rows_taken_by_number_are_those_rows_in_the_order_asked(train, digits_patches):
    first = read_samples(digits_patches, 3, split="train")
    indices = np.array([1436, 2, 0, 700, 1])
    patches, labels = next(train.take(indices, batch_size=10))
    np.testing.assert_array_equal(labels, train.labels()[indices])
    np.testing.assert_array_equal(patches[2], patchify(first[0]["image"], 4))
    np.testing.assert_array_equal(patches[4], patchify(first[1]["image"], 4))
    everything = np.concatenate([p for p, _ in train.batches(500)])
    np.testing.assert_array_equal(patches, everything[indices])


def test_training_batches_are_shuffled_full_epochs_without_the_hold_out(train):
    held = holdout(train.labels(), 0.1, seed=0)
    stream = train.training_batches(64, seed=3, exclude=held)
    served = list(itertools.islice(stream, 40))
    assert all(len(labels) == 64 for _, labels in served)
    # Tag every row by its bytes to follow it: 1437 - held rows per epoch, none of them held out.
    everything = np.concatenate([p for p, _ in train.batches(500)])
    key = {everything[i].tobytes(): i for i in range(len(everything))}
    rows = [key[p.tobytes()] for patches, _ in served for p in patches]
    per_epoch = len(train) - len(held)
    assert not set(rows) & set(held.tolist())
    assert sorted(rows[: per_epoch // 64 * 64]) != rows[: per_epoch // 64 * 64]  # shuffled
    assert len(set(rows[: per_epoch - 64])) == per_epoch - 64  # no row twice within an epoch
    assert set(rows) == set(range(len(train))) - set(held.tolist())
    again = list(itertools.islice(train.training_batches(64, seed=3, exclude=held), 40))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(served, again, strict=True))


def test_hold_out_takes_a_share_of_every_class_and_respects_a_cap():
    labels = np.repeat(np.arange(5), [50, 50, 50, 50, 2])
    held = holdout(labels, 0.2, seed=1)
    assert np.bincount(labels[held]).tolist() == [10, 10, 10, 10, 1]
    assert len(holdout(labels, 0.2, seed=1, max_rows=20)) == 5 * 4 + 1
    assert len(holdout(labels, 0.0, seed=1)) == 0


def test_a_split_with_nothing_left_to_train_on_is_an_error(train):
    with pytest.raises(ValueError, match="no rows left to train on"):
        next(train.training_batches(8, seed=0, exclude=np.arange(len(train))))
