"""The fractal corpus: distinct classes, varied instances, deterministic however it is sharded."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.datasets.card import read_card, shard_paths
from pipeline.datasets.fractals import build_fractals
from tests.conftest import FRACTALS


def load_corpus(directory):
    urls = [str(p) for p in shard_paths(directory, "train")]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg", "cls")
    return [(key, image, int(label)) for key, image, label in dataset]


def test_card_and_shards(fractals_dir):
    card = read_card(fractals_dir)
    total = FRACTALS.classes * FRACTALS.per_class
    assert card["splits"]["train"]["samples"] == total
    assert len(card["splits"]["train"]["shards"]) == -(-total // FRACTALS.shard_size)
    assert card["classes"] == [f"fractal_{c:06d}" for c in range(FRACTALS.classes)]
    assert card["splits"]["train"]["per_class"] == {
        str(c): FRACTALS.per_class for c in range(FRACTALS.classes)
    }
    assert card["images_per_second"] > 0


def test_images_are_rgb_jpegs_of_the_configured_size_with_matching_labels(fractals_dir):
    samples = load_corpus(fractals_dir)
    assert len(samples) == FRACTALS.classes * FRACTALS.per_class
    for key, image, label in samples:
        assert image.shape == (32, 32, 3)
        assert key.startswith(f"c{label:06d}_")
    with tarfile.open(shard_paths(fractals_dir, "train")[0]) as tar:
        first = tar.getmembers()[0]
        assert first.name.endswith(".jpg")
        assert Image.open(io.BytesIO(tar.extractfile(first).read())).format == "JPEG"


def test_shards_mix_classes(fractals_dir):
    with tarfile.open(shard_paths(fractals_dir, "train")[0]) as tar:
        classes = {m.name[:7] for m in tar.getmembers()}
    assert len(classes) >= FRACTALS.classes // 2


def test_classes_are_distinct_by_nearest_centroid_on_raw_pixels(fractals_dir):
    samples = load_corpus(fractals_dir)
    gray = np.stack([image.mean(axis=2).ravel() for _, image, _ in samples]).astype(np.float64)
    gray /= np.linalg.norm(gray, axis=1, keepdims=True)
    labels = np.array([label for *_, label in samples])
    instance = np.array([int(key.split("_i")[1]) for key, *_ in samples])
    train, test = instance < FRACTALS.per_class // 2, instance >= FRACTALS.per_class // 2
    centroids = np.stack([gray[train & (labels == c)].mean(axis=0) for c in range(FRACTALS.classes)])
    predicted = np.argmin(((gray[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == labels[test]).mean()
    assert accuracy >= 0.6, accuracy  # chance is 0.1


def test_instances_within_a_class_differ(fractals_dir):
    samples = load_corpus(fractals_dir)
    for c in range(FRACTALS.classes):
        images = [image.astype(np.int16) for _, image, label in samples if label == c]
        differences = [np.abs(images[0] - other).mean() for other in images[1:]]
        assert min(differences) > 1.0


def test_output_does_not_depend_on_sharding(fractals_dir, tmp_path, ray_local):
    other = FRACTALS.model_copy(update={"shard_size": 41})
    build_fractals(other, tmp_path / "resharded")
    ours = {key: image for key, image, _ in load_corpus(fractals_dir)}
    theirs = {key: image for key, image, _ in load_corpus(tmp_path / "resharded")}
    assert ours.keys() == theirs.keys()
    for key, image in ours.items():
        np.testing.assert_array_equal(image, theirs[key])


def test_seed_changes_the_classes(fractals_dir, tmp_path, ray_local):
    other = FRACTALS.model_copy(update={"seed": FRACTALS.seed + 1, "classes": 2, "per_class": 2})
    build_fractals(other, tmp_path / "seeded")
    ours = {key: image for key, image, _ in load_corpus(fractals_dir)}
    theirs = {key: image for key, image, _ in load_corpus(tmp_path / "seeded")}
    assert all(not np.array_equal(image, ours[key]) for key, image in theirs.items())
