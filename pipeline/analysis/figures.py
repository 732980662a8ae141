"""The analysis pictures, drawn as the paper draws them: rollout maps over the images (Figure 6), the
cosine similarity of each patch's position embedding to every other (Figure 7 centre), the principal
components of the embedding filters (Figure 7 left), and every head's mean attention distance by depth
(Figure 7 right), for one model or side by side for several (a run's models, a study's sizes)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.figures import saved_figure

DISTANCE_LABEL = "mean attention distance (pixels)"
PICTURES = {  # one model's pictures, in its folder under RUN/analysis
    "rollout": "attention_rollout.png",
    "distance": "attention_distance.png",
    "position_embedding": "position_embedding_similarity.png",
    "filters": "embedding_filters.png",
}


def _show_image(axis, image: np.ndarray) -> None:
    """A uint8 [H, W, C] image, grey when it has one channel."""
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        axis.imshow(image)
    axis.set_xticks([])
    axis.set_yticks([])


def plot_rollout(images: np.ndarray, maps: np.ndarray, title: str, out: Path) -> None:
    """Each image above itself weighted by its rollout map (scaled to its maximum), as in Figure 6."""
    count = len(images)
    with saved_figure(out, figsize=(1.6 * count + 0.4, 3.6), nrows=2, ncols=count, squeeze=False) as (
        figure,
        axes,
    ):
        for column, (image, weights) in enumerate(zip(images, maps, strict=True)):
            size = image.shape[0]
            scaled = weights / max(float(weights.max()), 1e-12)
            repeat = size // scaled.shape[0]
            mask = np.kron(scaled, np.ones((repeat, repeat)))[..., None]
            _show_image(axes[0, column], image)
            _show_image(axes[1, column], (image.astype(np.float64) * mask).round().astype(np.uint8))
        axes[0, 0].set_ylabel("input")
        axes[1, 0].set_ylabel("attention")
        figure.suptitle(f"{title}: attention rollout")


def plot_distances(distances: np.ndarray, uniform: float, title: str, out: Path) -> None:
    """Every head's mean attention distance at every depth (dots), their mean (line), and the distance of
    attention spread evenly over the image (dashed), as in Figure 7 right."""
    plot_distance_comparison({title: distances}, uniform, f"{title}: attention distance by depth", out)


def plot_distance_comparison(series: dict[str, np.ndarray], uniform: float, title: str, out: Path) -> None:
    """Several models' distances [layers, heads] by depth, one colour each, in the order given."""
    with saved_figure(out, figsize=(5.2, 3.8)) as (_, axis):
        for colour, (label, distances) in zip(_colours(len(series)), series.items(), strict=True):
            _draw_series(axis, distances, label, colour)
        _finish_axis(axis, uniform, title)


def plot_distance_by_data(
    curves: dict[str, dict[str, np.ndarray]], uniform: dict[str, float], out: Path
) -> None:
    """The study's figure: for each ViT model (a panel), every pretraining size's distances by depth (each
    size's heads averaged over its seeds), smallest size lightest; "scratch" is a model trained on the
    target alone. The paper's question: do the lowest layers attend more globally with more data?"""
    with saved_figure(out, figsize=(5.2 * len(curves), 3.8), ncols=len(curves), squeeze=False) as (_, axes):
        for axis, (model, by_size) in zip(axes[0], curves.items(), strict=True):
            for colour, (label, distances) in zip(_colours(len(by_size)), by_size.items(), strict=True):
                _draw_series(axis, distances, label, colour)
            _finish_axis(axis, uniform[model], f"{model}: attention distance by pretraining images")


def _colours(count: int) -> list[tuple[float, ...]]:
    import matplotlib

    palette = matplotlib.colormaps["viridis"]
    return [palette(0.85 * index / max(count - 1, 1)) for index in range(count)]


def _draw_series(axis, distances: np.ndarray, label: str, colour: tuple[float, ...]) -> None:
    layers, heads = distances.shape
    depth = np.arange(1, layers + 1)
    axis.scatter(np.repeat(depth, heads), distances.reshape(-1), s=14, color=colour, alpha=0.55, linewidths=0)
    axis.plot(depth, distances.mean(axis=1), color=colour, marker="o", markersize=3, label=label)


def _finish_axis(axis, uniform: float, title: str) -> None:
    axis.axhline(uniform, color="grey", linestyle="--", linewidth=1, label="uniform attention")
    axis.set_xlabel("network depth (layer)")
    axis.set_ylabel(DISTANCE_LABEL)
    axis.set_ylim(bottom=0)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)


def plot_position_similarity(similarity: np.ndarray, grid: int, title: str, out: Path) -> None:
    """A grid x grid mosaic: the tile at (row, column) is that patch's similarity to every patch."""
    tiles = similarity.reshape(grid, grid, grid, grid)  # [row, col] of the patch, then its map
    gap = 1
    side = grid * (grid + gap) - gap
    mosaic = np.full((side, side), np.nan)
    for row in range(grid):
        for col in range(grid):
            top, left = row * (grid + gap), col * (grid + gap)
            mosaic[top : top + grid, left : left + grid] = tiles[row, col]
    with saved_figure(out, figsize=(4.6, 4.0)) as (figure, axis):
        shown = axis.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1)
        centres = np.arange(grid) * (grid + gap) + (grid - 1) / 2
        axis.set_xticks(centres, [str(i + 1) for i in range(grid)], fontsize=6)
        axis.set_yticks(centres, [str(i + 1) for i in range(grid)], fontsize=6)
        axis.set_xlabel("input patch column")
        axis.set_ylabel("input patch row")
        figure.colorbar(shown, ax=axis, label="cosine similarity")
        axis.set_title(f"{title}: position embedding similarity", fontsize=9)


def plot_components(components: np.ndarray, explained: np.ndarray, title: str, out: Path) -> None:
    """The first principal components of the embedding filters [k, P, P, C], each scaled to its own range
    and labelled with the share of variance it explains."""
    count = len(components)
    columns = min(count, 7)
    rows = math.ceil(count / columns)
    with saved_figure(
        out, figsize=(1.2 * columns, 1.3 * rows + 0.4), nrows=rows, ncols=columns, squeeze=False
    ) as (figure, axes):
        for index, axis in enumerate(axes.flat):
            axis.axis("off")
            if index >= count:
                continue
            part = components[index]
            scaled = (part - part.min()) / max(float(part.max() - part.min()), 1e-12)
            _show_image(axis, (scaled * 255).round().astype(np.uint8))
            axis.set_title(f"{explained[index]:.1%}", fontsize=6)
        figure.suptitle(f"{title}: embedding filters, first {count} principal components", fontsize=9)
