"""A job as an ordered list of steps, each with the settings and upstream steps its cache key covers.

Every cross-reference of the job is checked here, before anything runs: a preprocess entry reads a
dataset that exists, pretraining reads a preprocessed entry whose patch size is the model's, every
fine-tuning target is preprocessed. Errors are ConfigErrors naming the job file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError, FinetuneConfig, PipelineConfig, PretrainConfig
from pipeline.runner.layout import RunLayout

STAGES = ("datasets", "preprocess", "pretrain", "finetune", "report")


@dataclass(frozen=True)
class Step:
    """One unit of cached work: a whole stage, or one entry of it (`preprocess:digits`)."""

    stage: str
    item: str | None
    settings: dict[str, Any]  # what the step does; part of its cache key
    depends: tuple[str, ...] = ()  # steps whose outputs it reads; their fingerprints join its key
    external: tuple[tuple[str, str], ...] = ()  # (kind, location) of inputs from outside the run
    output: str = ""  # the folder (or file) the step writes

    @property
    def id(self) -> str:
        return f"{self.stage}:{self.item}" if self.item else self.stage


@dataclass(frozen=True)
class JobPlan:
    job: PipelineConfig
    source: str  # the job file, for messages
    layout: RunLayout
    steps: list[Step] = field(default_factory=list)

    def step(self, step_id: str) -> Step:
        return next(step for step in self.steps if step.id == step_id)


def stage_index(stage: str, option: str) -> int:
    """The position of a stage named on the command line; an unknown name is a usage error."""
    if stage not in STAGES:
        raise ConfigError(f"{option}: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return STAGES.index(stage)


def plan_job(job: PipelineConfig, source: str, layout: RunLayout) -> JobPlan:
    """Every step of `job` in run order, after checking how its sections refer to each other."""
    steps: list[Step] = []
    for name, dataset in job.datasets.items():
        external = (("tree", dataset.src),) if dataset.kind == "imagefolder" else ()
        steps.append(
            Step(
                "datasets",
                name,
                dataset.model_dump(mode="json"),
                external=external,
                output=layout.dataset(name),
            )
        )
    for name, config in job.preprocess.items():
        reads = config.input or name
        if reads in job.datasets:
            depends, external = (f"datasets:{reads}",), ()
        elif config.input is None:
            raise ConfigError(
                f"{source}: preprocess.{name}: there is no dataset named {name!r} to read; add "
                f"datasets.{name}, or set preprocess.{name}.input to a datasets entry or a shard location"
            )
        else:
            depends, external = (), (("shards", config.input),)
        settings = config.model_dump(mode="json", exclude={"input"})
        steps.append(Step("preprocess", name, settings, depends, external, output=layout.patches(name)))
    if job.pretrain is not None:
        steps.append(_pretrain_step(job.pretrain, job, source, layout))
    if job.finetune is not None:
        steps.append(_finetune_step(job.finetune, job, source, layout))
    if steps:
        steps.append(Step("report", None, {}, tuple(step.id for step in steps), output=layout.report))
    return JobPlan(job, source, layout, steps)


# Settings that change how a run is operated, not what it computes: not part of the cache key.
PRETRAIN_OPERATIONAL = {
    "data",
    "storage_path",
    "max_failures",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
}


def _pretrain_step(pretrain: PretrainConfig, job: PipelineConfig, source: str, layout: RunLayout) -> Step:
    settings = pretrain.model_dump(mode="json", exclude=PRETRAIN_OPERATIONAL)
    if pretrain.data in job.preprocess:
        entry = job.preprocess[pretrain.data]
        if entry.patch_size != pretrain.model.patch_size:
            raise ConfigError(
                f"{source}: pretrain.model.variant {pretrain.model.variant!r} has patch size "
                f"{pretrain.model.patch_size} but preprocess.{pretrain.data}.patch_size is {entry.patch_size}"
            )
        if pretrain.model.channels not in (None, entry.channels):
            raise ConfigError(
                f"{source}: pretrain.model.channels is {pretrain.model.channels} but "
                f"preprocess.{pretrain.data}.channels is {entry.channels}"
            )
        return Step("pretrain", None, settings, (f"preprocess:{pretrain.data}",), output=layout.pretrain)
    if pretrain.data in job.datasets:
        raise ConfigError(
            f"{source}: pretrain.data {pretrain.data!r} is a dataset, not preprocessed patches; add "
            f"preprocess.{pretrain.data} and train on that"
        )
    return Step("pretrain", None, settings, external=(("patches", pretrain.data),), output=layout.pretrain)


def _finetune_step(finetune: FinetuneConfig, job: PipelineConfig, source: str, layout: RunLayout) -> Step:
    depends: list[str] = []
    external: list[tuple[str, str]] = []
    for target in finetune.targets:
        if target in job.preprocess:
            depends.append(f"preprocess:{target}")
            patch_size = job.preprocess[target].patch_size
            model = job.pretrain.model if job.pretrain else None
            if model is not None and finetune.weights is None and patch_size != model.patch_size:
                raise ConfigError(
                    f"{source}: finetune target {target!r} is preprocessed in {patch_size}-pixel patches "
                    f"(preprocess.{target}.patch_size) but the pretrained model uses {model.patch_size}"
                )
        elif target in job.datasets:
            raise ConfigError(
                f"{source}: finetune target {target!r} is a dataset, not preprocessed patches; add "
                f"preprocess.{target}"
            )
        else:
            external.append(("patches", target))
    if finetune.weights is not None:
        external.append(("tree", finetune.weights))
    elif job.pretrain is not None:
        depends.append("pretrain")
    elif "pretrained" in finetune.modes:
        raise ConfigError(
            f"{source}: finetune mode 'pretrained' needs weights: add a pretrain section or set "
            "finetune.weights"
        )
    settings = {
        "finetune": finetune.model_dump(mode="json"),
        "evaluate": job.evaluate.model_dump(mode="json") if job.evaluate else None,
        # the scratch model is built from the pretrain section's model when there are no weights
        "model": job.pretrain.model.model_dump(mode="json") if job.pretrain else None,
    }
    return Step("finetune", None, settings, tuple(depends), tuple(external), output=layout.transfer)
