"""scikit-learn's handwritten digits as WebDataset shards: the demo's real target dataset B.

1797 grayscale 8x8 images of 10 classes (values 0..16, scaled to 0..255), split train/test with a
stratified, seeded split. Keys keep the index into sklearn's array, so every sample is traceable.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import DigitsConfig
from pipeline.datasets.card import prepare_output_dir, split_entry, write_card
from pipeline.datasets.shards import ShardResult, shard_name, write_shard
from pipeline.ray_tasks import run_shard_tasks

DIGIT_LEVELS = 16  # sklearn's digits count ink in 0..16


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digit images as uint8 [n, 8, 8] (0..255) and their int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / DIGIT_LEVELS)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/test indices, each sorted so shards follow sklearn's order."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def split_sizes(config: DigitsConfig) -> dict[str, int]:
    """How many images each split of these digits holds, without building them."""
    labels = load_digits_arrays()[1]
    return {
        split: len(indices)
        for split, indices in split_indices(labels, config.test_fraction, config.seed).items()
    }


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_digits_shard(
    images: np.ndarray, labels: np.ndarray, out: str, split: str, name: str, index: int, members: np.ndarray
) -> ShardResult:
    """Ray task body: one shard of digits as `{split}_{sklearn index}.png` + `.cls`."""
    relative = f"{split}/{shard_name(name, index)}"
    samples = (
        (f"{split}_{i:04d}", {"png": encode_png(images[i]), "cls": str(int(labels[i])).encode()})
        for i in members
    )
    count, size = write_shard(Path(out) / relative, samples)
    return ShardResult(relative, count, size, dict(Counter(int(labels[i]) for i in members)))


def build_digits(config: DigitsConfig, out: Path, overwrite: bool = False) -> Path:
    """Write train and test splits of the digits under `out`; return the dataset.json path."""
    prepare_output_dir(out, overwrite)
    started = time.perf_counter()
    images, labels = load_digits_arrays()
    splits = split_indices(labels, config.test_fraction, config.seed)
    card_splits = {}
    for split, indices in splits.items():
        chunks = [indices[i : i + config.shard_size] for i in range(0, len(indices), config.shard_size)]
        args = [(str(out), split, config.name, i, chunk) for i, chunk in enumerate(chunks)]
        results = run_shard_tasks(
            write_digits_shard, args, label=f"{config.name}/{split}", shared=(images, labels)
        )
        card_splits[split] = split_entry(split, config.name, results)
    return write_card(
        out,
        {
            "name": config.name,
            "kind": "digits",
            "classes": [str(digit) for digit in range(10)],
            "image": {"extension": "png", "width": 8, "height": 8, "mode": "L"},
            "splits": card_splits,
            "config": config.model_dump(mode="json"),
            "config_hash": config.digest(),
            "skipped": [],
            "skipped_count": 0,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
