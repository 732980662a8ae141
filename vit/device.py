"""Batches onto the device and the device's numeric settings (TF32, bf16 autocast): the one place that
knows about CUDA streams and pinned memory, so that the loops read the same on a CPU and a GPU.

The stream logic is `copy_ahead` with the CUDA copy and wait passed in; a CPU test drives it with
recording fakes, so the order the GPU relies on is tested without one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

HostBatch = tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]  # patches, labels, on the host
DeviceBatch = tuple[torch.Tensor, torch.Tensor]  # patches, int64 labels, on the device

Item = TypeVar("Item")
Copied = TypeVar("Copied")
Ready = TypeVar("Ready")


def copy_ahead(
    batches: Iterable[Item], copy: Callable[[Item], Copied], wait: Callable[[Copied], Ready]
) -> Iterator[Ready]:
    """`wait(copy(batch))` of every batch, in order, one batch ahead: the copy of batch i+1 is issued before
    batch i is handed out, so that on a GPU it runs while the caller computes on batch i; `wait` makes a
    copied batch safe to use, right before it is handed out."""
    issued: deque[Copied] = deque()
    for batch in batches:
        issued.append(copy(batch))
        if len(issued) > 1:
            yield wait(issued.popleft())
    if issued:
        yield wait(issued.popleft())


def prefetch_to_device(batches: Iterable[HostBatch], device: torch.device) -> Iterator[DeviceBatch]:
    """(patches, labels) of every batch on `device`, labels as int64, one batch read and copied ahead.

    On CUDA the host tensors are pinned and copied without blocking on a stream of their own, which the
    compute stream waits for before it uses them; elsewhere a plain move (on a CPU, none at all).
    """
    if device.type != "cuda":
        return copy_ahead(batches, lambda batch: _move(batch, device), lambda moved: moved)
    stream = torch.cuda.Stream(device)
    return copy_ahead(
        batches, lambda batch: _copy_on(stream, batch, device), lambda copied: _wait(copied, device)
    )


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor in page-locked memory (itself when it is already): only such a tensor is copied to a
    GPU without blocking the host."""
    return tensor if tensor.is_pinned() else tensor.pin_memory()


def _host(batch: HostBatch) -> DeviceBatch:
    patches, labels = batch
    return torch.as_tensor(patches), torch.as_tensor(labels, dtype=torch.int64)


def _move(batch: HostBatch, device: torch.device) -> DeviceBatch:
    patches, labels = _host(batch)
    return patches.to(device), labels.to(device)


def _copy_on(
    stream: torch.cuda.Stream, batch: HostBatch, device: torch.device
) -> tuple[DeviceBatch, torch.cuda.Event]:
    """Issue the batch's copy on `stream`; returns the device tensors and the event that marks it done."""
    patches, labels = (pinned(tensor) for tensor in _host(batch))
    with torch.cuda.stream(stream):
        moved = patches.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return moved, stream.record_event()


def _wait(copied: tuple[DeviceBatch, torch.cuda.Event], device: torch.device) -> DeviceBatch:
    """Make the compute stream wait for the copy, and tell the caching allocator the tensors are used on
    it: they were allocated on the side stream, which would otherwise free them for reuse too early."""
    moved, done = copied
    current = torch.cuda.current_stream(device)
    current.wait_event(done)
    for tensor in moved:
        tensor.record_stream(current)
    return moved


def enable_tf32(device: torch.device) -> bool:
    """Let float32 matmuls and convolutions on a CUDA device use TF32 tensor cores (Ampere and newer: about
    8x the fp32 rate, a 10-bit mantissa in the products); returns whether it did. On other devices nothing
    changes. Torch 2.13's `fp32_precision` settings, not the legacy `allow_tf32` flags: torch refuses to
    read its TF32 state once both APIs have been used in a process."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    return True


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bf16 autocast on `device`'s type when `bf16`, else a context that changes nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def object_group(backend: str) -> object | None:
    """The process group Python objects (probed weights, a save's mark) travel in: a gloo group beside
    NCCL, whose object collectives would stage every rank's pickled bytes on rank 0's GPU (about 1.2 GB a
    probe of a ViT-L) and share NCCL's watchdog; the default group otherwise (None). Every rank calls it,
    in the same order, once."""
    if backend == "nccl":
        return torch.distributed.new_group(backend="gloo")
    return None
