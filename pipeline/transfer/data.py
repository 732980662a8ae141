"""One split of a preprocessed patch directory, read with plain pyarrow inside a fine-tuning task.

A target dataset is fine-tuned by one task on one device, so its batches come from this reader rather
than from Ray Data: no extra CPUs to reserve beside the task, and memory bounded by a shuffle window.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.patchfile import patches_array
from pipeline.preprocess.manifest import manifest_geometry, patch_files, read_manifest
from pipeline.storage import resolve
from vit.evaluate import Batch

SHUFFLE_WINDOW_BYTES = 256 * 1024**2
VALIDATION_BYTES = 1024**3  # the validation hold-out is held in memory, at most this much of it


class SplitReader:
    """The patch files of one split, in the manifest's order; rows are numbered across files."""

    def __init__(self, directory: str, split: str) -> None:
        manifest = read_manifest(directory)
        self.directory, self.split = directory, split
        self.geometry = manifest_geometry(manifest, directory)
        self.files = patch_files(directory, split)
        self._labels: np.ndarray | None = None
        self._offsets: np.ndarray | None = None

    def _read(self, file: str, columns: list[str]) -> pa.Table:
        filesystem, path = resolve(file)
        with filesystem.open_input_file(path) as handle:
            return pq.read_table(handle, columns=columns)

    def _rows(self, table: pa.Table) -> Batch:
        patches = patches_array(table.column("patches"), self.geometry)
        labels = table.column("label")
        if labels.null_count:
            raise ValueError(f"{self.directory}: split {self.split!r} has unlabelled samples")
        return patches, labels.to_numpy().astype(np.int64)

    def labels(self) -> np.ndarray:
        """Every label of the split, in row order (reads only the label column)."""
        return self._index()[0]

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, offsets): offsets[i] is the row number of file i's first row; offsets[-1] the total."""
        if self._labels is None or self._offsets is None:
            parts = []
            for file in self.files:
                column = self._read(file, ["label"]).column("label")
                if column.null_count:
                    raise ValueError(f"{file}: {column.null_count} sample(s) without a label")
                parts.append(column.to_numpy().astype(np.int64))
            self._labels = np.concatenate(parts) if parts else np.empty(0, np.int64)
            self._offsets = np.concatenate([[0], np.cumsum([len(part) for part in parts])]).astype(np.int64)
        return self._labels, self._offsets

    def __len__(self) -> int:
        return len(self.labels())

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Every row once, in order, in batches of `batch_size` (the last one may be smaller)."""
        for file in self.files:
            patches, labels = self._rows(self._read(file, ["patches", "label"]))
            for start in range(0, len(labels), batch_size):
                yield patches[start : start + batch_size], labels[start : start + batch_size]

    def take(self, indices: np.ndarray, batch_size: int) -> Iterator[Batch]:
        """The rows at `indices` (row numbers of the split), in the order given, in batches; each file
        holding some of them is read once."""
        _, offsets = self._index()
        indices = np.asarray(indices, dtype=np.int64)
        file_of = np.searchsorted(offsets, indices, side="right") - 1
        out_patches = np.empty((len(indices), *self.geometry.shape), np.uint8)
        out_labels = np.empty(len(indices), np.int64)
        for file_index in np.unique(file_of):
            positions = np.flatnonzero(file_of == file_index)
            patches, labels = self._rows(self._read(self.files[file_index], ["patches", "label"]))
            local = indices[positions] - offsets[file_index]
            out_patches[positions], out_labels[positions] = patches[local], labels[local]
        for start in range(0, len(indices), batch_size):
            yield out_patches[start : start + batch_size], out_labels[start : start + batch_size]

    def training_batches(
        self,
        batch_size: int,
        seed: int,
        exclude: np.ndarray | None = None,
        window_bytes: int = SHUFFLE_WINDOW_BYTES,
    ) -> Iterator[Batch]:
        """Endless shuffled full batches: every epoch visits the files in a new order, and rows are shuffled
        within a window of about `window_bytes` of patches; rows in `exclude` (a validation hold-out) are
        never served. Deterministic for a seed."""
        _, offsets = self._index()
        excluded = np.zeros(len(self), bool)
        if exclude is not None:
            excluded[exclude] = True
        if excluded.all():
            raise ValueError(f"{self.directory}: split {self.split!r} has no rows left to train on")
        window_rows = max(batch_size, window_bytes // self.geometry.sample_bytes)
        held_patches = np.empty((0, *self.geometry.shape), np.uint8)
        held_labels = np.empty(0, np.int64)
        epoch = 0
        while True:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(len(self.files))
            for position, file_index in enumerate(order):
                patches, labels = self._rows(self._read(self.files[file_index], ["patches", "label"]))
                start, stop = offsets[file_index], offsets[file_index + 1]
                keep = ~excluded[start:stop]
                held_patches = np.concatenate([held_patches, patches[keep]])
                held_labels = np.concatenate([held_labels, labels[keep]])
                if len(held_labels) < window_rows and position < len(order) - 1:
                    continue  # a window is full, or the epoch's last file was read
                shuffled = rng.permutation(len(held_labels))
                held_patches, held_labels = held_patches[shuffled], held_labels[shuffled]
                whole = len(held_labels) // batch_size * batch_size
                for begin in range(0, whole, batch_size):
                    yield held_patches[begin : begin + batch_size], held_labels[begin : begin + batch_size]
                held_patches, held_labels = held_patches[whole:], held_labels[whole:]
            epoch += 1


def holdout_sizes(counts: np.ndarray, fraction: float, max_rows: int | None = None) -> np.ndarray:
    """How many rows of each class (`counts`: its rows) a validation hold-out takes: `fraction` of them,
    at least one of a class with two or more rows and none of a class with one; `fraction` is lowered so
    that about `max_rows` are taken in all."""
    counts = np.asarray(counts, dtype=np.int64)
    if fraction <= 0:
        return np.zeros(len(counts), np.int64)
    if max_rows is not None:
        fraction = min(fraction, max_rows / max(1, int(counts.sum())))
    return np.array([max(0, min(n - 1, max(1, round(fraction * n)))) for n in counts], np.int64)


def holdout(labels: np.ndarray, fraction: float, seed: int, max_rows: int | None = None) -> np.ndarray:
    """Row numbers of a validation hold-out of `holdout_sizes` rows of every class, drawn with `seed`, so
    the best weights are chosen without the test split."""
    if fraction <= 0:
        return np.empty(0, np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    sizes = holdout_sizes(counts, fraction, max_rows)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(labels == label))[:size]
        for label, size in zip(classes, sizes, strict=True)
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)
