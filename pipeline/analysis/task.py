"""One model's analyses as one Ray task: its stored weights loaded as they are, test images resized to its
resolution, `vit.analysis` run on them, and four pictures and `analysis.json` written to
RUN/analysis/NAME/ (staged, then moved in whole)."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.analysis.figures import (
    PICTURES,
    plot_components,
    plot_distances,
    plot_position_similarity,
    plot_rollout,
)
from pipeline.analysis.subjects import ANALYSIS_FILE, Subject
from pipeline.ray_session import ray_task_device
from pipeline.storage import local_folder, publish_folder
from pipeline.transfer.data import SplitReader
from vit.analysis import Analysis, analyze_vit, fit_images
from vit.config import ViTConfig
from vit.weights import load_pretrained, read_checkpoint

if TYPE_CHECKING:  # the analysis settings arrive as a value; nothing here loads or checks a config
    from pipeline.config import AnalyzeConfig

ANALYSIS_FORMAT = "vitpipe.analysis/1"
MAX_MATRIX_PATCHES = 256  # the full position-similarity matrix goes into the JSON up to this many patches


@dataclass(frozen=True)
class ImageSource:
    """The patch folder and split whose images every model is looked at on (B's test split)."""

    name: str
    directory: str
    split: str


def analysis_task(subject: Subject, images: ImageSource, config: AnalyzeConfig, out: str) -> dict[str, Any]:
    """The Ray task's body: `out` is the subject's folder; returns its analysis.json's content (or why it
    was skipped: a BiT ResNet has no attention)."""
    started = time.perf_counter()
    torch.set_num_threads(max(1, int(config.cpus_per_task)))
    with tempfile.TemporaryDirectory(prefix="vitpipe-analysis-") as scratch:
        local = local_folder(subject.weights, Path(scratch) / "weights")
        architecture = read_checkpoint(local).config
        if not isinstance(architecture, ViTConfig):
            return {"subject": subject.name, "skipped": f"{architecture.describe()}: no attention to analyse"}
        device = ray_task_device()
        model = load_pretrained(local).to(device)
        reader = SplitReader(images.directory, images.split)
        rows = _spread_rows(len(reader), config.distance_images)
        batches = (
            fit_images(torch.from_numpy(patches), reader.geometry, architecture.geometry)
            for patches, _ in reader.take(rows, config.batch_size)
        )
        found = analyze_vit(
            model, batches, rollout_images=config.images, max_images=len(rows), components=config.components
        )
        staged = Path(scratch) / "staged"
        document = _document(subject, architecture, images, reader, rows, found)
        _draw(found, architecture, subject.label, staged)
        document["seconds"] = time.perf_counter() - started
        (staged / ANALYSIS_FILE).write_text(json.dumps(document, indent=1) + "\n")
        publish_folder(staged, out)
    return document


def _spread_rows(total: int, wanted: int) -> np.ndarray:
    """`wanted` row numbers spread evenly over the split (all of them when it is smaller), so that a split
    stored class by class still shows every class."""
    if total == 0:
        raise ValueError("the split to analyse the models on has no images")
    return np.unique(np.linspace(0, total - 1, min(wanted, total)).round().astype(np.int64))


def _draw(found: Analysis, architecture: ViTConfig, label: str, staged: Path) -> None:
    grid = architecture.geometry.grid
    plot_rollout(found.images.numpy(), found.rollout.numpy(), label, staged / PICTURES["rollout"])
    plot_distances(found.distances.numpy(), found.uniform_distance, label, staged / PICTURES["distance"])
    plot_position_similarity(found.similarity.numpy(), grid, label, staged / PICTURES["position_embedding"])
    plot_components(found.components.numpy(), found.explained.numpy(), label, staged / PICTURES["filters"])


def _document(
    subject: Subject,
    architecture: ViTConfig,
    images: ImageSource,
    reader: SplitReader,
    rows: np.ndarray,
    found: Analysis,
) -> dict[str, Any]:
    """analysis.json: every number the pictures show, with what it was computed from."""
    geometry = architecture.geometry
    distances = found.distances.numpy()
    similarity = found.similarity.numpy()
    return {
        "format": ANALYSIS_FORMAT,
        "subject": {
            "name": subject.name,
            "label": subject.label,
            "weights": subject.weights,
            "role": subject.role,
            "point": subject.point,
        },
        "architecture": {"describe": architecture.describe(), **architecture.to_dict()},
        "images": {
            "source": images.name,
            "directory": images.directory,
            "split": images.split,
            "stored": reader.geometry.describe(),
            "seen_as": geometry.describe(),
            "count": found.images_seen,
            "rows": rows[: found.images_seen].tolist(),
        },
        "attention_distance": {
            "unit": f"pixels of the model's {geometry.image_size}px input",
            "per_layer_and_head": _rounded(distances),
            "mean_by_layer": _rounded(distances.mean(axis=1)),
            "uniform": round(found.uniform_distance, 4),
        },
        "rollout": {"rows": rows[: len(found.rollout)].tolist(), "maps": _rounded(found.rollout.numpy(), 5)},
        "position_embedding": {
            "grid": geometry.grid,
            **_similarity_summary(similarity, geometry.grid),
            "similarity": _rounded(similarity) if geometry.num_patches <= MAX_MATRIX_PATCHES else None,
        },
        "embedding_filters": {
            "explained_variance": _rounded(found.explained.numpy(), 5),
            "components": len(found.components),
        },
        "pictures": dict(PICTURES),
    }


def _similarity_summary(similarity: np.ndarray, grid: int) -> dict[str, float]:
    """How 2D the position embeddings are, in two numbers: the mean similarity of side-by-side patches and
    of patches at least half the grid apart in row or column (learned structure: the first well above)."""
    if grid < 2:
        return {}
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    row_gap, col_gap = np.abs(rows[:, None] - rows[None]), np.abs(cols[:, None] - cols[None])
    neighbours = row_gap + col_gap == 1
    far = np.maximum(row_gap, col_gap) >= grid // 2
    return {
        "neighbours": round(float(similarity[neighbours].mean()), 4),
        "far_apart": round(float(similarity[far].mean()), 4),
    }


def _rounded(values: np.ndarray, digits: int = 4) -> Any:
    return np.round(values.astype(np.float64), digits).tolist()
