"""Build one dataset with the builder of its kind: the one entry point `vitpipe datasets` and the stage
runner share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import Section
from pipeline.datasets.card import summarize


def build_dataset(
    config: Section, out: Path, overwrite: bool, preview: bool, address: str | None = None
) -> str:
    """Build the dataset `config` describes into `out` (and draw a preview) on Ray, joined at `address` (or
    started) unless this process is in it already; returns its summary."""
    from pipeline.datasets.digits import build_digits
    from pipeline.datasets.fractals import build_fractals
    from pipeline.datasets.imagefolder import build_imagefolder
    from pipeline.datasets.preview import write_preview
    from pipeline.ray_session import connect_ray

    connect_ray(address)
    builders: dict[str, Callable[..., Path]] = {
        "digits": build_digits,
        "fractals": build_fractals,
        "imagefolder": build_imagefolder,
    }
    builders[config.kind](config, out, overwrite=overwrite)  # type: ignore[attr-defined]
    text = summarize(out)
    if preview:
        text += f"\n  preview: {write_preview(out)}"
    return text


def planned_split_sizes(config: Section) -> dict[str, int] | None:
    """The images of each split the dataset `config` describes will hold, where its settings tell
    (generated corpora); None where only building tells (an image folder's files may not decode)."""
    if config.kind == "fractals":  # type: ignore[attr-defined]
        return {"train": config.classes * config.per_class}  # type: ignore[attr-defined]
    if config.kind == "digits":  # type: ignore[attr-defined]
        from pipeline.datasets.digits import split_sizes

        return split_sizes(config)  # type: ignore[arg-type]
    return None
