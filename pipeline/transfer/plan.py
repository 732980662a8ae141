"""What a transfer run will do, checked on the driver target by target before any task starts.

A target that cannot be fine-tuned (unlabelled, a split missing, classes absent from the test split, a
patch geometry the checkpoint cannot take) gets an error naming it and is left out; the others go on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pipeline.config import FinetuneConfig
from pipeline.preprocess.manifest import manifest_classes, manifest_geometry, read_manifest
from pipeline.transfer.data import SplitReader
from vit.config import Architecture
from vit.patches import PatchGeometry, misfits
from vit.recipe import BatchSplit, Recipe

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

    @property
    def model_geometry(self) -> PatchGeometry:
        """The geometry the model sees: the stored one, or its centre/random crop at `image_size`."""
        return self.geometry if self.image_size is None else PatchGeometry(
            self.image_size, self.geometry.patch_size, self.geometry.channels
        )  # fmt: skip

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
        optimizer=config.optimizer, schedule=config.schedule, total_steps=config.steps, batch=batch,
        label_smoothing=config.label_smoothing, flip=config.flip, bf16=config.bf16 is True, crop=config.crop,
        input_size=input_size,
    )  # fmt: skip
