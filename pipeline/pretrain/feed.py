"""Each Ray Train worker's data: its rows of the run's order (`pipeline.pretrain.order`) read straight from
the patch files with pyarrow by a few threads ahead of the trainer, and cut into micro-batches.

The files are listed once per run (from the manifest, on the driver); each worker reads only its own
rows, the next epoch's reads start while the current epoch's last steps train (one stream spans the
epochs), and a relaunch starts at the checkpoint's position without reading what came before it. Batches
land in pinned memory on a GPU worker, so the copy to the device is asynchronous.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.patchfile import patches_array
from pipeline.pretrain.order import Corpus, FeedPlan, Lineage, Piece, chunks, rank_spans
from pipeline.storage import resolve_all
from vit.recipe import grad_accum

READ_BYTES = 32 * 2**20  # one read: about one row group of the patch files (ROW_GROUP_BYTES)
READ_ROWS = 4096  # and at most this many rows (small images: a first batch soon, files opened in steps)


# ---------------------------------------------------------------- reading rows


@dataclass
class _Group:
    patches: np.ndarray  # [rows, sample_bytes] uint8, a view of Arrow's buffer
    labels: np.ndarray  # [rows] int64


class RowReader:
    """Reads rows of the corpus's files by row group, keeping the most recent groups (a shuffle window
    draws its rows from a few groups, read once): thread-safe, each group read by one thread at a time."""

    def __init__(self, corpus: Corpus, cache_bytes: int) -> None:
        self.corpus, self.cache_bytes = corpus, cache_bytes
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple[int, int], Future[_Group]] = OrderedDict()
        self._footers: dict[int, Any] = {}
        self._held = 0  # bytes of the groups read and kept
        # One filesystem for all the files, built once (an s3:// filesystem per read would cost each read
        # a client and its credential lookup).
        self._filesystem, self._paths = resolve_all(list(corpus.files))

    def read(self, piece: Piece, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The piece's rows as (uint8 [n, N, D] patches, int64 [n] labels), in the piece's order."""
        geometry, n = self.corpus.geometry, len(piece)
        patches = torch.empty((n, *geometry.shape), dtype=torch.uint8, pin_memory=pin)
        labels = torch.empty(n, dtype=torch.int64)
        by_group = self._locate(piece)
        staged = np.empty((n, geometry.sample_bytes), np.uint8)
        staged_labels = np.empty(n, np.int64)
        order = np.empty(n, np.int64)  # staged row of each piece position
        at = 0
        for key, (positions, rows) in by_group.items():
            group = self._group(*key)
            stop = at + len(rows)
            np.take(group.patches, rows, axis=0, out=staged[at:stop])
            np.take(group.labels, rows, out=staged_labels[at:stop])
            order[positions] = np.arange(at, stop)
            at = stop
        np.take(staged, order, axis=0, out=patches.numpy().reshape(n, -1))
        np.take(staged_labels, order, out=labels.numpy())
        return patches, labels

    def _locate(self, piece: Piece) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        """Piece positions grouped by (file, row group), with each one's row within its group."""
        out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for file in np.unique(piece.files).tolist():
            positions = np.flatnonzero(piece.files == file)
            rows = piece.rows[positions]
            ends = self._footer(file)[1]
            if len(rows) and rows.max() >= (ends[-1] if len(ends) else 0):
                held = int(ends[-1]) if len(ends) else 0
                raise ValueError(
                    f"{self.corpus.files[file]}: holds {held} rows, fewer than the run's plan reads of it "
                    f"({self.corpus.counts[file]}, from the manifest); the file changed after preprocessing: "
                    "preprocess the split again"
                )
            group = np.searchsorted(ends, rows, side="right")
            starts = np.concatenate([[0], ends[:-1]])
            for index in np.unique(group).tolist():
                mine = group == index
                out[(file, index)] = (positions[mine], rows[mine] - starts[index])
        return out

    def _footer(self, file: int) -> tuple[Any, np.ndarray]:
        """The file's Parquet metadata and the cumulative row count at the end of each row group."""
        footer = self._footers.get(file)
        if footer is None:
            try:
                with self._filesystem.open_input_file(self._paths[file]) as stream:
                    metadata = pq.ParquetFile(stream).metadata
            except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
                raise OSError(f"{self.corpus.files[file]}: not a readable patch file: {error}") from error
            ends = np.cumsum([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
            footer = self._footers[file] = (metadata, ends)
        return footer

    def _group(self, file: int, index: int) -> _Group:
        key = (file, index)
        with self._lock:
            future = self._groups.get(key)
            mine = future is None
            if mine:
                future = self._groups[key] = Future()
            self._groups.move_to_end(key)
        if mine:
            try:
                group = self._read_group(file, index)
            except BaseException as error:
                with self._lock:
                    self._groups.pop(key, None)
                future.set_exception(error)
                raise
            future.set_result(group)
            self._keep(group.patches.nbytes)
        return future.result()

    def _read_group(self, file: int, index: int) -> _Group:
        metadata = self._footer(file)[0]
        try:
            with self._filesystem.open_input_file(self._paths[file]) as stream:
                table = pq.ParquetFile(stream, metadata=metadata).read_row_group(index, columns=COLUMNS)
        except (OSError, ValueError) as error:
            raise OSError(f"{self.corpus.files[file]}: row group {index} cannot be read: {error}") from error
        return _Group(patches_array(table.column("patches")), table.column("label").to_numpy())

    def _keep(self, size: int) -> None:
        """Count a group just read, and drop the least recently used read ones beyond the budget."""
        with self._lock:
            self._held += size
            while self._held > self.cache_bytes and len(self._groups) > 1:
                key, oldest = next(iter(self._groups.items()))
                if not oldest.done():
                    break
                self._groups.pop(key)
                self._held -= oldest.result().patches.nbytes


COLUMNS = ["patches", "label"]


# ---------------------------------------------------------------- the rank's stream


class Feed:
    """A rank's micro-batches from `step` on, epoch after epoch, read `plan.depth` reads ahead.

    `lineage` is the current epoch's (pipeline.pretrain.order); the loop asks for each epoch's batches in
    turn (`batches(epoch, skip)`), and the next epoch's first reads are done by the time it does."""

    def __init__(self, plan: FeedPlan, rank: int, world: int, step: int, lineage: Lineage, pin: bool) -> None:
        self.plan, self.rank, self.world, self.lineage, self.pin = plan, rank, world, lineage, pin
        self.epoch, self.position = divmod(step, plan.steps_per_epoch)
        sample_bytes = plan.corpus.geometry.sample_bytes
        per_read = max(plan.micro_batch, min(READ_ROWS, READ_BYTES // sample_bytes))
        self.rows_per_read = per_read // plan.micro_batch * plan.micro_batch
        cache = 2 * max(plan.window, 1) * sample_bytes + 4 * READ_BYTES  # two shuffle windows
        self.reader = RowReader(plan.corpus, cache_bytes=cache)
        self._pool = ThreadPoolExecutor(plan.threads, thread_name_prefix="vitpipe-feed")
        self._reads = self._schedule()
        self._ahead: deque[tuple[int, Future]] = deque()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def spans(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's stream positions of `epoch` still to read from where the feed starts it."""
        first = epoch == self.epoch
        lineage = self.lineage if first else [(0, self.world)]
        at = self.position if first else 0
        return rank_spans(self.plan.epoch_samples, lineage, self.rank, at, self.plan.global_batch)

    def _schedule(self) -> Iterator[tuple[int, Future]]:
        """Every read of every epoch from the start on, submitted as the trainer makes room."""
        epoch = self.epoch
        while True:
            order = self.plan.order(epoch)
            for start, stop in chunks(self.spans(epoch), self.rows_per_read):
                yield epoch, self._pool.submit(self.reader.read, order.positions(start, stop), self.pin)
            epoch += 1

    def _next_read(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        while len(self._ahead) < self.plan.depth:
            self._ahead.append(next(self._reads))
        epoch, future = self._ahead.popleft()
        return epoch, *future.result()

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's micro-batches (the loop's `Hooks.batches`); `skip` must be where the feed stands."""
        plan, first = self.plan, epoch == self.epoch
        expected = self.position * grad_accum(plan.global_batch, plan.micro_batch, self.world) if first else 0
        if skip != expected:
            raise RuntimeError(f"the feed stands at micro-batch {expected} of epoch {epoch}, not {skip}")
        left = sum(stop - start for start, stop in self.spans(epoch))
        return self._epoch_batches(epoch, left)

    def _epoch_batches(self, epoch: int, left: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.plan.micro_batch
        held: list[tuple[torch.Tensor, torch.Tensor]] = []
        held_rows = 0
        while left > 0:
            read_epoch, patches, labels = self._next_read()
            if read_epoch != epoch:
                raise RuntimeError(f"the feed read epoch {read_epoch} while epoch {epoch} was asked for")
            left -= len(labels)
            start = 0
            if held:  # a batch across two reads: join the rows left over with this read's first
                need = size - held_rows
                held.append((patches[:need], labels[:need]))
                start = need
                if sum(len(part[1]) for part in held) == size:
                    yield torch.cat([p for p, _ in held]), torch.cat([lab for _, lab in held])
                    held, held_rows = [], 0
                else:
                    held_rows = sum(len(part[1]) for part in held)
                    continue
            for lo in range(start, len(labels) - size + 1, size):
                yield patches[lo : lo + size], labels[lo : lo + size]
            tail = start + (len(labels) - start) // size * size
            if tail < len(labels):
                held, held_rows = [(patches[tail:], labels[tail:])], len(labels) - tail
