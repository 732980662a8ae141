"""A study's points and what each one runs, worked out from the job before anything starts.

Every (size, model, seed) point pretrains with the job's pretrain section as its recipe (the model, seed
and budget the study's), on the nested subset of that size, then fine-tunes (mode `pretrained`) and
few-shot evaluates on every finetune target. A scratch point (size 0) trains the model from scratch on
the targets (mode `scratch`): the row the paper's curves start from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import (
    FINETUNE_OPERATIONAL,
    AnyModel,
    EvaluateConfig,
    FinetuneConfig,
    PipelineConfig,
    PretrainConfig,
    StudyConfig,
    pretrain_key,
    validate,
)

SCRATCH = 0  # the size of a point trained from scratch on the targets

POINT_FILE = "point.json"  # a finished point's summary: what the study's report reads


@dataclass(frozen=True)
class Point:
    """One point of the study's figure."""

    size: int  # pretraining images; SCRATCH for no pretraining
    model: str  # its name in study.models
    seed: int

    @property
    def name(self) -> str:
        """Its step item and folder name: `n0000001000-vit-seed0`, `scratch-bit-seed1`."""
        where = f"n{self.size:010d}" if self.size != SCRATCH else "scratch"
        return f"{where}-{self.model}-seed{self.seed}"

    @property
    def pretrained(self) -> bool:
        return self.size != SCRATCH


def study_points(study: StudyConfig) -> list[Point]:
    """Every point, largest subsets first (they take longest, so they start first), then scratch rows."""
    points = [
        Point(size, model, seed)
        for size in reversed(study.sizes)
        for model in study.models
        for seed in study.seeds
    ]
    if study.scratch:
        points += [Point(SCRATCH, model, seed) for model in study.models for seed in study.seeds]
    return points


@dataclass(frozen=True)
class StudyJob:
    """The sections of a job a study reads, each known to be there."""

    study: StudyConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig | None
    source: str  # the job file, for messages

    @property
    def corpus(self) -> str:
        """The preprocess entry the study draws its subsets from."""
        return self.study.corpus or self.pretrain.data


def study_job(job: PipelineConfig, source: str) -> StudyJob:
    """The study's sections (the config schema has checked that a study comes with both), the recipe's
    probes resolved from the job (its finetune targets, the evaluate section's shots)."""
    if job.study is None or job.pretrain is None or job.finetune is None:
        raise ValueError(f"{source}: a study needs study, pretrain and finetune sections")
    pretrain = job.pretrain.model_copy(update={"eval": job.probes()})
    return StudyJob(job.study, pretrain, job.finetune, job.evaluate, source)


def point_model(job: StudyJob, point: Point) -> AnyModel:
    return job.study.models[point.model]


def point_pretrain(job: StudyJob, point: Point) -> PretrainConfig:
    """The job's pretrain section with the point's model, seed and the study's budget."""
    study, pretrain = job.study, job.pretrain
    settings = pretrain.model_dump(mode="json", exclude={"model", "seed", "steps", "epochs", "data"})
    steps_per_epoch = point.size // pretrain.global_batch_size  # as the plan counts them: whole batches
    floor = study.min_steps or 0
    if study.epochs is not None and study.epochs * steps_per_epoch < floor:
        settings["steps"] = study.min_steps
    elif study.epochs is not None:
        settings["epochs"] = study.epochs
    elif study.steps is not None:
        settings["steps"] = study.steps
    elif pretrain.epochs is not None:
        settings["epochs"] = pretrain.epochs
    else:
        settings["steps"] = pretrain.steps
    model = point_model(job, point).model_dump(mode="json")
    settings |= {"data": job.corpus, "seed": point.seed, "model": model}
    return validate(settings, PretrainConfig, f"{job.source}: study point {point.name}")


def point_finetune(job: StudyJob, point: Point) -> FinetuneConfig:
    """The job's finetune section in the point's one mode, with its seed."""
    mode = "pretrained" if point.pretrained else "scratch"
    return job.finetune.model_copy(update={"modes": (mode,), "seed": point.seed})


def point_settings(job: StudyJob, point: Point) -> dict[str, Any]:
    """What a point's cache key covers: everything it runs with (less how its pretraining is operated)."""
    pretrain = point_pretrain(job, point) if point.pretrained else None
    return {
        "point": {"size": point.size, "model": point.model, "seed": point.seed},
        "model": point_model(job, point).model_dump(mode="json"),
        "pretrain": pretrain_key(pretrain) if pretrain else None,
        "finetune": point_finetune(job, point).model_dump(mode="json", exclude=FINETUNE_OPERATIONAL),
        "evaluate": job.evaluate.model_dump(mode="json") if job.evaluate else None,
    }
