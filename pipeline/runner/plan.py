"""A job as an ordered list of steps, each with the settings and upstream steps its cache key covers.

Every cross-reference of the job is checked here, before anything runs: a preprocess entry reads a
dataset that exists, pretraining reads a preprocessed entry whose patch size is the model's, every
fine-tuning target is preprocessed. Errors are ConfigErrors naming the job file and the key.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import (
    DEFAULT_RUNS,
    FINETUNE_OPERATIONAL,
    ConfigError,
    FinetuneConfig,
    PipelineConfig,
    PretrainConfig,
    digest,
    load_yaml,
    pretrain_key,
    validate,
)
from pipeline.runner.layout import JOB_FILE, RunLayout, run_layout
from pipeline.runner.lock import RUN_FILE
from pipeline.runner.records import side_item
from pipeline.storage import target_name
from pipeline.study.plan import point_settings, study_job, study_points
from vit.patches import misfits

# What `vitpipe run` runs, in order; a job with a study runs its points in place of pretrain and finetune.
STAGES = ("datasets", "preprocess", "pretrain", "finetune", "study", "analyze", "report")
EVALUATE = "evaluate"  # `vitpipe evaluate JOB`: the weights scored on the targets without training


@dataclass(frozen=True)
class Overrides:
    """What a single-stage command's options change in its step: targets given as NAME=DIR (added to the
    finetune section's, or replacing the one of that name) and another output folder. Options that
    change a section (--weights, --data) are applied to the job's config before planning."""

    targets: dict[str, str] = field(default_factory=dict)
    out: str | None = None


@dataclass(frozen=True)
class Step:
    """One unit of cached work: a whole stage, or one entry of it (`preprocess:digits`)."""

    stage: str
    item: str | None
    settings: dict[str, Any]  # what the step does; part of its cache key
    depends: tuple[str, ...] = ()  # steps whose outputs it reads; their fingerprints join its key
    external: tuple[tuple[str, str], ...] = ()  # (kind, location) of inputs from outside the run
    output: str = ""  # the folder (or file) the step writes
    concurrent: bool = False  # runs beside the other concurrent steps next to it (a study's points)

    @property
    def id(self) -> str:
        return f"{self.stage}:{self.item}" if self.item else self.stage


@dataclass(frozen=True)
class JobPlan:
    job: PipelineConfig
    source: str  # the job file, for messages
    layout: RunLayout
    steps: list[Step] = field(default_factory=list)
    run_dir_given: bool = False  # the run folder is the command's (--run-dir, RUN/job.yaml), not the job's

    def step(self, step_id: str) -> Step:
        return next(step for step in self.steps if step.id == step_id)

    def patch_dir(self, entry: str) -> str:
        """A preprocess entry's folder in the run, or the entry itself when it is a location."""
        return patches_of(entry, self.job, self.layout)


@dataclass(frozen=True)
class StageOptions:
    """What a single-stage command's options change: sections (`data`: pretrain.data, `weights`:
    finetune.weights, `storage`: pretrain.storage_path, `name`: the job's name) and its step's targets
    and output folder."""

    data: str | None = None
    weights: str | None = None
    storage: str | None = None
    name: str | None = None
    overrides: Overrides = field(default_factory=Overrides)


@dataclass(frozen=True)
class RunOptions:
    """Which steps to redo and where to stop, checked before anything runs."""

    from_stage: str | None = None
    force: tuple[str, ...] = ()
    until: str | None = None
    points: tuple[str, ...] = ()  # a study's points to run alone (with what they read), no report

    def check(self) -> None:
        for stage in self.force:
            stage_index(stage, "--force")
        if self.from_stage is not None:
            stage_index(self.from_stage, "--from")
        if self.until is not None:
            stage_index(self.until, "--until")
        if (
            self.from_stage
            and self.until
            and stage_index(self.from_stage, "--from") > stage_index(self.until, "--until")
        ):
            raise ConfigError(f"--from {self.from_stage} comes after --until {self.until}")
        if self.points and (self.from_stage or self.until):
            raise ConfigError("--point runs those study points alone: drop --from and --until")

    def redo(self, stage: str) -> bool:
        if stage in self.force:
            return True
        if stage not in STAGES:  # evaluate runs only alone
            return False
        return self.from_stage is not None and STAGES.index(stage) >= STAGES.index(self.from_stage)

    def beyond(self, stage: str) -> bool:
        return self.until is not None and stage in STAGES and STAGES.index(stage) > STAGES.index(self.until)


def load_plan(
    job_path: str | Path,
    run_dir: str | None = None,
    stage: StageOptions = StageOptions(),
    *,
    evaluate: bool = False,
) -> JobPlan:
    """The job file validated and planned: every config error surfaces here, before any work. A file
    holding a `pretrain:` section's settings alone is a one-stage job whose run folder is STORAGE/NAME
    (NAME: the file's stem), as `vitpipe pretrain` has always put it."""
    source = str(job_path)
    data = load_yaml(job_path)
    run_dir = run_dir or _run_folder_holding(job_path)
    given = run_dir is not None
    if isinstance(data, dict) and "pretrain" not in data and "data" in data:
        pretrain = validate(data, PretrainConfig, source)
        name = stage.name or Path(job_path).stem
        storage = stage.storage or pretrain.storage_path or DEFAULT_RUNS
        pretrain = pretrain.model_copy(update={"storage_path": storage, "data": stage.data or pretrain.data})
        job = validate({"name": name}, PipelineConfig, source).model_copy(update={"pretrain": pretrain})
        if "://" not in storage:
            run_dir = run_dir or posixpath.join(storage, name)
    else:
        job = _with_stage_options(validate(data, PipelineConfig, source), stage)
    layout = run_layout(job, run_dir)
    plan = plan_job(job, source, layout, _variant_output(stage, layout, evaluate), evaluate=evaluate)
    return replace(plan, run_dir_given=given)


def _run_folder_holding(job_path: str | Path) -> str | None:
    """The run folder a job file is kept in (RUN/job.yaml beside RUN/run.json): a command given it acts on
    that folder, wherever it has moved since; None for a job file anywhere else."""
    path = Path(job_path)
    return str(path.parent) if path.name == JOB_FILE and (path.parent / RUN_FILE).is_file() else None


def _variant_output(stage: StageOptions, layout: RunLayout, evaluate: bool) -> Overrides:
    """Results of other weights or targets (--weights, --target) are not the run's: without --out they go
    beside the run's own, to RUN/transfer-KEY (or evaluate-KEY), KEY naming the variant."""
    overrides = stage.overrides
    if overrides.out is not None or (stage.weights is None and not overrides.targets):
        return overrides
    folder = posixpath.basename(layout.evaluate if evaluate else layout.transfer)
    key = digest({"weights": stage.weights, "targets": overrides.targets})[:8]
    return replace(overrides, out=posixpath.join(layout.root, f"{folder}-{key}"))


def _with_stage_options(job: PipelineConfig, stage: StageOptions) -> PipelineConfig:
    changes: dict[str, Any] = {"name": stage.name} if stage.name else {}
    if job.pretrain is not None and (stage.data or stage.storage):
        storage = stage.storage or job.pretrain.storage_path
        changes["pretrain"] = job.pretrain.model_copy(
            update={"data": stage.data or job.pretrain.data, "storage_path": storage}
        )
    finetune = job.finetune
    if finetune is None and stage.overrides.targets:
        finetune = FinetuneConfig(targets=list(stage.overrides.targets))
    if finetune is not None and stage.weights is not None:
        finetune = finetune.model_copy(update={"weights": stage.weights})
    if finetune is not job.finetune:
        changes["finetune"] = finetune
    return job.model_copy(update=changes)


def stage_index(stage: str, option: str) -> int:
    """The position of a stage named on the command line; an unknown name is a usage error."""
    if stage not in STAGES:
        raise ConfigError(f"{option}: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return STAGES.index(stage)


def plan_job(
    job: PipelineConfig,
    source: str,
    layout: RunLayout,
    overrides: Overrides = Overrides(),
    *,
    evaluate: bool = False,
) -> JobPlan:
    """Every step of `job` in run order, after checking how its sections refer to each other; with
    `evaluate`, also the evaluate step (which `vitpipe run` does not run)."""
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
    if job.study is not None:
        steps += _study_steps(job, source, layout, overrides)
    elif job.pretrain is not None:
        steps.append(_pretrain_step(job.pretrain, job, source, layout))
    if job.finetune is not None and job.study is None:
        steps.append(_transfer_step("finetune", job.finetune, job, source, layout, overrides))
    trained = [step for step in steps if step.stage in ("pretrain", "finetune") or step.concurrent]
    if trained:
        steps.append(_analyze_step(job, layout, trained))
    if steps:
        steps.append(Step("report", None, {}, tuple(step.id for step in steps), output=layout.report))
    if evaluate:
        if job.finetune is None:
            raise ConfigError(f"{source}: no finetune: section (and no --target NAME=DIR) to evaluate on")
        steps.append(_transfer_step(EVALUATE, job.finetune, job, source, layout, overrides))
    return JobPlan(job, source, layout, steps)


def _pretrain_step(pretrain: PretrainConfig, job: PipelineConfig, source: str, layout: RunLayout) -> Step:
    settings = pretrain_key(pretrain.model_copy(update={"eval": job.probes()}))
    probed, probe_depends, probe_external = _probe_targets(job, layout)
    if probed is not None:  # the targets as folders: another folder is other data
        settings["eval"]["targets"] = probed
    if pretrain.data in job.preprocess:
        model, entry = pretrain.model, job.preprocess[pretrain.data]
        geometry = entry.geometry()
        ways = {
            "patch_size": f"drop preprocess.{pretrain.data}.patch_size to take the model's",
            "channels": f"set preprocess.{pretrain.data}.channels: {model.channels} or drop model.channels",
        }
        problems = [
            f"{problem} ({ways[field]})"
            for field, value in (("patch_size", model.reads_patch_size), ("channels", model.channels))
            for problem in misfits(geometry, **{field: value})
        ]
        if problems:
            raise ConfigError(
                f"{source}: pretrain.model ({model.describe()}) does not fit preprocess.{pretrain.data}: "
                + "; ".join(problems)
            )
        depends = (f"preprocess:{pretrain.data}", *probe_depends)
        return Step("pretrain", None, settings, depends, probe_external, output=layout.pretrain)
    if pretrain.data in job.datasets:
        raise ConfigError(
            f"{source}: pretrain.data {pretrain.data!r} is a dataset, not preprocessed patches; add "
            f"preprocess.{pretrain.data} and train on that"
        )
    external = (("patches", pretrain.data), *probe_external)
    return Step("pretrain", None, settings, probe_depends, external, output=layout.pretrain)


def _probe_targets(
    job: PipelineConfig, layout: RunLayout
) -> tuple[dict[str, str] | None, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The targets pretrain.eval probes, by name, as folders (a preprocess entry's in the run, or a location
    outside it), with the steps and external folders the pretrain step then reads."""
    probes = job.probes()
    if probes is None:
        return None, (), ()
    folders: dict[str, str] = {}
    for entry in probes.targets or ():
        if entry in job.datasets and entry not in job.preprocess:
            raise ConfigError(
                f"pretrain.eval target {entry!r} is a dataset, not preprocessed patches; add "
                f"preprocess.{entry}"
            )
        name = entry if entry in job.preprocess else target_name(entry)
        if name in folders:
            raise ConfigError(
                f"pretrain.eval targets {folders[name]!r} and {entry!r} both go by the name {name!r}"
            )
        folders[name] = patches_of(entry, job, layout)
    depends = tuple(f"preprocess:{entry}" for entry in folders if entry in job.preprocess)
    external = tuple(("patches", folder) for name, folder in folders.items() if name not in job.preprocess)
    return folders, depends, external


def _transfer_step(
    stage: str,
    finetune: FinetuneConfig,
    job: PipelineConfig,
    source: str,
    layout: RunLayout,
    overrides: Overrides,
) -> Step:
    """The finetune (or evaluate) step: every target resolved to a folder (a preprocess entry's in the run,
    or one outside it), the weights it starts from, and what its key covers."""
    depends: list[str] = []
    external: list[tuple[str, str]] = []
    targets: dict[str, str] = {}
    for target in finetune.targets:
        if target in overrides.targets:
            continue
        if target in job.preprocess:
            depends.append(f"preprocess:{target}")
            _check_target_patches(target, finetune, job, source)
            targets[target] = layout.patches(target)
        elif target in job.datasets:
            raise ConfigError(
                f"{source}: finetune target {target!r} is a dataset, not preprocessed patches; add "
                f"preprocess.{target}"
            )
        else:
            external.append(("patches", target))
            name = target_name(target)
            if name in targets:
                raise ConfigError(
                    f"{source}: finetune targets {targets[name]!r} and {target!r} both go by the name "
                    f"{name!r} (a folder's last component); rename one, or give it as --target NAME=DIR"
                )
            targets[name] = target
    for name, location in overrides.targets.items():
        external.append(("patches", location))
        targets[name] = location
    if finetune.weights is not None:
        external.append(("tree", finetune.weights))
    elif job.pretrain is not None:
        depends.append("pretrain")
    elif stage == EVALUATE or "pretrained" in finetune.modes:
        raise ConfigError(
            f"{source}: finetune mode 'pretrained' needs weights: add a pretrain section or set "
            "finetune.weights"
        )
    else:  # mode scratch alone builds its model from the weights' architecture or the pretrain section's
        raise ConfigError(
            f"{source}: finetune mode 'scratch' has no model to build: add a pretrain section (its model is "
            "the one trained from scratch) or set finetune.weights (their architecture)"
        )
    settings = {
        "finetune": finetune.model_dump(mode="json", exclude=FINETUNE_OPERATIONAL),
        "evaluate": job.evaluate.model_dump(mode="json") if job.evaluate else None,
        # the scratch model is built from the pretrain section's model when there are no weights
        "model": job.pretrain.model.model_dump(mode="json") if job.pretrain else None,
        "targets": targets,
    }
    if overrides.out is None:
        output = layout.transfer if stage == "finetune" else layout.evaluate
        return Step(stage, None, settings, tuple(depends), tuple(external), output=output)
    # Results somewhere else are another step's: their own key and record, the run's left as they are.
    settings["out"] = overrides.out
    item = side_item(overrides.out)
    return Step(stage, item, settings, tuple(depends), tuple(external), output=overrides.out)


def _analyze_step(job: PipelineConfig, layout: RunLayout, trained: list[Step]) -> Step:
    """The analyses of every model the steps in `trained` write, on the test split of the first finetune
    target (B), or without one on the pretraining data's training split."""
    transfer = next((step for step in trained if step.stage == "finetune" or step.concurrent), None)
    images: dict[str, str] = {}
    if transfer is not None:
        name, directory = next(iter(transfer.settings["targets"].items()))
        # the test split (pipeline.transfer.plan.TEST_SPLIT, whose module would bring torch to the planner)
        images = {"name": name, "directory": directory, "split": "test"}
    elif job.pretrain is not None:
        pretrain = job.pretrain
        images = {
            "name": pretrain.data,
            "directory": patches_of(pretrain.data, job, layout),
            "split": pretrain.split,
        }
    reads = f"preprocess:{images['name']}"
    depends = [step.id for step in trained] + ([reads] if images["name"] in job.preprocess else [])
    external = () if images["name"] in job.preprocess else (("patches", images["directory"]),)
    settings = {"analyze": job.analyze.model_dump(mode="json"), "images": images}
    return Step("analyze", None, settings, tuple(depends), external, output=layout.analysis)


def patches_of(entry: str, job: PipelineConfig, layout: RunLayout) -> str:
    """A preprocess entry's folder in the run, or the entry itself when it is a location."""
    return layout.patches(entry) if entry in job.preprocess else entry


def _check_target_patches(target: str, finetune: FinetuneConfig, job: PipelineConfig, source: str) -> None:
    if finetune.weights is not None:
        return
    for model in job.models_reading(target):
        problems = misfits(job.preprocess[target].geometry(), patch_size=model.reads_patch_size)
        if problems:
            raise ConfigError(
                f"{source}: finetune target {target!r} does not fit the pretrained model "
                f"({model.describe()}): {problems[0]} (preprocess.{target}.patch_size)"
            )


def _study_steps(job: PipelineConfig, source: str, layout: RunLayout, overrides: Overrides) -> list[Step]:
    """The study's subsets (drawn once from the corpus), then one concurrent step per point, each reading
    the subsets (if pretrained) and the targets."""
    study = study_job(job, source)
    if study.finetune.weights is not None:
        raise ConfigError(f"{source}: finetune.weights is not used by a study (its points pretrain); drop it")
    targets = _transfer_step("finetune", study.finetune, job, source, layout, overrides)
    target_depends = tuple(dep for dep in targets.depends if dep != "pretrain")
    for name, model in study.study.models.items():
        read = [study.corpus, *(t for t in study.finetune.targets if t in job.preprocess)]
        wrong = [
            entry for entry in read if misfits(job.preprocess[entry].geometry(), channels=model.channels)
        ]
        if wrong:
            raise ConfigError(
                f"{source}: study.models.{name}.channels is {model.channels} but preprocess entries "
                f"{wrong} have {job.preprocess[wrong[0]].channels}; drop the model's channels (the data's)"
            )
    drawn = {"sizes": list(study.study.sizes), "seed": study.study.subset_seed, "split": study.pretrain.split}
    subsets = Step(
        "study",
        "subsets",
        drawn,
        (f"preprocess:{study.corpus}",),
        output=posixpath.join(layout.study, "subsets"),
    )
    steps = [subsets]
    for point in study_points(study.study):
        settings = point_settings(study, point) | {"targets": targets.settings["targets"]}
        depends = (subsets.id, *target_depends) if point.pretrained else target_depends
        steps.append(
            Step(
                "study",
                point.name,
                settings,
                depends,
                targets.external,
                output=layout.study_point(point.name),
                concurrent=True,
            )
        )
    return steps


def afresh_advice(plan: JobPlan) -> str:
    """How to start the job's pretraining afresh beside a run its folder already holds: by changing what
    decides that folder (the name under a storage_path, a run_dir given, else the name or a run_dir)."""
    job = plan.job
    if job.pretrain is not None and job.pretrain.storage_path:
        return "give the job another name (its run is pretrain.storage_path/NAME)"
    if plan.run_dir_given:
        return "run it with another --run-dir"
    if job.run_dir:
        return "set the job's run_dir to another folder"
    return "give the job another name (its run folder is runs/NAME) or set run_dir"
