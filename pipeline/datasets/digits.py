"""scikit-learn's handwritten digits as WebDataset shards: the demo's real target dataset B.

1797 grayscale 8x8 images of 10 classes (values 0..16, scaled to 0..255), split train/test with a
stratified, seeded split. Keys keep the index into sklearn's array, so every sample is traceable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from pipeline.config import DigitsConfig
from pipeline.datasets import arrays

DIGIT_LEVELS = 16  # sklearn's digits count ink in 0..16


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digit images as uint8 [n, 8, 8] (0..255) and their int64 labels."""
    digits = load_digits()
    images = np.rint(digits.images * (255 / DIGIT_LEVELS)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


DIGITS = arrays.ArraySource("digits", tuple(str(digit) for digit in range(10)), load_digits_arrays)


def split_sizes(config: DigitsConfig) -> dict[str, int]:
    """How many images each split of these digits holds, without building them."""
    return arrays.split_sizes(DIGITS, config)


def build_digits(config: DigitsConfig, out: Path, overwrite: bool = False) -> Path:
    """Write train and test splits of the digits under `out`; return the dataset.json path."""
    return arrays.build_array_dataset(DIGITS, config, out, overwrite)
