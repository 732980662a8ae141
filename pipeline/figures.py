"""Pictures written by headless processes (drivers, Ray workers): matplotlib's Agg backend, a figure laid
out, saved whole and closed, so that no plot leaks memory in a long-lived worker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def saved_figure(out: Path, *, dpi: int = 110, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`plt.subplots(**subplots)` as (figure, axes); on leaving, laid out and written to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(**subplots)
    try:
        yield figure, axes
        figure.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=dpi)
    finally:
        plt.close(figure)
