"""Nested random subsets of a pretraining corpus, written as manifests over its patch files (no copies).

One permutation of every row of the corpus's training split is drawn from the seed; the subset of size n
is its first n rows, so each smaller subset lies inside every larger one, as the paper's JFT subsets do.
A manifest lists, per patch file, the rows it takes (in file order), and the class counts as drawn.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from pipeline.preprocess.manifest import manifest_classes, patch_files, read_manifest
from pipeline.storage import resolve, write_atomic

SUBSET_FORMAT = "vitpipe.subset/1"


@dataclass(frozen=True)
class Subset:
    """Rows of a corpus a study point pretrains on: per patch file (path or URL), its row numbers."""

    corpus: str
    split: str
    rows: dict[str, tuple[int, ...]]
    per_class: dict[str, int]

    @property
    def samples(self) -> int:
        return sum(len(rows) for rows in self.rows.values())


def subset_file(folder: str, size: int) -> str:
    return posixpath.join(folder, f"n{size:010d}.json")


def draw_subsets(corpus: str, split: str, sizes: tuple[int, ...], seed: int, folder: str) -> dict[int, str]:
    """Write the manifest of each size into `folder` (corpus: a patch directory); returns size -> file.
    A size beyond the split's rows is a ValueError naming both."""
    files = patch_files(corpus, split)
    classes = manifest_classes(read_manifest(corpus), corpus)
    labels = [_labels(file) for file in files]
    total = sum(len(file_labels) for file_labels in labels)
    too_big = [size for size in sizes if size > total]
    if too_big:
        raise ValueError(
            f"study.sizes {too_big}: the corpus {corpus} has {total:,} images in split {split!r}; "
            "lower the sizes or preprocess a larger corpus"
        )
    owner = np.repeat(np.arange(len(files)), [len(file_labels) for file_labels in labels])
    row = np.concatenate([np.arange(len(file_labels)) for file_labels in labels])
    flat_labels = np.concatenate(labels)
    order = np.random.default_rng(seed).permutation(total)
    written = {}
    for size in sizes:
        chosen = order[:size]
        counts = Counter(flat_labels[chosen].tolist())
        rows = {
            files[index]: sorted(row[chosen[owner[chosen] == index]].tolist())
            for index in sorted(set(owner[chosen].tolist()))
        }
        document = {
            "format": SUBSET_FORMAT,
            "corpus": corpus,
            "split": split,
            "seed": seed,
            "size": size,
            "per_class": {classes[label]: counts[label] for label in sorted(counts)},
            "rows": rows,
        }
        written[size] = subset_file(folder, size)
        write_atomic(written[size], json.dumps(document) + "\n")
    return written


def read_subset(path: str) -> Subset:
    """A manifest written by `draw_subsets`; anything else is a ValueError naming the file."""
    filesystem, local = resolve(path)
    try:
        with filesystem.open_input_stream(local) as stream:
            document = json.loads(stream.read())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable subset manifest ({error})") from None
    if not isinstance(document, dict) or document.get("format") != SUBSET_FORMAT:
        raise ValueError(f"{path}: not a {SUBSET_FORMAT} manifest")
    rows = {file: tuple(int(r) for r in taken) for file, taken in document["rows"].items()}
    return Subset(document["corpus"], document["split"], rows, dict(document["per_class"]))


def _labels(file: str) -> np.ndarray:
    filesystem, path = resolve(file)
    with filesystem.open_input_file(path) as stream:
        return pq.read_table(stream, columns=["label"]).column("label").to_numpy()
