"""Each Ray Train worker's data: its rows of the run's order (`pipeline.pretrain.order`) read straight from
the patch files with pyarrow by a few threads ahead of the trainer, and cut into micro-batches.

The files are listed once per run (from the manifest, on the driver); each worker reads only its own
rows, the next epoch's reads start while the current epoch's last steps train (one stream spans the
epochs), and a relaunch starts at the checkpoint's position without reading what came before it. Batches
land in pinned memory on a GPU worker, so the copy to the device is asynchronous.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pipeline.patchfile import READ_BYTES, READ_ROWS, RowReader
from pipeline.pretrain.feed_plan import FeedPlan
from pipeline.pretrain.order import Lineage, Piece, chunks, rank_spans

# ---------------------------------------------------------------- the rank's stream


class Feed:
    """A rank's micro-batches from `step` on, epoch after epoch, read `plan.depth` reads ahead.

    `lineage` is the current epoch's (pipeline.pretrain.order); the loop asks for each epoch's batches in
    turn (`batches(epoch, position)`, position in optimizer steps), and the next epoch's first reads are
    done by the time it does."""

    def __init__(self, plan: FeedPlan, rank: int, world: int, step: int, lineage: Lineage, pin: bool) -> None:
        self.plan, self.rank, self.world, self.lineage, self.pin = plan, rank, world, lineage, pin
        self.epoch, self.position = divmod(step, plan.steps_per_epoch)
        sample_bytes = plan.corpus.geometry.sample_bytes
        micro = plan.batch.micro_batch
        per_read = max(micro, min(READ_ROWS, READ_BYTES // sample_bytes))
        self.rows_per_read = per_read // micro * micro
        cache = 2 * max(plan.window, 1) * sample_bytes + 4 * READ_BYTES  # two shuffle windows
        corpus = plan.corpus
        self.reader = RowReader(corpus.files, corpus.counts, corpus.geometry, cache_bytes=cache)
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
        return rank_spans(self.plan.epoch_samples, lineage, self.rank, at, self.plan.batch.global_batch)

    def _schedule(self) -> Iterator[tuple[int, Future]]:
        """Every read of every epoch from the start on, submitted as the trainer makes room."""
        epoch = self.epoch
        while True:
            order = self.plan.order(epoch)
            for start, stop in chunks(self.spans(epoch), self.rows_per_read):
                yield epoch, self._pool.submit(self._read, order.positions(start, stop))
            epoch += 1

    def _read(self, piece: Piece) -> tuple[torch.Tensor, torch.Tensor]:
        """The piece's rows as (uint8 [n, N, D] patches, int64 [n] labels), pinned on a GPU worker."""
        n, shape = len(piece), self.plan.corpus.geometry.shape
        patches = torch.empty((n, *shape), dtype=torch.uint8, pin_memory=self.pin)
        labels = torch.empty(n, dtype=torch.int64)
        self.reader.read(piece.files, piece.rows, patches.view(n, -1).numpy(), labels.numpy())
        return patches, labels

    def _next_read(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        while len(self._ahead) < self.plan.depth:
            self._ahead.append(next(self._reads))
        epoch, future = self._ahead.popleft()
        return epoch, *future.result()

    def batches(self, epoch: int, position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's micro-batches from its optimizer step `position` on (the loop's `Hooks.batches`): the
        feed reads from where it was started, so `position` must be where it stands."""
        stands = self.position if epoch == self.epoch else 0
        if position != stands:
            raise RuntimeError(f"the feed stands at step {stands} of epoch {epoch}, not {position}")
        left = sum(stop - start for start, stop in self.spans(epoch))
        return self._epoch_batches(epoch, left)

    def _epoch_batches(self, epoch: int, left: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.plan.batch.micro_batch
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
