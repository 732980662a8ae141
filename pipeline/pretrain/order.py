"""The order a pretraining run reads its samples in: a pure function of the seed, the epoch and the world
sizes the epoch has been trained on, so that a relaunch starts exactly where its checkpoint stopped.

Each epoch: the files in an order drawn from (seed, epoch); their rows laid end to end into one stream;
the stream cut into windows of `window` rows and each window's rows permuted (drawn from seed, epoch and
window). The first `steps_per_epoch x global_batch` positions of that stream are the epoch; rank r of W
reads the r-th of W equal contiguous spans of them, `global_batch / W` positions a step.

A relaunch on another number of ranks mid-epoch splits what the ranks had left, end to end, into as many
equal spans as the new ranks: the epoch's `lineage` ([step, ranks] since its start) says how the spans
went, and with it every sample of the epoch is read once, none twice, whatever the relaunches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

ORDER_FORMAT = "vitpipe.order/1"  # what a checkpoint's "data" record means: this module's order
Span = tuple[int, int]  # [start, stop) positions of the epoch's stream
Lineage = list[tuple[int, int]]  # (step within the epoch, ranks) from each (re)launch in the epoch on


@dataclass(frozen=True)
class Piece:
    """Rows to read, in this order: `rows[i]` of file `files[i]` (indices into the file's own rows)."""

    files: np.ndarray  # int32 file index (into the corpus's files), per row
    rows: np.ndarray  # int64 row number within that file, per row

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class EpochOrder:
    """The stream of one epoch over a corpus of files with `counts` rows each (the rows a run reads of
    each file: all of them, or a study subset's; `selected` maps to the file's own row numbers)."""

    counts: tuple[int, ...]
    seed: int
    epoch: int
    window: int  # rows permuted together; 0: the files' own order, read in windows of READ_ROWS
    selected: tuple[np.ndarray, ...] | None = None  # per file, the row numbers read of it (a subset)

    READ_ROWS = 1024

    def __post_init__(self) -> None:
        order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(len(self.counts))
        ends = np.cumsum(np.asarray(self.counts, dtype=np.int64)[order])
        object.__setattr__(self, "file_order", order)
        object.__setattr__(self, "ends", ends)
        object.__setattr__(self, "starts", ends - np.asarray(self.counts, dtype=np.int64)[order])
        if self.selected is not None:  # one flat array: file f's selected rows start at offsets[f]
            offsets = np.concatenate([[0], np.cumsum([len(rows) for rows in self.selected])[:-1]])
            object.__setattr__(self, "offsets", offsets.astype(np.int64))
            object.__setattr__(self, "flat", np.concatenate(self.selected).astype(np.int64))

    @property
    def samples(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def window_rows(self) -> int:
        return self.window or self.READ_ROWS

    def positions(self, start: int, stop: int) -> Piece:
        """The rows at stream positions [start, stop), in stream order."""
        size, parts = self.window_rows, []
        for window in range(start // size, -(-stop // size)):
            lo, hi = window * size, min((window + 1) * size, self.samples)
            slots = np.arange(hi - lo)
            if self.window:
                slots = np.random.default_rng([self.seed, self.epoch, 1, window]).permutation(hi - lo)
            parts.append(lo + slots[max(start, lo) - lo : min(stop, hi) - lo])
        flat = np.concatenate(parts) if parts else np.empty(0, np.int64)
        return self._rows_at(flat)

    def _rows_at(self, positions: np.ndarray) -> Piece:
        """Stream positions -> (file, row of that file)."""
        slot = np.searchsorted(self.ends, positions, side="right")
        files = self.file_order[slot]
        local = positions - self.starts[slot]
        if self.selected is not None:
            local = self.flat[self.offsets[files] + local]
        return Piece(files.astype(np.int32), local.astype(np.int64))


# ---------------------------------------------------------------- ranks' spans


def rank_spans(samples: int, lineage: Lineage, rank: int, step: int, per_step: int) -> list[Span]:
    """What rank `rank` has left to read of an epoch of `samples` stream positions at `step` within it,
    the ranks having been as `lineage` says (its last entry is this launch: `(first step, ranks)`).
    Every rank consumes `per_step / ranks` positions a step."""
    remaining: list[Span] = [(0, samples)]
    for index, (start, ranks) in enumerate(lineage):
        parts = _split(remaining, ranks)
        last = index == len(lineage) - 1
        until = step if last else lineage[index + 1][0]
        if (per_step * (until - start)) % ranks:
            raise ValueError(f"global batch {per_step} does not split over {ranks} ranks")
        used = per_step * (until - start) // ranks
        if last:
            return _skip(parts[rank], used)
        remaining = [span for part in parts for span in _skip(part, used)]
    raise ValueError("an epoch's lineage names at least the launch that reads it")


def extend_lineage(saved: Lineage | None, step: int, ranks: int) -> Lineage:
    """The lineage of a launch that starts at `step` within the epoch on `ranks` ranks, after `saved`
    (the checkpoint's lineage of the same epoch; None for a fresh epoch)."""
    if step == 0 or not saved:
        return [(0, ranks)]
    if saved[-1][1] == ranks:
        return [tuple(entry) for entry in saved]  # type: ignore[misc]
    return [*(tuple(entry) for entry in saved), (step, ranks)]  # type: ignore[list-item]


def _split(spans: list[Span], parts: int) -> list[list[Span]]:
    """Cut a list of spans, end to end, into `parts` lists of equal length (which must divide)."""
    total = sum(stop - start for start, stop in spans)
    each, left = divmod(total, parts)
    if left:
        raise ValueError(f"{total} positions do not split into {parts} equal parts")
    out: list[list[Span]] = [[] for _ in range(parts)]
    part, room = 0, each
    for start, stop in spans:
        while start < stop:
            take = min(room, stop - start)
            out[part].append((start, start + take))
            start, room = start + take, room - take
            if room == 0 and part < parts - 1:
                part, room = part + 1, each
    return out


def _skip(spans: list[Span], count: int) -> list[Span]:
    """The spans less their first `count` positions."""
    out = []
    for start, stop in spans:
        drop = min(count, stop - start)
        count -= drop
        if start + drop < stop:
            out.append((start + drop, stop))
    return out


def chunks(spans: list[Span], size: int) -> Iterator[Span]:
    """The spans cut into reads of at most `size` positions each."""
    for start, stop in spans:
        for lo in range(start, stop, size):
            yield lo, min(stop, lo + size)
