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

from vit.evaluate import Batch
from vit.recipe import Recipe
from vit.step import make_optimizer, set_lr, training_loss

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
) -> FinetuneOutcome:
    """Run `recipe.total_steps` optimizer steps of `recipe.grad_accum` micro-batches each.

    Every `validate_every` steps and at the last, `validate(model)` scores the weights; the best score's
    weights are returned (ties go to the later step). Each `log_every` steps a record (loss, accuracy, lr,
    gradient norm, images/s) goes to `on_record`.
    """
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter is trainable")
    optimizer = make_optimizer(model, recipe.optimizer, fused=device.type == "cuda")
    every = validate_every or max(1, recipe.total_steps // 10)
    outcome = FinetuneOutcome(best_state={}, best_step=0, best_score=None)
    window = _Window()
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for step in range(1, recipe.total_steps + 1):
        lr = recipe.lr_at(step - 1)
        set_lr(optimizer, lr)
        grad_norm = _step(model, optimizer, trainable, batches, recipe, rng, device, window)
        if not (math.isfinite(window.loss) and math.isfinite(grad_norm)):  # the window's sum holds any NaN
            raise FloatingPointError(
                f"fine-tuning diverged at step {step}: loss {window.loss}, gradient norm {grad_norm} "
                f"(lr {lr:g}); no weights of this run are kept. Lower optimizer.lr or check the weights"
            )
        validating = validate is not None and (step % every == 0 or step == recipe.total_steps)
        if not (validating or step % log_every == 0 or step == recipe.total_steps):
            continue
        record = window.record(step, lr, grad_norm)
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
    optimizer: torch.optim.Optimizer,
    trainable: list[nn.Parameter],
    batches: Iterator[Batch],
    recipe: Recipe,
    rng: np.random.Generator,
    device: torch.device,
    window: _Window,
) -> float:
    """One optimizer step: the recipe's training loss on `grad_accum` micro-batches, clipping, update.
    Returns the gradient norm before clipping."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for _ in range(recipe.grad_accum):
        patches, labels = next(batches)
        patches = torch.as_tensor(patches).to(device, non_blocking=True)
        labels = torch.as_tensor(labels).long().to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
            result = training_loss(model, patches, labels, recipe, rng)
        (result.loss / recipe.grad_accum).backward()
        window.add(float(result.loss.detach()), result.correct, result.images)
    clip = recipe.optimizer.grad_clip or float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
    optimizer.step()
    return grad_norm


class _Window:
    """Loss, accuracy and speed over the steps since the last record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.correct, self.images = 0.0, 0, 0
        self.started = time.perf_counter()

    def add(self, loss: float, correct: int, images: int) -> None:
        self.loss += loss * images
        self.correct += correct
        self.images += images

    def record(self, step: int, lr: float, grad_norm: float) -> dict:
        elapsed = time.perf_counter() - self.started
        record = {
            "step": step,
            "loss": self.loss / self.images,
            "accuracy": self.correct / self.images,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": self.images / elapsed if elapsed > 0 else None,
        }
        self.reset()
        return record


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
