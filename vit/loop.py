"""The pretraining loop: steps of `grad_accum` micro-batches on a DeepSpeed engine, the loss and accuracy
all-reduced over the ranks, a record every `log_every` steps and a checkpoint every `checkpoint_every`.

No Ray here. Whatever runs the ranks brings three hooks: the micro-batches of an epoch from a position,
saving a checkpoint, and writing a record. Ray Train's worker (`pipeline.pretrain.worker`) is one such
caller; the tests run it on a one-rank gloo group with batches from memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vit.engine import set_step_lr, train_micro_batch
from vit.evaluate import Batch
from vit.recipe import Cadence, Recipe


@dataclass(frozen=True)
class Hooks:
    """What the loop asks of its caller.

    `batches(epoch, skip)`: the epoch's micro-batches for this rank, starting after the first `skip`;
    `save(step, epoch)`: write a checkpoint (every rank calls it); `record(record)`: keep a step's
    metrics (every rank calls it with the same all-reduced numbers; the caller decides who writes).
    """

    batches: Callable[[int, int], Iterator[Batch]]
    save: Callable[[int, int], None]
    record: Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Throughput:
    """What turns a step's wall time into images/s, tokens/s and model-FLOP utilisation."""

    images_per_step: int
    flops_per_step: float
    peak_flops: float | None  # of all ranks together; None when unknown
    seq_len: int


class DataExhaustedError(RuntimeError):
    """The data ran out before the epoch's planned micro-batches: the split is smaller than planned."""


def pretrain_loop(
    engine: Any,
    recipe: Recipe,
    hooks: Hooks,
    *,
    start_step: int,
    steps_per_epoch: int,
    cadence: Cadence,
    throughput: Throughput,
    seed: int,
) -> int:
    """Train from `start_step` to `recipe.total_steps`; returns the last step. Every rank runs the same
    number of steps (the caller plans `steps_per_epoch` so that every rank's data holds them)."""
    rank = dist.get_rank()
    rng = np.random.default_rng([seed, rank, start_step])  # mixup draws; a resume draws afresh
    step = start_step
    while step < recipe.total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        micro_batches = hooks.batches(epoch, position * recipe.grad_accum)
        for _ in range(position, steps_per_epoch):
            record = _train_step(engine, recipe, micro_batches, rng, step, epoch, throughput)
            step += 1
            if step % cadence.log_every == 0 or step == recipe.total_steps or step == 1:
                hooks.record(record)
            if step % cadence.checkpoint_every == 0 or step == recipe.total_steps:
                hooks.save(step, epoch)
            if step == recipe.total_steps:
                break
    return step


def _train_step(
    engine: Any,
    recipe: Recipe,
    micro_batches: Iterator[Batch],
    rng: np.random.Generator,
    step: int,
    epoch: int,
    throughput: Throughput,
) -> dict[str, Any]:
    """One optimizer step (0-based `step`) of `grad_accum` micro-batches; returns its record."""
    started = time.perf_counter()
    lr = set_step_lr(engine, recipe, step)
    totals = torch.zeros(3, dtype=torch.float64)  # loss x images, correct, images
    waited = 0.0
    for _ in range(recipe.grad_accum):
        wait_started = time.perf_counter()
        batch = next(micro_batches, None)
        if batch is None:
            raise DataExhaustedError(
                f"rank {dist.get_rank()}: the data ran out during step {step + 1} (epoch {epoch}); the "
                "split holds fewer micro-batches than planned"
            )
        waited += time.perf_counter() - wait_started
        result = train_micro_batch(engine, *batch, recipe, rng)
        totals += torch.tensor([float(result.loss.detach()) * result.images, result.correct, result.images])
    dist.all_reduce(totals)
    seconds = time.perf_counter() - started
    return step_record(step + 1, epoch, totals, engine, lr, seconds, waited, throughput)


def step_record(
    step: int, epoch: int, totals: torch.Tensor, engine: Any, lr: float, seconds: float, waited: float,
    throughput: Throughput,
) -> dict[str, Any]:  # fmt: skip
    """The metrics of a finished step (1-based), as metrics.jsonl and TensorBoard keep them."""
    loss_sum, correct, images = totals.tolist()
    grad_norm = engine.get_global_grad_norm()
    images_per_s = throughput.images_per_step / seconds
    peak = throughput.peak_flops
    return {
        "step": step,
        "epoch": epoch,
        "loss": loss_sum / images,
        "accuracy": correct / images,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "images_per_s": images_per_s,
        "tokens_per_s": images_per_s * throughput.seq_len,
        "mfu": throughput.flops_per_step / seconds / peak if peak else None,
        "step_s": seconds,
        "data_wait_s": waited,
    }
