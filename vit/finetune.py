"""The fine-tuning loop on one device, the paper's recipe by default (SGD momentum, no weight decay,
warmup + cosine, gradient clipping at 1): plain PyTorch, since one target is fine-tuned on one accelerator.

The caller brings a model already adapted to the target (new zero head, position embeddings resampled:
`vit.weights.load_pretrained`), an endless iterator of training batches and, optionally, a validation
score: the best-scoring weights are kept, so a run that overfits late still hands back its best point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vit.device import DeviceBatch, autocast, prefetch_to_device
from vit.evaluate import Batch
from vit.objective import StepLoss, make_optimizer, set_lr, training_loss
from vit.recipe import Recipe

HEAD_PREFIX = "head."


def freeze_backbone(model: nn.Module) -> int:
    """Train only the classification head (a linear probe); returns how many parameters still train."""
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(HEAD_PREFIX))
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable


@dataclass
class FinetuneOutcome:
    """What a fine-tuning run hands back: the best weights (CPU copies) and when they were seen."""

    best_state: dict[str, torch.Tensor]
    best_step: int
    best_score: float | None  # None when there was no validation score: the final weights are kept
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def finetune(
    model: nn.Module,
    batches: Iterator[Batch],
    recipe: Recipe,
    *,
    device: torch.device,
    validate: Callable[[nn.Module], float] | None = None,
    validate_every: int | None = None,
    log_every: int = 10,
    on_record: Callable[[dict], None] | None = None,
    seed: int = 0,
    compile_forward: bool = False,
) -> FinetuneOutcome:
    """Run `recipe.total_steps` optimizer steps of `recipe.batch.accumulation` micro-batches each.

    Every `validate_every` steps and at the last, `validate(model)` scores the weights; the best score's
    weights are returned (ties go to the later step). Each `log_every` steps a record (loss, accuracy, lr,
    gradient norm, images/s) goes to `on_record`. Only these steps read values back from the device (and
    check that the run has not diverged): the steps between never wait for it. `compile_forward` trains
    through `torch.compile` of the model's forward.
    """
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter is trainable")
    optimizer = make_optimizer(model, recipe.optimizer)
    # The compiled forward is a function of the module's own parameters: the module itself stays plain for
    # validation, state_dict and export.
    forward = torch.compile(model.forward) if compile_forward else model
    on_device = prefetch_to_device(batches, device)
    every = validate_every or max(1, recipe.total_steps // 10)
    outcome = FinetuneOutcome(best_state={}, best_step=0, best_score=None)
    window = _Window(device)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for step in range(1, recipe.total_steps + 1):
        lr = recipe.lr_at(step - 1)
        set_lr(optimizer, lr)
        _step(model, forward, optimizer, trainable, on_device, recipe, rng, window)
        validating = validate is not None and (step % every == 0 or step == recipe.total_steps)
        if not (validating or step % log_every == 0 or step == recipe.total_steps):
            continue
        first = window.first_step
        record, finite = window.record(step, lr)
        if not finite:
            steps = f"at step {step}" if first == step else f"in steps {first}-{step}"
            raise FloatingPointError(
                f"fine-tuning diverged {steps}: loss {record['loss']}, gradient norm {record['grad_norm']} "
                f"(lr {lr:g}); no weights of this run are kept. Lower optimizer.lr or check the weights"
            )
        if validate is not None and validating:
            record["val_top1"] = score = validate(model)
            if outcome.best_score is None or score >= outcome.best_score:
                outcome.best_score, outcome.best_step = score, step
                outcome.best_state = _cpu_copy(model)
        outcome.records.append(record)
        if on_record is not None:
            on_record(record)
    if validate is None:
        outcome.best_state, outcome.best_step = _cpu_copy(model), recipe.total_steps
    outcome.seconds = time.perf_counter() - started
    return outcome


def _step(
    model: nn.Module,
    forward: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    trainable: list[nn.Parameter],
    batches: Iterator[DeviceBatch],
    recipe: Recipe,
    rng: np.random.Generator,
    window: _Window,
) -> None:
    """One optimizer step: the recipe's training loss on its `batch.accumulation` micro-batches, clipping,
    update; its loss, hits and gradient norm (before clipping) go into the window, not leaving the device."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for _ in range(recipe.batch.accumulation):
        patches, labels = next(batches)
        with autocast(patches.device, recipe.bf16):
            result = training_loss(model, patches, labels, recipe, rng, forward=forward)
        (result.loss / recipe.batch.accumulation).backward()
        window.add(result)
    clip = recipe.optimizer.grad_clip or float("inf")
    window.end_step(torch.nn.utils.clip_grad_norm_(trainable, clip))
    optimizer.step()


class _Window:
    """Loss, accuracy, gradient norm and speed over the steps since the last record. The sums are kept on
    the device and read in one transfer by `record`: a read waits for every step queued before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_step = 1
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)  # summed over images
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.grad_norms = torch.zeros((), device=self.device)  # summed: NaN or inf in any step stays there
        self.grad_norm = torch.zeros((), device=self.device)  # the last step's
        self.images = 0
        self.started = time.perf_counter()

    def add(self, result: StepLoss) -> None:
        self.loss += result.loss.detach() * result.images
        self.correct += result.correct
        self.images += result.images

    def end_step(self, grad_norm: torch.Tensor) -> None:
        self.grad_norms += grad_norm
        self.grad_norm = grad_norm

    def record(self, step: int, lr: float) -> tuple[dict, bool]:
        """The record of the window ending at `step`, and whether its losses and norms were all finite."""
        sums = (self.loss, self.correct, self.grad_norms, self.grad_norm)
        loss, correct, grad_norms, grad_norm = torch.stack([value.double() for value in sums]).tolist()
        elapsed = time.perf_counter() - self.started
        record = {
            "step": step,
            "loss": loss / self.images,
            "accuracy": correct / self.images,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": self.images / elapsed if elapsed > 0 else None,
        }
        self.first_step = step + 1
        self.reset()
        return record, math.isfinite(loss) and math.isfinite(grad_norms)


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
