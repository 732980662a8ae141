"""Periodic progress lines for long work: items done of total, rate and ETA, at most every few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Prints `label: 3/10 shards, 1,234 images, 456 images/s, ETA 12s` as work completes."""

    def __init__(
        self, label: str, total: int, unit: str = "shards", every_s: float = 5.0, stream: TextIO | None = None
    ) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.items = 0
        self.started = time.perf_counter()
        self._last_print = -float("inf")

    def update(self, done: int = 1, items: int = 0) -> None:
        """Count `done` finished units holding `items` samples; print if a line is due."""
        self.done += done
        self.items += items
        now = time.perf_counter()
        if now - self._last_print >= self.every_s or self.done == self.total:
            self._last_print = now
            print(self.line(), file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def rate(self) -> float:
        """Samples per second so far."""
        return self.items / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        elapsed = self.elapsed
        text = f"{self.label}: {self.done}/{self.total} {self.unit}"
        if self.items:
            text += f", {self.items:,} images, {self.rate():,.0f} images/s"
        if 0 < self.done < self.total:
            text += f", ETA {elapsed / self.done * (self.total - self.done):.0f}s"
        elif self.done == self.total:
            text += f", done in {elapsed:.1f}s"
        return text
