"""One target dataset in one mode at one learning rate, run as one Ray task: the few-shot probe of the
starting weights (by one task of the sweep), fine-tuning with a validation hold-out, the test evaluation
of the best weights, and their export.

Everything the task writes goes to its own folder, `OUT/TARGET/MODE/lr-RATE/` (`OUT/TARGET/MODE/` when it
only evaluates); `result.json` is written last, so a folder that has one is complete. A task that dies is
run again by Ray from the start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.console import detail
from pipeline.metrics import MetricsLog, ProgressLine
from pipeline.ray_session import ray_task_device
from pipeline.storage import local_folder, publish_folder
from pipeline.tracking import OFF, StepLogger, TrackingTarget, end, log_artifacts
from pipeline.transfer.data import VALIDATION_BYTES, SplitReader, holdout
from pipeline.transfer.plan import TEST_SPLIT, TRAIN_SPLIT, TargetPlan, target_architecture
from pipeline.transfer.report import plot_confusion
from vit.build import build_model
from vit.config import Architecture
from vit.device import enable_tf32
from vit.evaluate import Classification, evaluate_classifier, extract_features
from vit.fewshot import fewshot_accuracy, sample_shots
from vit.finetune import finetune, freeze_backbone
from vit.hf import HF_DIR
from vit.objective import use_bf16
from vit.recipe import Recipe, Speed
from vit.weights import (
    backbone_digest,
    export_hf_folder,
    load_pretrained,
    read_checkpoint,
    save_pretrained,
    state_digest,
)

if TYPE_CHECKING:  # the task receives these sections as values; it never loads or checks a config
    from pipeline.config import EvaluateConfig, FinetuneConfig

RESULT_FILE = "result.json"
RUN_KEY = "run_key"  # in a member's result.json: the key of the settings it was trained with
CONFUSION_PLOT = "confusion.png"
MODEL_DIR = "model"


@dataclass(frozen=True)
class TaskSettings:
    """What one task receives from the transfer plan: the target, the model, the finetune section at the
    task's rate and the recipe it trains by, the evaluation settings, and where to write."""

    target: TargetPlan
    mode: str  # "pretrained" or "scratch"
    weights: str | None
    architecture: Architecture  # of the scratch model, or the weights' own
    train: bool  # fine-tune, or only evaluate the weights as they are
    finetune: FinetuneConfig  # at the task's rate: the options besides the recipe (seed, validation, ...)
    recipe: Recipe
    evaluate: EvaluateConfig | None
    out: str
    tracking: TrackingTarget = OFF  # this task's tracking run
    probe: bool = True  # run the few-shot probe of the starting weights (one task of a sweep does)
    run_key: str | None = None  # what defines this one run (`reuse.run_key`), kept in its result.json

    @property
    def label(self) -> str:
        """`digits/pretrained lr 0.003`: how progress lines and logs name the task."""
        rate = f" lr {self.recipe.optimizer.lr:g}" if self.train else ""
        return f"{self.target.name}/{self.mode}{rate}"

    @property
    def eval_batch_size(self) -> int:
        return self.evaluate.batch_size if self.evaluate else self.recipe.batch.micro_batch


def transfer_task(settings: TaskSettings) -> dict[str, Any]:
    """The Ray task's body."""
    with tempfile.TemporaryDirectory(prefix="vitpipe-weights-") as scratch:
        if settings.weights is not None:  # a URL is downloaded once per task
            local = local_folder(settings.weights, Path(scratch) / "weights")
            settings = dataclasses.replace(settings, weights=str(local))
        return _run(settings)


def _run(settings: TaskSettings) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(max(1, int(settings.finetune.cpus_per_task)))
    torch.manual_seed(settings.finetune.seed)
    target, mode = settings.target, settings.mode
    label = settings.label
    device = ray_task_device()
    bf16 = use_bf16(settings.finetune.bf16, device)
    tf32 = enable_tf32(device)  # for the float32 matmuls left outside bf16 (all of them without it)
    metrics = MetricsLog(settings.out, settings.tracking)
    metrics.event("started", target=target.name, mode=mode, device=str(device), pid=os.getpid())
    metrics.sync()
    detail(f"{label}: started on {device} (pid {os.getpid()})")

    train_reader = SplitReader(target.directory, TRAIN_SPLIT)
    test_reader = SplitReader(target.directory, TEST_SPLIT)
    num_classes = len(target.classes)

    probe_model = _starting_model(settings, keep_pre_logits=True).to(device)
    fewshot = None
    if settings.evaluate is not None and settings.probe:
        fewshot = fewshot_table(
            probe_model, train_reader, test_reader, num_classes, settings, device, bf16=bf16
        )
        detail(f"{label}: few-shot linear " + _describe_fewshot(fewshot))

    result: dict[str, Any] = {
        "target": target.name,
        "mode": mode,
        "device": str(device),
        "bf16": bf16,
        "tf32": tf32,
    }
    if settings.run_key is not None:
        result[RUN_KEY] = settings.run_key
    model = probe_model
    if settings.train:
        del probe_model
        model = _starting_model(settings, keep_pre_logits=False)
        result["start_weights"] = state_digest(model)  # shows which weights fine-tuning started from
        result["start_backbone"] = backbone_digest(model)  # ... and which pretraining step's they are
        result |= _finetune(model, train_reader, settings, device, bf16, metrics, label)
    mismatch = None if settings.train else _head_mismatch(settings.weights, target.classes)
    if mismatch is None:
        test_batches = test_reader.batches(settings.eval_batch_size)
        test = evaluate_classifier(model, test_batches, num_classes, device, bf16=bf16)
        result |= {
            "top1": test.top1,
            "top5": test.top5,
            "top_k": test.top_k,
            "test_samples": test.samples,
            "per_class": dict(zip(target.classes, test.per_class, strict=True)),
        }
        detail(f"{label}: test top-1 {test.top1:.4f}, top-{test.top_k} {test.top5:.4f}")
    else:
        test = None
        result["note"] = f"{mismatch}: no test classification without fine-tuning"
    result["fewshot"] = fewshot
    result["seconds"] = time.perf_counter() - started
    _publish(model, result, test, settings)
    metrics.event("finished", seconds=result["seconds"])
    metrics.close()
    _track_result(settings.tracking, result)
    return result


def _track_result(tracking: TrackingTarget, result: dict[str, Any]) -> None:
    """The task's test and few-shot accuracies into its tracking run, and its confusion matrix."""
    if not tracking.enabled:
        return
    scores = {"test_top1": result.get("top1"), "test_top5": result.get("top5")}
    for shots, entry in (result.get("fewshot") or {}).items():
        scores[f"fewshot_{shots}shot"] = entry.get("mean")
    logger = StepLogger(tracking)
    logger.log({"step": result.get("steps", 0), **{k: v for k, v in scores.items() if v is not None}})
    logger.close()
    log_artifacts(tracking, [result.get("confusion_plot")])
    end(tracking, "FINISHED")


def _head_mismatch(weights: str, classes: list[str]) -> str | None:
    """Why the head of weights evaluated as they are cannot classify the target, or None when it can: the
    same classes in the same order (by name when the weights name their classes, else by count)."""
    checkpoint = read_checkpoint(weights)
    heads = checkpoint.config.num_classes
    if heads != len(classes):
        return f"the weights have a {heads}-class head, the target {len(classes)} classes"
    if checkpoint.labels is not None and list(checkpoint.labels) != list(classes):
        return f"the weights' classes {checkpoint.labels[:3]}... are not the target's {classes[:3]}..."
    return None


def _starting_model(settings: TaskSettings, *, keep_pre_logits: bool) -> torch.nn.Module:
    """Pretrained weights adapted to the target (resolution, a new zero head), or a fresh random init.

    `keep_pre_logits` keeps a checkpoint's pre-logits layer: the few-shot probe reads the representation
    the model was pretrained with; fine-tuning drops the layer, as the paper does.
    """
    if settings.mode == "scratch":
        torch.manual_seed(settings.finetune.seed)
        return build_model(settings.architecture)
    geometry = settings.target.model_geometry
    input_changes = {"image_size": geometry.image_size, "patch_size": geometry.patch_size}
    if keep_pre_logits:
        adaptable = settings.architecture.adaptable
        return load_pretrained(settings.weights, **{k: v for k, v in input_changes.items() if k in adaptable})
    fitted = target_architecture(settings.architecture, settings.target)
    return load_pretrained(settings.weights, **fitted.to_dict())


def fewshot_table(
    model: torch.nn.Module,
    train_reader: SplitReader,
    test_reader: SplitReader,
    num_classes: int,
    settings: TaskSettings,
    device: torch.device,
    *,
    bf16: bool = False,
) -> dict[str, dict[str, Any]]:
    """Few-shot linear accuracy for every shot count, over several seeds: {"10": {mean, std, accuracies}}.

    The features of every image any draw needs are extracted once (under bf16 autocast when `bf16`); a
    shot count that some class has too few training images for is reported as skipped, with the reason.
    """
    options = settings.evaluate
    if options is None:
        raise ValueError("few-shot evaluation needs an evaluate section")
    labels = train_reader.labels()
    seeds = [settings.finetune.seed + offset for offset in range(options.seeds)]
    draws: dict[tuple[int, int], np.ndarray] = {}
    skipped: dict[int, str] = {}
    for shots in options.shots:
        try:
            for seed in seeds:
                draws[shots, seed] = sample_shots(labels, num_classes, shots, seed)
        except ValueError as error:
            skipped[shots] = str(error)
    batch = settings.eval_batch_size
    test_features, test_labels = extract_features(model, test_reader.batches(batch), device, bf16=bf16)
    needed = np.unique(np.concatenate(list(draws.values()))) if draws else np.empty(0, np.int64)
    table: dict[str, dict[str, Any]] = {str(shots): {"skipped": reason} for shots, reason in skipped.items()}
    if len(needed):
        features, _ = extract_features(model, train_reader.take(needed, batch), device, bf16=bf16)
        row_of = {int(index): row for row, index in enumerate(needed)}
        for shots in options.shots:
            if shots in skipped:
                continue
            accuracies = []
            for seed in seeds:
                drawn = draws[shots, seed]
                rows = torch.tensor([row_of[int(index)] for index in drawn])
                probe_data = (features[rows], torch.as_tensor(labels[drawn]), test_features, test_labels)
                accuracies.append(fewshot_accuracy(*probe_data, num_classes, options.l2_regularization))
            mean, std = float(np.mean(accuracies)), float(np.std(accuracies))
            table[str(shots)] = {"mean": mean, "std": std, "accuracies": accuracies}
    return {key: table[key] for key in sorted(table, key=int)}


def _describe_fewshot(table: dict[str, dict[str, Any]]) -> str:
    return ", ".join(
        f"{shots}-shot {entry['mean']:.3f}±{entry['std']:.3f}" if "mean" in entry else f"{shots}-shot skipped"
        for shots, entry in table.items()
    )


def _finetune(
    model: torch.nn.Module,
    reader: SplitReader,
    settings: TaskSettings,
    device: torch.device,
    bf16: bool,
    metrics: MetricsLog,
    label: str,
) -> dict[str, Any]:
    """Fine-tune in place and load the best weights back; returns what the result records of it."""
    config = settings.finetune
    recipe = dataclasses.replace(settings.recipe, bf16=bf16)
    trainable = freeze_backbone(model) if config.freeze_backbone else None
    labels = reader.labels()
    max_rows = VALIDATION_BYTES // reader.geometry.sample_bytes
    held_out = holdout(labels, config.val_fraction, config.seed, max_rows)
    validate = _validation(
        reader, held_out, len(settings.target.classes), settings.eval_batch_size, device, bf16
    )
    compiled = Speed(compile=config.compile).compiles(device.type)
    progress = ProgressLine(recipe.total_steps, 0, label=label)

    def on_record(record: dict[str, Any]) -> None:
        metrics.write(record)
        progress.report(record)

    batches = reader.training_batches(recipe.batch.micro_batch, config.seed, exclude=held_out)
    outcome = finetune(
        model,
        batches,
        recipe,
        device=device,
        validate=validate,
        validate_every=config.validate_every,
        log_every=config.log_every,
        on_record=on_record,
        seed=config.seed,
        compile_forward=compiled,
    )
    metrics.sync()
    model.load_state_dict(outcome.best_state)
    images_per_s = [r["images_per_s"] for r in outcome.records if r.get("images_per_s")]
    return {
        "lr": config.optimizer.lr,
        "compiled": compiled,
        "steps": recipe.total_steps,
        "best_step": outcome.best_step,
        "val_top1": outcome.best_score,
        "val_samples": len(held_out),
        "val_classes": len(np.unique(labels[held_out])),
        "train_samples": len(labels) - len(held_out),
        "trainable_parameters": trainable or sum(p.numel() for p in model.parameters() if p.requires_grad),
        "finetune_seconds": outcome.seconds,
        "images_per_s": float(np.median(images_per_s)) if images_per_s else None,
    }


def _validation(
    reader: SplitReader, held_out: np.ndarray, num_classes: int, batch: int, device: torch.device, bf16: bool
) -> Callable[[torch.nn.Module], float] | None:
    """Top-1 on the hold-out (read once, kept in memory), or None when there is no hold-out; under bf16
    autocast when `bf16`, as the training steps are."""
    if not len(held_out):
        return None
    val_patches, val_labels = map(np.concatenate, zip(*reader.take(held_out, len(held_out)), strict=True))

    def validate(candidate: torch.nn.Module) -> float:
        batches = (
            (val_patches[i : i + batch], val_labels[i : i + batch]) for i in range(0, len(val_labels), batch)
        )
        return evaluate_classifier(candidate, batches, num_classes, device, bf16=bf16).top1

    return validate


def _publish(
    model: torch.nn.Module, result: dict[str, Any], test: Classification | None, settings: TaskSettings
) -> None:
    """Weights (vitpipe, and HF for a ViT), confusion matrix and its picture, then result.json: into OUT."""
    classes = settings.target.classes
    labels = classes if model.config.num_classes == len(classes) else None
    out = settings.out
    model.to("cpu")
    with tempfile.TemporaryDirectory(prefix="vitpipe-transfer-") as scratch:
        staged = Path(scratch) / "staged"
        staged.mkdir()
        if settings.train:
            save_pretrained(model, staged / MODEL_DIR, labels=labels)
            export_hf_folder(model, staged / HF_DIR, labels=labels)
            result["weights"] = f"{out.rstrip('/')}/{MODEL_DIR}"
        if test is not None:
            title = f"{result['target']} / {result['mode']}: test top-1 {test.top1:.3f}"
            plot_confusion(test.confusion, classes, title, staged / CONFUSION_PLOT)
            (staged / "confusion.json").write_text(json.dumps(test.confusion.tolist()) + "\n")
            result["confusion_plot"] = f"{out.rstrip('/')}/{CONFUSION_PLOT}"
        publish_folder(staged, out)
        finished = Path(scratch) / "finished"
        finished.mkdir()
        (finished / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        publish_folder(finished, out)
