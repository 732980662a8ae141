"""The pretraining loop: steps of `grad_accum` micro-batches on a DeepSpeed engine, the loss and accuracy
all-reduced over the ranks, a record every `log_every` steps and a checkpoint every `checkpoint_every`.

No Ray here. Whatever runs the ranks brings its hooks: the micro-batches of an epoch from a position,
saving a checkpoint, writing a record, and whether a stop was asked for. Ray Train's worker
(`pipeline.pretrain.worker`) is one such caller; the tests run it on a one-rank gloo group with batches
from memory.

The loop ends in one of four ways, every rank alike: the budget is trained ("finished"); a stop was
asked for, and the step just trained is checkpointed first ("stopped"); the caller's notice asked for the
group to be started again on other ranks, after a checkpoint ("regroup"); or a step's loss or gradient
norm is not finite ("diverged"), and nothing of that state is saved. A notice may also ask for a
checkpoint alone (a node's preemption notice), and training carries on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from vit.engine import set_step_lr, train_micro_batch
from vit.evaluate import Batch
from vit.recipe import Cadence, Recipe

Notice = Literal["", "checkpoint", "regroup"]


@dataclass(frozen=True)
class Hooks:
    """What the loop asks of its caller.

    `batches(epoch, skip)`: the epoch's micro-batches for this rank, starting after the first `skip`;
    `save(step, epoch)`: write a checkpoint (every rank calls it); `record(record)`: keep a step's
    metrics (every rank calls it with the same all-reduced numbers; the caller decides who writes);
    `stop_requested()`: whether to checkpoint and stop after this step (any rank's yes stops all);
    `notice(step)`: after step `step`, "checkpoint" (save now, carry on), "regroup" (save now and end the
    loop: the caller restarts it on another number of ranks) or "" (nothing); every rank must answer alike.
    """

    batches: Callable[[int, int], Iterator[Batch]]
    save: Callable[[int, int], None]
    record: Callable[[dict[str, Any]], None]
    stop_requested: Callable[[], bool] = lambda: False
    notice: Callable[[int], Notice] = lambda step: ""


@dataclass(frozen=True)
class LoopEnd:
    """How the loop ended: at `step` (the last checkpointed step unless "diverged"), and why."""

    step: int
    reason: str  # "finished", "stopped", "regroup" or "diverged"
    detail: str = ""  # for "diverged": which value was not finite


@dataclass(frozen=True)
class Throughput:
    """What turns a step's wall time into images/s, tokens/s and model-FLOP utilisation."""

    images_per_step: int
    flops_per_step: float
    peak_flops: float | None  # of all ranks together; None when unknown
    seq_len: int | None  # tokens per image; None for a model without tokens (BiT)


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
) -> LoopEnd:
    """Train from `start_step` to `recipe.total_steps`, or until a stop or a non-finite step. Every rank
    runs the same number of steps (the caller plans `steps_per_epoch` so that every rank's data holds
    them) and ends the same way."""
    rank = dist.get_rank()
    rng = np.random.default_rng([seed, rank, start_step])  # mixup draws; a resume draws afresh
    step = start_step
    while step < recipe.total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        micro_batches = hooks.batches(epoch, position * recipe.grad_accum)
        for _ in range(position, steps_per_epoch):
            record = _train_step(engine, recipe, micro_batches, rng, step, epoch, throughput)
            step += 1
            not_finite = non_finite(record)
            if not_finite:
                hooks.record(record)
                return LoopEnd(step, "diverged", not_finite)
            if step % cadence.log_every == 0 or step == recipe.total_steps or step == 1:
                hooks.record(record)
            saved = step % cadence.checkpoint_every == 0 or step == recipe.total_steps
            if saved:
                hooks.save(step, epoch)
            if step == recipe.total_steps:
                break
            stop, notice = _agreed(hooks.stop_requested(), engine.device), hooks.notice(step)
            if (stop or notice) and not saved:
                hooks.save(step, epoch)
            if stop:
                return LoopEnd(step, "stopped")
            if notice == "regroup":
                return LoopEnd(step, "regroup")
    return LoopEnd(step, "finished")


def non_finite(record: dict[str, Any]) -> str:
    """'' when the step's loss and gradient norm are finite; else what was not (`loss nan`)."""
    bad = [f"{name} {record[name]}" for name in ("loss", "grad_norm")
           if record.get(name) is not None and not math.isfinite(record[name])]  # fmt: skip
    return ", ".join(bad)


def _agreed(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any (a stop asked of one rank stops them all together)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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
    # loss x images, correct, images; on the engine's device, where NCCL can reduce it
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)
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
        totals[0] += result.loss.detach().double() * result.images
        totals[1:] += torch.tensor([result.correct, result.images], dtype=torch.float64, device=engine.device)
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
        "tokens_per_s": images_per_s * throughput.seq_len if throughput.seq_len else None,
        "mfu": throughput.flops_per_step / seconds / peak if peak else None,
        "step_s": seconds,
        "data_wait_s": waited,
        # DeepSpeed drops an optimizer step whose gradients overflowed, and says nothing: counted here.
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
    }
