"""A PNG grid of samples per class, read back from the shards: what a person checks by eye."""

from __future__ import annotations

from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

from pipeline.datasets.card import PREVIEW_FILE, read_card, shard_paths

IMAGE_KEYS = "jpg;jpeg;png;webp;ppm;pgm;bmp;gif;tif;tiff"


def write_preview(
    directory: str | Path, split: str | None = None, per_class: int = 8, max_classes: int = 10, cell: int = 64
) -> Path:
    """Write `preview.png` beside dataset.json: one row per class, `per_class` samples each, labelled."""
    directory = Path(directory)
    card = read_card(directory)
    split = split or next(iter(card["splits"]))
    classes = card["classes"][:max_classes]
    rows: dict[int, list[Image.Image]] = {label: [] for label in range(len(classes))}
    urls = [str(path) for path in shard_paths(directory, split)]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    for sample in dataset.to_tuple(IMAGE_KEYS, "cls"):
        image, label = sample[0], int(sample[1])
        if label in rows and len(rows[label]) < per_class:
            rows[label].append(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST))
        if all(len(images) == per_class for images in rows.values()):
            break
    label_width = 8 * max(len(name) for name in classes) + 12
    grid = Image.new("RGB", (label_width + per_class * (cell + 2), len(classes) * (cell + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for label, images in rows.items():
        top = label * (cell + 2)
        draw.text((4, top + cell // 2 - 6), classes[label], fill="black")
        for column, image in enumerate(images):
            grid.paste(image, (label_width + column * (cell + 2), top))
    path = directory / PREVIEW_FILE
    grid.save(path)
    return path
