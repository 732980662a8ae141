"""What a transfer run will do, checked on the driver target by target before any task starts.

A target that cannot be fine-tuned (unlabelled, a split missing, classes absent from the test split, a
patch geometry the checkpoint cannot take) gets an error naming it and is left out; the others go on.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import AnyModel, EvaluateConfig, FinetuneConfig
from pipeline.console import detail, say
from pipeline.preprocess.manifest import manifest_classes, manifest_geometry, read_manifest
from pipeline.storage import absolute, local_folder, resolve
from pipeline.transfer.data import VALIDATION_BYTES, SplitReader, holdout_sizes
from vit.config import Architecture
from vit.patches import PatchGeometry, misfits
from vit.recipe import BatchSplit, Recipe
from vit.weights import read_checkpoint

TRAIN_SPLIT, TEST_SPLIT = "train", "test"


class TargetError(ValueError):
    """A target dataset that cannot be fine-tuned or evaluated; the message starts with its name."""


@dataclass(frozen=True)
class TargetPlan:
    """A target dataset's preprocessed splits and what they hold."""

    name: str
    directory: str
    geometry: PatchGeometry
    classes: list[str]
    train_samples: int
    test_samples: int
    image_size: int | None = None  # what the model fine-tunes at (finetune.image_size); None: as stored
    class_counts: tuple[int, ...] = ()  # training images of each class

    @property
    def model_geometry(self) -> PatchGeometry:
        """The geometry the model sees: the stored one, or its centre/random crop at `image_size`."""
        return (
            self.geometry
            if self.image_size is None
            else PatchGeometry(self.image_size, self.geometry.patch_size, self.geometry.channels)
        )

    def describe(self) -> str:
        return (
            f"{self.name}: {self.train_samples:,} train / {self.test_samples:,} test images, "
            f"{len(self.classes)} classes, {self.geometry.describe()} ({self.directory})"
        )


def plan_target(name: str, directory: str, image_size: int | None = None) -> TargetPlan:
    """Read a target's manifest and labels; every problem is a TargetError naming the target."""
    try:
        target = _plan(name, directory)
        return cropped_to(target, image_size) if image_size is not None else target
    except TargetError:
        raise
    except (OSError, ValueError, KeyError) as error:
        raise TargetError(f"target {name!r}: {error}") from None


def _plan(name: str, directory: str) -> TargetPlan:
    manifest = read_manifest(directory)
    if manifest["config"].get("label_key") is None:
        raise TargetError(
            f"target {name!r}: {directory} was preprocessed without labels (label_key: none); "
            "fine-tuning and evaluation need a labelled train and test split"
        )
    splits = manifest["splits"]
    missing = [split for split in (TRAIN_SPLIT, TEST_SPLIT) if not splits.get(split, {}).get("samples")]
    if missing:
        held = ", ".join(f"{split!r} ({info['samples']})" for split, info in splits.items()) or "none"
        raise TargetError(
            f"target {name!r}: {directory} has no samples in split(s) {missing}; it holds {held}. A target "
            "needs train/ and test/ shard folders"
        )
    classes = manifest_classes(manifest, directory)
    train_labels = SplitReader(directory, TRAIN_SPLIT).labels()
    test_labels = SplitReader(directory, TEST_SPLIT).labels()
    for split, labels in ((TRAIN_SPLIT, train_labels), (TEST_SPLIT, test_labels)):
        absent = sorted(set(range(len(classes))) - set(np.unique(labels).tolist()))
        if absent:
            shown = ", ".join(classes[label] for label in absent[:10]) + (" ..." if len(absent) > 10 else "")
            raise TargetError(
                f"target {name!r}: {len(absent)} of {len(classes)} classes have no example in the {split} "
                f"split of {directory} ({shown}); per-class accuracy would be undefined. Rebuild the split "
                "so every class is in it"
            )
    return TargetPlan(
        name=name,
        directory=directory,
        geometry=manifest_geometry(manifest, directory),
        classes=classes,
        train_samples=len(train_labels),
        test_samples=len(test_labels),
        class_counts=tuple(np.bincount(train_labels, minlength=len(classes)).tolist()),
    )


def cropped_to(target: TargetPlan, image_size: int) -> TargetPlan:
    """The target seen at `image_size` (finetune.image_size), which must fit inside the stored images."""
    problems = misfits(target.geometry, image_size=image_size)
    if problems:
        raise TargetError(f"target {target.name!r}: finetune.{problems[0]} of {target.directory}")
    return dataclasses.replace(target, image_size=image_size)


def check_fits(target: TargetPlan, architecture: Architecture, source: str) -> None:
    """What the model's weights fix (a ViT: patch size and channels; a BiT: channels) the target must be
    preprocessed to match (the resolution may differ; a ViT's position embeddings are resampled)."""
    fixed = architecture.fixed_geometry
    problems = misfits(target.geometry, **{field: getattr(architecture, field) for field in fixed})
    if problems:
        wanted = ", ".join(f"{field} {getattr(architecture, field)}" for field in fixed)
        raise TargetError(
            f"target {target.name!r}: {target.directory} does not fit the model of {source}: "
            + "; ".join(problems)
            + f". Preprocess it with {wanted}"
        )


def check_validation(target: TargetPlan, finetune: FinetuneConfig) -> str | None:
    """The validation split a sweep's rate is chosen on (`holdout_sizes` of the training images), before
    any task: none at all is a TargetError; one too small to tell rates apart (one image, or one class of
    several) is a warning, returned. A single rate needs none."""
    rates, fraction = list(finetune.lr_sweep), finetune.val_fraction
    if len(rates) < 2:
        return None
    max_rows = VALIDATION_BYTES // target.geometry.sample_bytes
    sizes = holdout_sizes(np.array(target.class_counts, np.int64), fraction, max_rows)
    images, classes = int(sizes.sum()), int(np.count_nonzero(sizes))
    most = max(target.class_counts, default=0)
    train = f"{target.train_samples:,} training images (at most {most} of a class)"
    if images == 0:
        raise TargetError(
            f"target {target.name!r}: lr_sweep {rates} is chosen on a validation split held out of train, "
            f"and its {train} leave none at val_fraction {fraction:g} (a class gives one only when it has "
            "two or more). Give each class two or more training images, or fine-tune at one rate "
            "(optimizer.lr without lr_sweep)"
        )
    if images < 2 or (classes < 2 and len(target.classes) > 1):
        return (
            f"target {target.name!r}: the validation split lr_sweep {rates} is chosen on holds {images} "
            f"image(s) of {classes} class(es) (val_fraction {fraction:g} of {train}), too few to tell the "
            "rates apart (a tie goes to the lowest rate). Give each class two or more training images, "
            "or fine-tune at one rate"
        )
    return None


def target_architecture(architecture: Architecture, target: TargetPlan) -> Architecture:
    """The model fine-tuned on a target: its resolution and classes (a ViT without pre-logits layer)."""
    geometry = target.model_geometry
    return architecture.for_target(
        image_size=geometry.image_size, patch_size=geometry.patch_size, num_classes=len(target.classes)
    )


def finetune_recipe(config: FinetuneConfig, input_size: int | None = None) -> Recipe:
    """The fine-tuning recipe (no mixup) on images stored at `input_size`, at `optimizer.lr` (one member of
    the sweep: `FinetuneConfig.at_rate`); `bf16: auto` is decided in the task, which sees the device."""
    batch = BatchSplit(config.batch_size, config.micro_batch_size or config.batch_size)
    return Recipe(
        optimizer=config.optimizer,
        schedule=config.schedule,
        total_steps=config.steps,
        batch=batch,
        label_smoothing=config.label_smoothing,
        flip=config.flip,
        bf16=config.bf16 is True,
        crop=config.crop,
        input_size=input_size,
    )


# --- the command's plan: every task, worked out before Ray -------------------------------------------


@dataclass(frozen=True)
class TransferTask:
    """One task: a (target, mode) at one learning rate of the sweep (None: evaluating alone), with the
    section at that rate and the recipe it trains by."""

    target: TargetPlan
    mode: str
    architecture: Architecture
    lr: float | None
    finetune: FinetuneConfig
    recipe: Recipe
    probe: bool = True  # the first member of a sweep also probes the starting weights few-shot


@dataclass(frozen=True)
class TransferPlan:
    """A fine-tune (or, `train` false, evaluation) command worked out before any task starts: the tasks of
    the targets that can run, a failure for each that cannot, and what the results record."""

    tasks: list[TransferTask]
    failures: list[dict[str, Any]]
    finetune: FinetuneConfig
    evaluate: EvaluateConfig | None
    targets: dict[str, str]
    out: str
    weights: str | None
    train: bool

    def groups(self) -> list[tuple[TargetPlan, str]]:
        """Each (target, mode) once, in task order: a folder and a chosen result each."""
        seen: dict[tuple[str, str], tuple[TargetPlan, str]] = {}
        for task in self.tasks:
            seen.setdefault((task.target.name, task.mode), (task.target, task.mode))
        return list(seen.values())

    def needs(self) -> dict[str, float]:
        """What one task takes of a node."""
        return {"CPU": self.finetune.cpus_per_task, "GPU": self.finetune.gpus_per_task}

    def task_at(self, target: str, mode: str, lr: float) -> TransferTask:
        """(target, mode)'s member at `lr`, a rate the sweep does not list (an extension of its grid):
        planned as the listed ones (so its run key is what a listed rate's would be), with no few-shot
        probe (the lowest listed rate's task runs it)."""
        planned = next(task for task in self.tasks if (task.target.name, task.mode) == (target, mode))
        return _task(planned.target, mode, planned.architecture, self.finetune, lr, probe=False)

    def settings(self, name: str) -> dict[str, Any]:
        """The command's settings as results.json records them."""
        evaluate = self.evaluate.model_dump(mode="json") if self.evaluate else None
        return {
            "name": name,
            "weights": self.weights,
            "train": self.train,
            "finetune": self.finetune.model_dump(mode="json"),
            "evaluate": evaluate,
            "targets": dict(self.targets),
        }


def plan_transfer(
    finetune: FinetuneConfig,
    evaluate: EvaluateConfig | None,
    targets: dict[str, str],
    *,
    out: str,
    weights: str | None = None,
    model: AnyModel | None = None,
    train: bool = True,
) -> TransferPlan:
    """Every task of fine-tuning (or only evaluating) every target in every mode, into `out`.

    `weights` are the pretrained weights (needed by mode `pretrained`); `model` describes the model that
    mode `scratch` builds when there are no weights to take the architecture from."""
    # Tasks may run on other machines, in other directories: local paths go to them absolute.
    out, weights = absolute(out), absolute(weights) if weights is not None else None
    targets = {name: absolute(directory) for name, directory in targets.items()}
    modes = finetune.modes if train else ("pretrained",)
    if "pretrained" in modes and weights is None:
        raise ValueError("transfer: mode 'pretrained' needs weights (finetune.weights or --weights)")
    if weights is not None and _inside(weights, out):
        raise ValueError(
            f"transfer: the weights {weights} lie inside the output folder {out}; choose another --out"
        )
    architecture = read_architecture(weights) if weights is not None else None
    if architecture is None and model is None:
        raise ValueError("transfer: no weights and no model config to build the scratch model from")
    runs, failures = plan_runs(
        targets,
        weights=weights,
        architecture=architecture,
        model=model,
        modes=modes,
        image_size=finetune.image_size,
        sweep=finetune if train else None,
    )
    rates = finetune.lr_sweep if train else (None,)
    tasks = [
        _task(target, mode, fitted, finetune, lr, probe=index == 0)
        for target, mode, fitted in runs
        for index, lr in enumerate(rates)
    ]
    return TransferPlan(tasks, failures, finetune, evaluate, targets, out, weights, train)


def _task(
    target: TargetPlan,
    mode: str,
    architecture: Architecture,
    finetune: FinetuneConfig,
    lr: float | None,
    *,
    probe: bool,
) -> TransferTask:
    section = finetune.at_rate(lr) if lr is not None else finetune
    recipe = finetune_recipe(section, target.geometry.image_size)
    return TransferTask(target, mode, architecture, lr, section, recipe, probe)


def read_architecture(weights: str) -> Architecture:
    """The architecture of a vitpipe or HF weights folder (path or URL); errors name the folder."""
    with tempfile.TemporaryDirectory(prefix="vitpipe-weights-") as scratch:
        return read_checkpoint(local_folder(weights, Path(scratch) / "weights")).config


def plan_runs(
    targets: dict[str, str],
    *,
    weights: str | None,
    architecture: Architecture | None,
    model: AnyModel | None,
    modes: tuple[str, ...],
    image_size: int | None = None,
    sweep: FinetuneConfig | None = None,
) -> tuple[list[tuple[TargetPlan, str, Architecture]], list[dict[str, Any]]]:
    """(target, mode, architecture) of every run that can start, and a failure for each that cannot.

    The architecture is the weights' (`architecture`), else the one `model` describes for the target;
    `sweep`, when fine-tuning, the section whose rates are chosen on each target's validation split.
    """
    runs, failures = [], []
    for name, directory in targets.items():
        try:
            target = plan_target(name, directory, image_size)
            fitted = architecture if architecture is not None else _model_for(model, target)
            check_fits(target, fitted, weights or "the model config")
            warning = check_validation(target, sweep) if sweep is not None else None
        except TargetError as error:
            failures.extend({"target": name, "mode": mode, "error": str(error)} for mode in modes)
            say(f"transfer: skipping {error}", err=True)
            continue
        detail(f"transfer: {target.describe()}")
        if warning:
            say(f"transfer: warning: {warning}", err=True)
        for mode in modes:
            if mode == "pretrained":
                runs.append((target, mode, fitted))  # the checkpoint's own, adapted in the task
            else:
                runs.append((target, mode, target_architecture(fitted, target)))
    return runs, failures


def _model_for(model: AnyModel | None, target: TargetPlan) -> Architecture:
    if model is None:
        raise TargetError(f"target {target.name!r}: no weights and no model config to build a model from")
    try:
        return model.architecture(
            image_size=target.model_geometry.image_size,
            channels=model.channels or target.geometry.channels,
            num_classes=len(target.classes),
            patch_size=target.geometry.patch_size,
        )
    except ValueError as error:
        raise TargetError(f"target {target.name!r}: the model config does not fit it: {error}") from None


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it (local paths resolved; URLs compared as written)."""

    def scheme(location: str) -> str:
        return location.split("://", 1)[0] if "://" in location else ""

    inner, outer = resolve(path)[1].rstrip("/") + "/", resolve(folder)[1].rstrip("/") + "/"
    return scheme(path) == scheme(folder) and inner.startswith(outer)
