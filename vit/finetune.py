"""The fine-tuning loop on one device, the paper's recipe by default (SGD momentum, no weight decay,
warmup + cosine, gradient clipping at 1): plain PyTorch, since one target is fine-tuned on one accelerator.

The caller brings a model already adapted to the target (new zero head, position embeddings resampled:
`vit.weights.load_pretrained`), an endless iterator of training batches and, optionally, a validation
score: the best-scoring weights are kept, so a run that overfits late still hands back its best point.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from vit.augment import random_hflip, soft_targets
from vit.evaluate import Batch
from vit.train import TrainSpec, make_optimizer, soft_cross_entropy

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
    spec: TrainSpec,
    *,
    device: torch.device,
    validate: Callable[[nn.Module], float] | None = None,
    validate_every: int | None = None,
    log_every: int = 10,
    on_record: Callable[[dict], None] | None = None,
) -> FinetuneOutcome:
    """Run `spec.total_steps` optimizer steps of `spec.grad_accum` micro-batches each.

    Every `validate_every` steps and at the last, `validate(model)` scores the weights; the best score's
    weights are returned (ties go to the later step). Each `log_every` steps a record (loss, accuracy, lr,
    gradient norm, images/s) goes to `on_record`.
    """
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter is trainable")
    optimizer = make_optimizer(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, spec.schedule())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16)
    config = model.config
    every = validate_every or max(1, spec.total_steps // 10)
    outcome = FinetuneOutcome(best_state={}, best_step=0, best_score=None)
    started = window_start = time.perf_counter()
    window_loss, window_correct, window_images = 0.0, 0, 0
    for step in range(1, spec.total_steps + 1):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(spec.grad_accum):
            patches, labels = next(batches)
            patches = torch.as_tensor(patches).to(device, non_blocking=True)
            labels = torch.as_tensor(labels).long().to(device, non_blocking=True)
            if spec.flip:
                patches = random_hflip(patches, config.patch_size, config.channels)
            targets = soft_targets(labels, config.num_classes, spec.label_smoothing)
            with autocast:
                logits = model(patches)
            loss = soft_cross_entropy(logits, targets) / spec.grad_accum
            loss.backward()
            window_loss += float(loss.detach()) * spec.grad_accum * labels.shape[0]
            window_correct += int((logits.detach().argmax(-1) == labels).sum())
            window_images += labels.shape[0]
        clip = spec.grad_clip if spec.grad_clip else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        validating = validate is not None and (step % every == 0 or step == spec.total_steps)
        if not (validating or step % log_every == 0 or step == spec.total_steps):
            continue
        elapsed = time.perf_counter() - window_start
        record = {
            "step": step,
            "loss": window_loss / window_images,
            "accuracy": window_correct / window_images,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": window_images / elapsed if elapsed > 0 else None,
        }
        if validate is not None and validating:
            record["val_top1"] = score = validate(model)
            if outcome.best_score is None or score >= outcome.best_score:
                outcome.best_score, outcome.best_step = score, step
                outcome.best_state = _cpu_copy(model)
        outcome.records.append(record)
        if on_record is not None:
            on_record(record)
        window_loss, window_correct, window_images = 0.0, 0, 0
        window_start = time.perf_counter()
    if validate is None:
        outcome.best_state, outcome.best_step = _cpu_copy(model), spec.total_steps
    outcome.seconds = time.perf_counter() - started
    return outcome


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
