"""What a pretraining run will do, worked out on the driver before any worker starts.

Every check that can fail early does so here with the directory, split or key named: missing or empty
data, unlabelled data, a patch geometry the model cannot take, too little data for one global batch,
and a run directory that already holds a different model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import PRETRAIN_BUDGET, PRETRAIN_OPERATIONAL, PretrainConfig, digest
from pipeline.preprocess.manifest import (
    ROOT_SPLIT,
    manifest_classes,
    manifest_geometry,
    patch_files,
    read_manifest,
)
from pipeline.pretrain.checkpoints import LAST_RAW, Selection, architecture_of, latest_checkpoint
from pipeline.pretrain.feed_plan import Corpus, FeedPlan
from pipeline.storage import basename
from pipeline.tracking import OFF, TrackingTarget, flatten
from vit.config import Architecture
from vit.patches import PatchGeometry, misfits
from vit.recipe import BatchSplit, Cadence, Recipe, Speed, Zero

if TYPE_CHECKING:
    from pipeline.pretrain.probes import ProbePlan

Rows = dict[str, tuple[int, ...]]  # patch file (path or URL) -> the row numbers of it to read


@dataclass(frozen=True)
class DataPlan:
    """The patch files of the training split and what they hold; with `rows`, only those rows of each
    file (a study's subset of the corpus)."""

    directory: str
    split: str
    files: list[str]
    samples: int
    geometry: PatchGeometry
    classes: list[str]
    counts: list[int]  # rows read of each file
    rows: Rows | None = None


@dataclass(frozen=True)
class WorkerGroup:
    """The Ray Train worker group: the sizes it may take (an elastic one: min < max, or min == max when
    `num_workers` was a pair), what one worker takes of a node, and how the group is placed, restarted and
    checkpointed."""

    min_workers: int
    max_workers: int
    per_worker: dict[str, float]
    elastic: bool = False
    placement: str = "PACK"
    use_gpu: bool = False
    max_failures: int = 3
    keep_checkpoints: int = 3
    elastic_wait_s: float = 600.0

    @property
    def num_workers(self) -> int | tuple[int, int]:
        """Ray Train's form: a number, or (min, max) for an elastic group."""
        return (self.min_workers, self.max_workers) if self.elastic else self.max_workers

    def needs(self, workers: int | None = None) -> dict[str, float]:
        """What `workers` workers (default: the most the run uses) take of a cluster."""
        count = self.max_workers if workers is None else workers
        return {key: count * need for key, need in self.per_worker.items()}

    def describe(self) -> str:
        """`2 worker(s)`, or for an elastic group `1-4 worker(s) (elastic)`."""
        if not self.elastic:
            return f"{self.max_workers} worker(s)"
        return f"{self.min_workers}-{self.max_workers} worker(s) (elastic)"


def run_needs(group: WorkerGroup, probes: dict[str, float] | None = None) -> dict[str, float]:
    """What a whole run takes of a cluster: its worker group's, and its probes' actor's beside it."""
    needs = dict(group.needs())
    for key, value in (probes or {}).items():
        if value:
            needs[key] = needs.get(key, 0.0) + value
    return needs


def worker_group(config: PretrainConfig) -> WorkerGroup:
    """The worker group of the config: its sizes, one worker's CPUs (it reads its own data) and GPU."""
    return WorkerGroup(
        config.min_workers,
        config.max_workers,
        {"CPU": config.cpus_per_worker, **({"GPU": 1.0} if config.use_gpu else {})},
        elastic=config.elastic,
        placement=config.placement,
        use_gpu=config.use_gpu,
        max_failures=config.max_failures,
        keep_checkpoints=config.keep_checkpoints,
        elastic_wait_s=config.elastic_wait_s,
    )


@dataclass(frozen=True)
class PretrainPlan:
    """Everything a run is, worked out once from the config and the data: the launch and the workers read
    this, never the config. `batch` is split for the largest group; a worker re-splits it for its own."""

    data: DataPlan
    architecture: Architecture
    group: WorkerGroup
    batch: BatchSplit
    steps_per_epoch: int
    total_steps: int
    recipe: Recipe
    zero: Zero
    speed: Speed
    bf16: Literal["auto"] | bool  # the recipe's bf16 is decided on the worker, which sees the device
    feed: FeedPlan
    cadence: Cadence
    seed: int
    identity: dict[str, Any]  # run_identity: what each checkpoint records the run was trained as
    checkpoint_async: bool = True  # staged while training waits, written and uploaded while it goes on
    probes: ProbePlan | None = None  # few-shot probes while training runs (pretrain.eval)
    ema_decay: float | None = None  # EMA weights kept beside the raw ones (pretrain.ema)
    export: Selection = LAST_RAW  # which weights the run's export holds

    def with_steps(self, steps: int) -> PretrainPlan:
        """The same run with another step budget (`--data-only --steps N`)."""
        return replace(self, total_steps=steps, recipe=replace(self.recipe, total_steps=steps))

    def describe(self) -> str:
        d, model = self.data, self.architecture
        epochs = self.total_steps / self.steps_per_epoch
        return (
            f"pretrain: {d.samples:,} images ({d.split!r} of {d.directory}, {len(d.files)} files), "
            f"{len(d.classes)} classes, {model.describe()} on "
            f"{model.geometry.describe()} ({model.geometry.num_patches} patches); {self._split()}; "
            f"{self.total_steps:,} steps ({self.steps_per_epoch:,} per epoch, {epochs:.1f} epochs)"
        )

    def _split(self) -> str:
        accumulation = self.batch.accumulation
        if not self.group.elastic:
            return f"{self.group.max_workers} worker(s) x accumulation {accumulation}"
        low, high = self.group.min_workers, self.group.max_workers
        most = self.batch.on(low).accumulation
        return (
            f"{low}-{high} worker(s), elastic, x accumulation {most}-{accumulation} (global batch "
            f"{self.batch.global_batch:,} at every size)"
        )


def training_split(directory: str, wanted: str) -> str:
    """The split of a patch directory to pretrain on: `wanted`, or "." when the shards were not in split
    folders and "train" was asked for (all of them are the training data)."""
    splits = read_manifest(directory)["splits"]
    if wanted not in splits and wanted == "train" and set(splits) == {ROOT_SPLIT}:
        return ROOT_SPLIT
    if wanted not in splits:
        known = ", ".join(repr(name) for name in splits) or "none"
        raise ValueError(f"{directory}: no split {wanted!r} to pretrain on (it has {known})")
    return wanted


def plan_data(config: PretrainConfig, directory: str, rows: Rows | None = None) -> DataPlan:
    """Read the manifest of a preprocessed directory and check it can be pretrained on (all of its
    training split, or only `rows` of its files: a study's subset)."""
    manifest = read_manifest(directory)
    split = training_split(directory, config.split)
    samples = int(manifest["splits"][split]["samples"]) if rows is None else sum(map(len, rows.values()))
    if samples == 0:
        raise ValueError(f"{directory}: split {split!r} holds no samples")
    if manifest["config"].get("label_key") is None:
        raise ValueError(
            f"{directory}: preprocessed without labels (label_key: none); pretraining needs them"
        )
    files = patch_files(directory, split) if rows is None else list(rows)
    return DataPlan(
        directory=directory,
        split=split,
        files=files,
        samples=samples,
        geometry=manifest_geometry(manifest, directory),
        classes=manifest_classes(manifest, directory),
        counts=file_samples(manifest, directory, split) if rows is None else [len(rows[f]) for f in files],
        rows=rows,
    )


def file_samples(manifest: dict[str, Any], directory: str, split: str) -> list[int]:
    """How many rows each patch file of the split holds, in `patch_files` order, as the manifest records
    (the files are not opened for it: at 10,000 files that would cost every launch seconds)."""
    by_name = {shard["file"]: int(shard["samples"]) for shard in manifest["shards"] if shard.get("file")}
    missing = [name for name in manifest["splits"][split]["files"] if name not in by_name]
    if missing:
        raise ValueError(f"{directory}: the manifest does not record how many samples {missing[0]} holds")
    return [by_name[name] for name in manifest["splits"][split]["files"]]


def plan_pretrain(config: PretrainConfig, directory: str, rows: Rows | None = None) -> PretrainPlan:
    """The data plan plus the model for it, the steps per epoch and the step budget (the probes are
    planned by `check_pretrain`, when the run is launched: their targets may not be preprocessed before)."""
    data = plan_data(config, directory, rows)
    model, geometry = config.model, data.geometry
    image_size = config.image_size or geometry.image_size
    problems = misfits(
        geometry, patch_size=model.reads_patch_size, channels=model.channels, image_size=image_size
    )
    if problems:
        ways = "preprocess again to the model's geometry, or set the model's to the data's"
        if not (model.reads_patch_size not in (None, geometry.patch_size) or model.channels):
            ways = "choose a pretrain.image_size the stored images hold (the model sees a crop of them)"
        raise ValueError(
            f"{directory}: does not fit the model ({model.describe()} at pretrain.image_size {image_size}): "
            f"{'; '.join(problems)}; {ways}"
        )
    architecture = model.architecture(
        image_size=image_size,
        channels=geometry.channels,
        num_classes=len(data.classes),
        patch_size=geometry.patch_size,
    )
    # Whole global batches: every rank reads its equal share of each (pipeline.pretrain.order), so none
    # waits on another at the end of an epoch, whatever the number of ranks.
    steps_per_epoch = data.samples // config.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{directory}: split {data.split!r} has {data.samples} samples, fewer than one global batch of "
            f"{config.global_batch_size}; lower global_batch_size or add data"
        )
    total = config.epochs * steps_per_epoch if config.epochs is not None else config.steps
    group = worker_group(config)
    batch = BatchSplit(config.global_batch_size, config.micro_batch_size, group.max_workers)
    return PretrainPlan(
        data=data,
        architecture=architecture,
        group=group,
        batch=batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        recipe=pretrain_recipe(config, total, batch, data.geometry.image_size),
        zero=config.zero(),
        speed=config.speed(),
        bf16=config.bf16,
        feed=feed_plan(config, data, steps_per_epoch, batch),
        cadence=Cadence(config.log_every, config.checkpoint_every),
        seed=config.seed,
        identity=run_identity(config, data),
        checkpoint_async=config.checkpoint_async,
        ema_decay=config.ema.decay if config.ema is not None else None,
        export=Selection(config.export.select, config.export.weights),
    )


def _probes(
    config: PretrainConfig, architecture: Architecture, targets: dict[str, str] | None
) -> ProbePlan | None:
    """The probes' plan (every check on their targets, before Ray), or None without `pretrain.eval`; the
    targets are `targets` (name -> patch folder; a job's, resolved by the runner), else the section's own
    folders."""
    if config.eval is None:
        return None
    from pipeline.pretrain.probes import plan_probes  # torch and Ray: only for a run that probes

    if targets is None:
        targets = {basename(location.rstrip("/")): location for location in config.eval.targets or ()}
    if not targets:
        raise ValueError("pretrain.eval.targets: no target to probe; name the patch folders to probe on")
    return plan_probes(config.eval, targets, None, architecture, seed=config.seed)


def pretrain_recipe(config: PretrainConfig, total_steps: int, batch: BatchSplit, input_size: int) -> Recipe:
    """The recipe the workers train with on images stored at `input_size`; `bf16: auto` stays off here
    and is decided on the worker, which sees the device."""
    return Recipe(
        optimizer=config.optimizer,
        schedule=config.schedule,
        total_steps=total_steps,
        batch=batch,
        label_smoothing=config.label_smoothing,
        flip=config.flip,
        mixup_alpha=config.mixup_alpha,
        bf16=config.bf16 is True,
        crop=config.crop,
        input_size=input_size,
    )


def check_pretrain(
    config: PretrainConfig,
    directory: str,
    run_dir: str,
    rows: Rows | None = None,
    redo: str = "--force pretrain",
    beyond_budget: str | None = None,
    probe_targets: dict[str, str] | None = None,
) -> PretrainPlan:
    """The plan of run `run_dir` on `directory` (or on `rows` of it), after every check that needs no
    worker: the data, the model for it, the probes of `probe_targets`, and the run folder's checkpoints (a run
    defined otherwise is refused; the refusals advise `redo`, and `beyond_budget` for a run past its
    budget)."""
    plan = plan_pretrain(config, directory, rows)
    plan = replace(plan, probes=_probes(config, plan.architecture, probe_targets))
    check_run_matches(run_dir, config, plan, redo, beyond_budget)
    return plan


def run_identity(config: PretrainConfig, data: DataPlan | None) -> dict[str, Any]:
    """What defines the run, as its checkpoints record it: the defining settings (flattened,
    `optimizer.lr`; less the model, whose resolved architecture is compared as a whole, and the operational
    settings and the budget) and, when the data is planned, the number of training images (another corpus
    is another run) and, for a subset of the corpus, which rows (by file name: a moved corpus is the same)."""
    exclude = PRETRAIN_OPERATIONAL | PRETRAIN_BUDGET | {"model"}
    identity = flatten(config.model_dump(mode="json", exclude=exclude))
    if data is not None:
        identity["data.samples"] = data.samples
    if data is not None and data.rows is not None:
        identity["data.rows"] = digest({basename(file): rows for file, rows in data.rows.items()})
    return identity


def changed_definition(
    config: PretrainConfig, plan: PretrainPlan | None, meta: dict[str, Any], checkpoint: str
) -> list[str]:
    """Each setting that defines the run and differs from the checkpoint's (`optimizer.lr 0.003 -> 0.001`).
    Checkpoints of vitpipe before this record have the model only."""
    saved = architecture_of(meta, checkpoint)
    # Without the data planned, the model section is resolved for the checkpoint's own data.
    wanted = (
        plan.architecture
        if plan is not None
        else config.model.architecture(
            image_size=saved.image_size,
            channels=saved.channels,
            num_classes=saved.num_classes,
            patch_size=saved.patch_size,
        )
    )
    if wanted.family != saved.family:
        changes = [f"model {saved.describe()} -> {wanted.describe()}"]
    else:
        changes = [
            f"model {key} {saved.to_dict().get(key)} -> {value}"
            for key, value in wanted.to_dict().items()
            if saved.to_dict().get(key) != value
        ]
    recorded = meta.get("defines", {})
    identity = plan.identity if plan is not None else run_identity(config, None)
    for key, value in identity.items():
        if key in recorded and recorded[key] != value:
            changes.append(f"{key} {recorded[key]} -> {value}")
    return changes


# What a plain run trained past its budget may do; a study point's caller says what it may (its budget is the
# study's, and its transfer reads its own export: an earlier checkpoint exported elsewhere changes nothing).
BEYOND_BUDGET = (
    "raise steps (or epochs) to go on, or export an earlier checkpoint (vitpipe export RUN --checkpoint N)"
)


# How a new run goes beside a refused one, where the caller cannot tell what decides the run's folder
# (the runner can: pipeline.runner.plan.afresh_advice).
AFRESH = "give the job another name or run_dir"


def check_run_matches(
    run_dir: str,
    config: PretrainConfig,
    plan: PretrainPlan | None = None,
    redo: str = "--force pretrain",
    beyond_budget: str | None = None,
    afresh: str = AFRESH,
) -> None:
    """A run folder whose checkpoints were trained with other defining settings is refused (resuming
    would mix two runs), naming each change and the two ways on (`afresh`: what puts a new run beside it;
    `redo`); so is a budget below the step reached (advising `beyond_budget`, by default BEYOND_BUDGET)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return
    changes = changed_definition(config, plan, latest.meta, latest.path)
    if changes:
        raise ValueError(
            f"{run_dir}: holds a run trained with other settings that define it ({', '.join(changes)}); "
            f"resuming would mix two runs. To start afresh beside it, {afresh}; or redo "
            f"it with {redo}, which discards its {latest.step:,} steps. Workers, CPUs, "
            "micro-batch, cadences and the step budget may change on a relaunch"
        )
    if plan is not None and plan.total_steps < latest.step:
        raise ValueError(
            f"{run_dir}: has trained {latest.step:,} steps, beyond the budget of {plan.total_steps:,}; "
            + (beyond_budget or BEYOND_BUDGET)
        )


def placeable(bounds: WorkerGroup, nodes: list[dict[str, float]]) -> int:
    """How many workers fit on `nodes` (each node's resources: totals, or what is free), node by node."""
    return sum(
        min(
            math.floor(node.get(key, 0.0) / need + 1e-9)
            for key, need in bounds.per_worker.items()
            if need > 0
        )
        for node in nodes
    )


@dataclass(frozen=True)
class WorkerSettings:
    """What every Ray Train worker receives (Ray serialises it as it is): the run's plan, where the run
    lives, the launch's RunControl actor (pipeline.pretrain.control: stop requests, how it ended), the
    tracking run rank 0 logs every step into, and the actor that probes the weights."""

    plan: PretrainPlan
    run_dir: str
    control: Any
    tracking: TrackingTarget = OFF
    prober: Any = None  # the run's Prober actor (pipeline.pretrain.probes), when it probes


def worker_settings(
    plan: PretrainPlan, run_dir: str, control: Any, tracking: TrackingTarget = OFF, prober: Any = None
) -> WorkerSettings:
    """What the workers of `plan`'s run in `run_dir` receive."""
    return WorkerSettings(plan, run_dir, control, tracking, prober)


def feed_plan(config: PretrainConfig, data: DataPlan, steps_per_epoch: int, batch: BatchSplit) -> FeedPlan:
    """How each worker reads the split (pipeline.pretrain.feed)."""
    selected = None if data.rows is None else tuple(tuple(data.rows[file]) for file in data.files)
    return FeedPlan(
        corpus=Corpus(tuple(data.files), tuple(data.counts), data.geometry, selected),
        seed=config.seed,
        window=config.shuffle_buffer,
        steps_per_epoch=steps_per_epoch,
        batch=batch,
        threads=config.data_threads,
    )
