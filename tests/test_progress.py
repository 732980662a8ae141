"""Progress lines: counts, rate and ETA while running, total time at the end."""

from __future__ import annotations

import io

from pipeline.metrics import Progress


def test_progress_lines_report_counts_rate_eta_and_completion():
    stream = io.StringIO()
    progress = Progress("corpus", total=3, every_s=0.0, stream=stream)
    progress.update(items=100)
    progress.update(items=100)
    progress.update(items=50)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("corpus: 1/3 shards, 100 images, ")
    assert "images/s, ETA" in lines[0]
    assert lines[2].startswith("corpus: 3/3 shards, 250 images, ")
    assert "done in" in lines[2]


def test_progress_is_quiet_between_intervals_but_always_prints_the_end():
    stream = io.StringIO()
    progress = Progress("x", total=50, every_s=3600, stream=stream)
    for _ in range(50):
        progress.update(items=1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1  # paced as the console paces lines: short work shows its last line only
    assert lines[-1].startswith("x: 50/50 shards, 50 images")
