"""`vitpipe inspect DIR`: the manifest in a few lines, and a PNG of samples rebuilt from their patches.

The pictures go through `vit.patches.unpatchify`, the inverse of the function that made the files,
so a wrong layout, channel order or resize shows up to the eye.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.patchfile import geometry_of, patches_array
from pipeline.preprocess.manifest import (
    MANIFEST_FILE,
    failure_advice,
    failure_kinds,
    patch_files,
    read_manifest,
)
from pipeline.storage import resolve
from vit.patches import unpatchify


def describe(directory: str, max_failures: int = 5) -> str:
    """A human summary of a patch directory: config, counts per split, failures grouped by reason."""
    manifest = read_manifest(directory)
    totals, geometry, config = manifest["totals"], manifest["patches"], manifest["config"]
    classes = manifest["classes"]
    lines = [
        f"{directory}: patches of {manifest['input']} (config hash {manifest['config_hash']})",
        f"  {geometry['image_size']}px, {config['resize']} ({config['resample']}), "
        f"patch {geometry['patch_size']}, {geometry['channels']} channel(s): "
        f"{geometry['num_patches']} x {geometry['patch_dim']} uint8 per image",
        f"  labels: {config['label_key'] or 'none'}; "
        + (f"{len(classes)} classes" if classes else f"{len(totals['per_class'])} label values"),
    ]
    for split, entry in manifest["splits"].items():
        lines.append(f"  split {split}: {entry['samples']:,} samples in {len(entry['files'])} file(s)")
    lines.append(
        f"  total: {totals['samples']:,} samples from {totals['shards']} shard(s); "
        f"{totals['failed']:,} failed ({totals['failure_rate']:.2%}), "
        f"{totals['unreadable_shards']} unreadable shard(s)"
    )
    failures = manifest["failures"]
    if failures:
        lines.append(f"  failures: {failure_kinds(failures)}")
        lines += [f"  {line}" for line in failure_advice(failures, examples=False)]  # listed below
        for failure in failures[:max_failures]:
            lines.append(f"    {failure['shard']} {failure['key']}: {failure['reason']}")
        if len(failures) > max_failures:
            lines.append(f"    ... {len(failures) - max_failures} more in {MANIFEST_FILE}")
    return "\n".join(lines)


def read_samples(directory: str, count: int, split: str | None = None) -> list[dict[str, Any]]:
    """The first `count` samples of a split (default: the first split) as images rebuilt from patches."""
    manifest = read_manifest(directory)
    split = split or next(iter(manifest["splits"]), None)
    if split is None:
        return []
    filesystem, _ = resolve(directory)
    samples: list[dict[str, Any]] = []
    for path in patch_files(directory, split):
        _, local = resolve(path)
        with filesystem.open_input_file(local) as handle:
            patch_file = pq.ParquetFile(handle)
            geometry = geometry_of(patch_file.schema_arrow)
            for batch in patch_file.iter_batches(batch_size=max(count, 1)):
                patches = patches_array(batch.column("patches"), geometry)
                images = unpatchify(patches, geometry.patch_size, geometry.channels)
                for key, label, image in zip(batch.column("key"), batch.column("label"), images, strict=True):
                    samples.append({"key": key.as_py(), "label": label.as_py(), "image": image})
                    if len(samples) == count:
                        return samples
    return samples


def write_grid(
    directory: str, out: str | None = None, count: int = 32, columns: int = 8, split: str | None = None
) -> str:
    """Write a labelled PNG grid of `count` samples; returns where (default: DIR/samples.png)."""
    manifest = read_manifest(directory)
    classes = manifest["classes"]
    samples = read_samples(directory, count, split)
    if not samples:
        raise ValueError(f"{directory}: no samples to show")
    size = manifest["patches"]["image_size"]
    cell = max(64, min(size, 160))
    caption = 14
    rows = -(-len(samples) // columns)
    grid = Image.new("RGB", (columns * (cell + 4), rows * (cell + caption + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for index, sample in enumerate(samples):
        pixels = np.asarray(sample["image"])
        picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        picture = picture.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        left, top = (index % columns) * (cell + 4), (index // columns) * (cell + caption + 4)
        grid.paste(picture, (left, top))
        draw.text((left + 2, top + cell + 1), _caption(sample["label"], classes, cell // 6), fill="black")
    target = out or posixpath.join(resolve(directory)[1], "samples.png")
    out_fs, out_path = resolve(target)
    with out_fs.open_output_stream(out_path) as stream:
        grid.save(stream, format="PNG")
    return target


def _caption(label: int | None, classes: list[str] | None, room: int) -> str:
    """The class name, or the label when names are unknown; long names lose their shared prefix."""
    if label is None:
        return "-"
    if not classes or label >= len(classes):
        return str(label)
    name = classes[label]
    if len(name) > room:
        name = name[len(os.path.commonprefix(classes)) :] or name  # noqa: RUF071  strings, not paths
    return name[:room]
