"""The pretraining loop: steps of `batch.accumulation` micro-batches on a DeepSpeed engine, the loss and
accuracy all-reduced over the ranks, a record every `log_every` steps, a checkpoint every `checkpoint_every`.

No Ray here. Whatever runs the ranks brings its hooks: the micro-batches of an epoch from a position,
saving a checkpoint, writing a record, and whether a stop was asked for. Ray Train's worker
(`pipeline.pretrain.worker`) is one such caller; the tests run it on a one-rank gloo group with batches
from memory.

The loop ends in one of four ways, every rank alike: the budget is trained ("finished"); a stop was
asked for, and the log step it is agreed on at is checkpointed first ("stopped"); the caller's notice
asked for the group to be started again on other ranks, after a checkpoint ("regroup"); or a step's loss
or gradient norm is not finite ("diverged"), and nothing of that state is saved. A notice may also ask for a
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
from vit.objective import step_randomness
from vit.recipe import Cadence, Recipe

Notice = Literal["", "checkpoint", "regroup"]


@dataclass(frozen=True)
class Hooks:
    """What the loop asks of its caller.

    `batches(epoch, position)`: the epoch's micro-batches for this rank from its optimizer step `position` on
    (a resumed epoch starts part-way; the caller's data knows its batch split);
    `save(step, epoch)`: write a checkpoint (every rank calls it); `record(record)`: keep a step's
    metrics (every rank calls it with the same all-reduced numbers; the caller decides who writes);
    `stop_requested()`, asked at log steps: whether to checkpoint and stop (any rank's yes stops all);
    `notice(step)`: after step `step`, "checkpoint" (save now, carry on), "regroup" (save now and end the
    loop: the caller restarts it on another number of ranks) or "" (nothing); every rank must answer alike;
    `after_step(step)`: every rank, after each optimizer step and before its record or checkpoint (EMA
    weights, probes).
    """

    batches: Callable[[int, int], Iterator[Batch]]
    save: Callable[[int, int], None]
    record: Callable[[dict[str, Any]], None]
    stop_requested: Callable[[], bool] = lambda: False
    notice: Callable[[int], Notice] = lambda step: ""
    after_step: Callable[[int], None] = lambda step: None


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
    them) and ends the same way.

    The host reads the device only at log steps and before a checkpoint (nanoGPT's rule: each read waits
    for the GPU): loss, accuracy and the non-finite flag stay on the device in between, and a stop request
    is agreed on at log steps. A step that is not finite is therefore found at the next log step or
    checkpoint, before anything of it is saved."""
    rank = dist.get_rank()
    step = start_step
    window = Window(engine.device, step)
    while step < recipe.total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        micro_batches = hooks.batches(epoch, position)
        for _ in range(position, steps_per_epoch):
            rng = step_randomness(seed, rank, step)
            lr = _train_step(engine, recipe, micro_batches, rng, step, epoch, window)
            step += 1
            hooks.after_step(step)
            logged = step % cadence.log_every == 0 or step == recipe.total_steps or step == start_step + 1
            saved = step % cadence.checkpoint_every == 0 or step == recipe.total_steps
            if logged or saved:
                record, bad = window.read(step, epoch, engine, lr, throughput)
                if bad:
                    hooks.record(record)
                    return LoopEnd(step, "diverged", bad)
                if logged:
                    hooks.record(record)
            if saved:
                hooks.save(step, epoch)
            if step == recipe.total_steps:
                break
            stop = logged and _agreed(hooks.stop_requested(), engine.device)
            notice = hooks.notice(step)
            if (stop or notice) and not saved:
                bad = window.non_finite()  # a notice between log steps: nothing diverged may be saved
                if bad:
                    return LoopEnd(step, "diverged", bad)
                hooks.save(step, epoch)
            if stop:
                return LoopEnd(step, "stopped")
            if notice == "regroup":
                return LoopEnd(step, "regroup")
    return LoopEnd(step, "finished")


def non_finite(record: dict[str, Any]) -> str:
    """'' when the step's loss and gradient norm are finite; else what was not (`loss nan`)."""
    bad = [
        f"{name} {record[name]}"
        for name in ("loss", "grad_norm")
        if record.get(name) is not None and not math.isfinite(record[name])
    ]
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
    window: Window,
) -> float:
    """One optimizer step (0-based `step`) of `batch.accumulation` micro-batches, its sums kept in `window`
    on the device; returns the step's learning rate."""
    lr = set_step_lr(engine, recipe, step)
    # loss x images, correct, images; on the engine's device, where NCCL can reduce it
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)
    for _ in range(recipe.batch.accumulation):
        wait_started = time.perf_counter()
        batch = next(micro_batches, None)
        if batch is None:
            raise DataExhaustedError(
                f"rank {dist.get_rank()}: the data ran out during step {step + 1} (epoch {epoch}); the "
                "split holds fewer micro-batches than planned"
            )
        window.waited += time.perf_counter() - wait_started
        result = train_micro_batch(engine, *batch, recipe, rng)
        totals[0] += result.loss.detach().double() * result.images
        totals[1] += result.correct
        totals[2] += result.images
    dist.all_reduce(totals)
    window.add(totals, engine.get_global_grad_norm())
    return lr


class Window:
    """The steps since the host last read the device: the newest step's all-reduced sums and gradient
    norm, whether any step's loss or norm was not finite (a device flag), and the wall time and data wait
    since the last read, which turn into per-step rates when it is read."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.device = device
        self.restart(step)

    def restart(self, step: int) -> None:
        """An empty window after `step` (0-based count of the steps trained), timed from now."""
        self.first_step = step
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.totals: torch.Tensor | None = None
        self.grad_norm: Any = None
        self.started, self.waited = time.perf_counter(), 0.0

    def add(self, totals: torch.Tensor, grad_norm: Any) -> None:
        """Keep a step's sums; its loss or gradient norm not finite sets the flag (no read)."""
        self.totals, self.grad_norm = totals, grad_norm
        self.bad |= ~torch.isfinite(totals[0])
        if torch.is_tensor(grad_norm):
            self.bad |= ~torch.isfinite(grad_norm.to(self.device)).all()
        elif grad_norm is not None and not math.isfinite(grad_norm):
            self.bad.fill_(True)

    def non_finite(self) -> str:
        """Reads the flag: '' when every step since the last read was finite."""
        if not bool(self.bad.item()):
            return ""
        return f"a non-finite loss or gradient norm between steps {self.first_step + 1} and the last read"

    def read(
        self, step: int, epoch: int, engine: Any, lr: float, throughput: Throughput
    ) -> tuple[dict[str, Any], str]:
        """Read the device: the newest step's record (1-based `step`) with rates over the steps since the
        last read, and what was not finite ('' when all was); the window starts again."""
        if self.totals is None:
            raise RuntimeError(f"step {step}: no step was trained since the last read")
        loss_sum, correct, images = self.totals.tolist()
        grad_norm = float(self.grad_norm) if self.grad_norm is not None else None
        steps, seconds = step - self.first_step, time.perf_counter() - self.started
        record = step_record(
            step,
            epoch,
            loss_sum / images,
            correct / images,
            lr,
            grad_norm,
            engine,
            seconds / steps,
            self.waited / steps,
            throughput,
        )
        bad = non_finite(record) or self.non_finite()
        self.restart(step)
        return record, bad


def step_record(
    step: int,
    epoch: int,
    loss: float,
    accuracy: float,
    lr: float,
    grad_norm: float | None,
    engine: Any,
    step_seconds: float,
    waited: float,
    throughput: Throughput,
) -> dict[str, Any]:
    """The metrics of a finished step (1-based), as metrics.jsonl and TensorBoard keep them: the step's
    loss, accuracy and gradient norm, and rates averaged over the steps since the previous record."""
    images_per_s = throughput.images_per_step / step_seconds
    peak = throughput.peak_flops
    return {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "accuracy": accuracy,
        "lr": lr,
        "grad_norm": grad_norm,
        "images_per_s": images_per_s,
        "tokens_per_s": images_per_s * throughput.seq_len if throughput.seq_len else None,
        "mfu": throughput.flops_per_step / step_seconds / peak if peak else None,
        "step_s": step_seconds,
        "data_wait_s": waited,
        "peak_memory_gb": peak_memory_gb(engine.device),
        # DeepSpeed drops an optimizer step whose gradients overflowed, and says nothing: counted here.
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
    }


def peak_memory_gb(device: torch.device) -> float | None:
    """The most memory the device's allocator has held (GiB): CUDA only (no device read); None on CPUs."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
