"""The sections of what follows pretraining: fine-tuning (the paper's protocol and sweep), few-shot
evaluation and the analyses."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import (
    BatchSize,
    CropSection,
    Flag,
    Float,
    NonNegativeFloat,
    NonNegativeInt,
    OptimizerSection,
    PositiveFloat,
    PositiveInt,
    ScheduleSection,
    Section,
    StepBudget,
    UnitFraction,
)
from vit.recipe import Optimizer, Schedule

# How fine-tuning runs, not what it computes: left out of the step's cache key (a change reuses results).
FINETUNE_OPERATIONAL = frozenset({"compile"})
PAPER_FINETUNE_LRS = (0.001, 0.003, 0.01, 0.03)  # the ViT paper's fine-tuning sweep (its Appendix B.1.1)


class FinetuneConfig(Section):
    """Fine-tuning on target datasets, the paper's protocol by default (SGD momentum, no decay, warmup +
    cosine, clipping at 1, the learning rate chosen from a sweep on a validation split of the target's
    training data); one Ray task per target, mode and learning rate, all submitted at once."""

    # Preprocessed patch directories (paths or URLs), or in a job the names of preprocess entries.
    targets: list[str] = Field(min_length=1)
    # Pretrained weights: a vitpipe or HF folder. In a job with a pretrain section: that run's export.
    weights: str | None = None
    modes: tuple[Literal["pretrained", "scratch"], ...] = Field(("pretrained", "scratch"), min_length=1)
    steps: StepBudget = 500
    batch_size: BatchSize = 512
    micro_batch_size: BatchSize | None = None  # gradient accumulation when it is below batch_size
    optimizer: OptimizerSection = Optimizer(name="sgd", lr=0.03, weight_decay=0.0)
    # The learning rates fine-tuned at, each its own task; the one of best validation top-1 is reported
    # (its test accuracy, never the test split's best). Default: the paper's sweep, or the one rate of
    # `optimizer.lr` when the job sets it. Each task trains at its own rate, whatever `optimizer.lr` says
    # (set alone, `lr_sweep` makes it its largest rate).
    lr_sweep: tuple[PositiveFloat, ...] = Field(PAPER_FINETUNE_LRS, min_length=1)
    # How many times a rate chosen at the lowest or highest rate of the sweep adds the next rate beyond
    # that edge (by the grid's own ratio there: [0.01, 0.03] chosen at 0.03 adds 0.09) and chooses again;
    # 0: never (a choice at an edge is then noted in the results).
    lr_extend: NonNegativeInt = 0
    schedule: ScheduleSection = Schedule(warmup_steps=50)
    label_smoothing: UnitFraction = 0.0
    # As pretrain's: the resolution fine-tuned at (default: the target's stored one) and the random crop;
    # validation and test take the centre.
    image_size: PositiveInt | None = None
    crop: CropSection | None = None
    flip: Flag = True
    freeze_backbone: Flag = False  # train the head alone: a linear probe
    val_fraction: Annotated[Float, Field(ge=0, lt=1)] = 0.1  # of train, held out to pick the best weights
    validate_every: PositiveInt | None = None  # default: ten validations per run
    log_every: PositiveInt = 10
    bf16: Literal["auto"] | Flag = "auto"
    # torch.compile of the training forward: a slower start, faster steps. auto: on CUDA; on CPUs the
    # compile costs more than a fine-tune's steps gain.
    compile: Literal["auto"] | Flag = "auto"
    cpus_per_task: PositiveFloat = 1.0
    gpus_per_task: NonNegativeFloat = 0.0
    max_retries: NonNegativeInt = 2  # a task whose worker process dies is run again this many times
    seed: NonNegativeInt = 0

    @model_validator(mode="before")
    @classmethod
    def _one_lr_or_a_sweep(cls, data: Any) -> Any:
        """`optimizer.lr` alone is a sweep of that one rate. Beside `lr_sweep` it must be one of its rates
        (a saved config holds both); any other is a contradiction. `lr_sweep` alone sets `optimizer.lr`
        to its largest rate, so the resolved section (`vitpipe validate`, results.json) loads back."""
        if not isinstance(data, dict):
            return data
        optimizer = data.get("optimizer")
        lr = optimizer.get("lr") if isinstance(optimizer, dict) else getattr(optimizer, "lr", None)
        sweep = data.get("lr_sweep")
        if lr is None:
            return _with_sweep_lr(data, optimizer, sweep)
        if sweep is None:
            return {**data, "lr_sweep": [lr]}
        if isinstance(sweep, (list, tuple)) and lr not in sweep:
            raise ValueError(
                f"optimizer.lr {lr} is not in lr_sweep {list(sweep)}: set one rate (optimizer.lr) or the "
                "rates to choose from on the validation split (lr_sweep)"
            )
        return data

    @field_validator("lr_sweep")
    @classmethod
    def _sorted_rates(cls, rates: tuple[float, ...]) -> tuple[float, ...]:
        if len(set(rates)) != len(rates):
            raise ValueError(f"a rate is listed twice: {list(rates)}")
        return tuple(sorted(rates))

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, targets: list[str]) -> list[str]:
        repeated = sorted({target for target in targets if targets.count(target) > 1})
        if repeated:
            raise ValueError(f"targets listed twice: {repeated}")
        return targets

    @field_validator("modes")
    @classmethod
    def _distinct_modes(cls, modes: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(modes)) != len(modes):
            raise ValueError(f"a mode is listed twice: {list(modes)}")
        return modes

    @model_validator(mode="after")
    def _batch_splits(self) -> FinetuneConfig:
        if len(self.lr_sweep) > 1 and self.val_fraction == 0:
            raise ValueError(
                f"lr_sweep {list(self.lr_sweep)} is chosen from on a validation split: set val_fraction > 0 "
                "(the paper holds out 2% to 10% of train) or a single optimizer.lr"
            )
        if self.lr_extend and len(self.lr_sweep) < 2:
            raise ValueError(
                f"lr_extend {self.lr_extend} steps past an edge of lr_sweep by the ratio of its edge rates, "
                f"and lr_sweep {list(self.lr_sweep)} has one rate: list two or more rates in lr_sweep, or "
                "set lr_extend 0"
            )
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {micro}")
        return self

    def at_rate(self, lr: float) -> FinetuneConfig:
        """This section for one member of the sweep: fine-tuning at `lr` alone (one rate: no grid to
        extend, whether the sweep listed the rate or an extension added it)."""
        optimizer = dataclasses.replace(self.optimizer, lr=lr)
        return self.model_copy(update={"optimizer": optimizer, "lr_sweep": (lr,), "lr_extend": 0})


def _with_sweep_lr(data: dict[str, Any], optimizer: Any, sweep: Any) -> dict[str, Any]:
    """`data` with `optimizer.lr` the largest rate of `sweep` (the section's default optimizer otherwise
    kept); unchanged when there is no sweep or it is not a list of positive numbers (the field says so)."""
    numbers = isinstance(sweep, list | tuple) and all(
        isinstance(rate, int | float) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0
        for rate in sweep
    )
    if not numbers or not sweep:
        return data
    if "optimizer" not in data:
        optimizer = dataclasses.asdict(FinetuneConfig.model_fields["optimizer"].default)
    if not isinstance(optimizer, dict):
        return data
    return {**data, "optimizer": {**optimizer, "lr": float(max(sweep))}}


class EvaluateConfig(Section):
    """Few-shot linear evaluation on frozen features: closed-form ridge regression to {-1, 1}."""

    shots: tuple[PositiveInt, ...] = (1, 5, 10, 25)
    seeds: PositiveInt = 3
    l2_regularization: PositiveFloat = 1.0
    batch_size: PositiveInt = 256  # images per forward pass when extracting features and scoring

    @field_validator("shots")
    @classmethod
    def _sorted_shots(cls, shots: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(shots)))


class AnalyzeConfig(Section):
    """The paper's looks inside every ViT a job trains (attention rollout maps, mean attention distance by
    depth, position-embedding similarity, embedding-filter components), from the stored weights, on the
    test images of the first finetune target; one Ray task per model."""

    images: PositiveInt = 8  # the grid of test images the rollout maps are drawn over
    distance_images: PositiveInt = 128  # the images attention distances average over (the paper's 128)
    components: PositiveInt = 28  # principal components of the embedding filters drawn (the paper's 28)
    batch_size: PositiveInt = 64
    cpus_per_task: PositiveFloat = 1.0
    gpus_per_task: NonNegativeFloat = 0.0
