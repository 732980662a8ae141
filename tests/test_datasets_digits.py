"""The digits dataset: sklearn's 1797 images as stratified train/test WebDataset shards."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import DigitsConfig
from pipeline.datasets.card import read_card, shard_paths
from pipeline.datasets.digits import build_digits, load_digits_arrays


def read_split(directory, split):
    urls = [str(p) for p in shard_paths(directory, split)]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("__key__", "png", "cls")
    return list(dataset)


def test_card_counts_classes_and_pattern(digits_dir):
    card = read_card(digits_dir)
    assert card["classes"] == [str(d) for d in range(10)]
    train, test = card["splits"]["train"], card["splits"]["test"]
    assert train["samples"] + test["samples"] == 1797
    assert test["samples"] == 360
    assert train["pattern"] == "train/digits-{000000..000003}.tar"
    assert [s["samples"] for s in train["shards"]] == [400, 400, 400, 237]
    assert sum(train["per_class"].values()) == train["samples"]


def test_webdataset_reads_every_sample_with_its_label(digits_dir):
    images, labels = load_digits_arrays()
    seen = []
    for split in ("train", "test"):
        samples = read_split(digits_dir, split)
        assert len(samples) == read_card(digits_dir)["splits"][split]["samples"]
        for key, image, label in samples:
            index = int(key.split("_")[1])
            assert image.shape == (8, 8)
            assert int(label) == labels[index]
            np.testing.assert_array_equal(image, images[index])
            seen.append(index)
    assert sorted(seen) == list(range(1797))  # each image in exactly one split


def test_split_is_stratified(digits_dir):
    _, labels = load_digits_arrays()
    test_labels = Counter(int(label) for _, _, label in read_split(digits_dir, "test"))
    overall = Counter(labels.tolist())
    for digit, count in overall.items():
        assert test_labels[digit] == pytest.approx(count * 0.2, abs=1.5)


def test_tarfile_sees_standard_members(digits_dir):
    path = shard_paths(digits_dir, "test")[0]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[:2] == [names[0][:-4] + ".png", names[0][:-4] + ".cls"]
        assert len(names) == 2 * 360
        assert all(m.mtime == 0 and m.isfile() for m in members)
        image = Image.open(io.BytesIO(tar.extractfile(members[0]).read()))
        assert image.size == (8, 8)
        assert image.mode == "L"


def test_same_seed_same_bytes_other_seed_other_split(digits_dir, tmp_path, ray_local):
    build_digits(DigitsConfig(shard_size=400), tmp_path / "again")
    for ours, theirs in zip(
        shard_paths(digits_dir, "train"), shard_paths(tmp_path / "again", "train"), strict=True
    ):
        assert ours.read_bytes() == theirs.read_bytes()
    build_digits(DigitsConfig(shard_size=400, seed=1), tmp_path / "seed1")
    keys0 = {key for key, _, _ in read_split(digits_dir, "test")}
    keys1 = {key for key, _, _ in read_split(tmp_path / "seed1", "test")}
    assert keys0 != keys1


def test_refuses_to_overwrite_without_flag(digits_dir):
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        build_digits(DigitsConfig(), digits_dir)
