"""The pretrain stage's Ray part: check everything, then run the DeepSpeed workers under Ray Train's
TorchTrainer (the runner's `pretrain` step calls `pretrain`; `vitpipe pretrain JOB` is that step alone).

A run is `STORAGE/NAME` (where the run layout puts it). Launching a run that already has checkpoints
resumes it from the newest one (Ray Train restores its own state from the same folder); a worker lost
mid-run restarts the worker group from the newest checkpoint, up to `max_failures` times. An elastic
run (`num_workers: [min, max]`) restarts on what the cluster has left, and grows back at a checkpoint
(`pipeline.pretrain.elastic`): each regroup is one more fit of the same run.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import ControllerCallback

from pipeline.console import say
from pipeline.metrics import LOSS_PLOT, TENSORBOARD_DIR, plot_loss, read_records
from pipeline.pretrain.checkpoints import EXPORT_DIR, latest_checkpoint
from pipeline.pretrain.control import TrainingStopped, fit_stoppably, start_control
from pipeline.pretrain.elastic import MinimumWatch
from pipeline.pretrain.export import Export, export_checkpoint
from pipeline.pretrain.plan import PretrainPlan, WorkerSettings, run_needs, worker_settings
from pipeline.pretrain.probes import start_prober
from pipeline.pretrain.worker import SETTINGS, data_loop, train_loop
from pipeline.ray_session import check_resources, connect_ray, worker_env
from pipeline.storage import join, resolve
from pipeline.tracking import OFF, TrackingTarget

if TYPE_CHECKING:
    from vit.loop import LoopEnd


@dataclass(frozen=True)
class PretrainResult:
    run_dir: str
    plan: PretrainPlan
    steps: int
    export: Export
    loss_plot: str | None

    def summary(self) -> str:
        lines = [
            f"pretrained {self.steps:,} steps; run in {self.run_dir}",
            f"  {self.export.describe()}",
        ]
        if self.loss_plot:
            lines.append(f"  loss curve: {self.loss_plot}")
        return "\n".join(lines)


def pretrain(
    plan: PretrainPlan,
    *,
    storage: str,
    name: str,
    address: str | None = None,
    tracking: TrackingTarget = OFF,
    control: Any = None,
) -> PretrainResult:
    """Pretrain (or resume) run `storage/name` as `plan` (from `check_pretrain`, which the caller runs
    first so that a refused run never imports Ray Train or torch) says; rank 0 logs to `tracking`. With
    `control` (a study point's RunControl), whoever made it takes the signals and asks it to stop."""
    run_dir = join(storage, name)
    say(plan.describe(), err=True)
    for line in plan.probes.describe() if plan.probes is not None else []:
        say(f"pretrain: {line}", err=True)
    say(f"pretrain: TensorBoard: tensorboard --logdir {join(run_dir, TENSORBOARD_DIR)}", err=True)
    connect_ray(address)
    _check_placeable(plan)
    signals = control is None
    control = start_control() if control is None else control
    prober = start_prober(plan.probes, run_dir) if plan.probes is not None else None
    while True:  # one fit per worker group: an elastic group that regroups to grow is fitted again
        result = _fit(plan, name, storage, run_dir, control, tracking, signals, prober)
        if result.error is not None:
            raise RuntimeError(f"pretrain run {run_dir} failed: {result.error}") from result.error
        end = ray.get(control.end.remote())
        if end is None or end.reason != "regroup":
            break
        say(f"pretrain: regrouping at step {end.step:,} (checkpointed) on what the cluster offers", err=True)
    _refuse_unfinished(end, run_dir)
    _refuse_stopped_at_the_end(end, control, run_dir)
    exported = export_checkpoint(
        run_dir,
        out=join(run_dir, EXPORT_DIR),
        data=_card_data(plan),
        selection=plan.export,
        probe_key=plan.probes.key if plan.probes is not None else None,
    )
    plot = _plot(read_records(run_dir), run_dir)
    trained = latest_checkpoint(run_dir)
    return PretrainResult(run_dir, plan, trained.step if trained else exported.step, exported, plot)


def _refuse_unfinished(end: LoopEnd | None, run_dir: str) -> None:
    """A launch whose loop stopped or diverged ends here, before any export, saying where it stands."""
    if end is None or end.reason == "finished":
        return
    latest = latest_checkpoint(run_dir)
    kept = (
        f"The last good checkpoint is step {latest.step:,} ({latest.path})."
        if latest is not None
        else "No good checkpoint was kept before it."
    )
    if end.reason == "stopped":
        where = latest.path if latest is not None else run_dir
        raise TrainingStopped(
            f"pretraining stopped at step {end.step:,} and checkpointed it ({where}); the same command "
            f"continues from step {end.step:,}"
        )
    raise RuntimeError(
        f"pretraining diverged at step {end.step:,}: {end.detail} (not finite); nothing was exported and "
        f"no checkpoint of that state kept. {kept} Lower optimizer.lr (or fix "
        "the data), then start afresh (another name, or --force pretrain)"
    )


def _refuse_stopped_at_the_end(end: LoopEnd | None, control: Any, run_dir: str) -> None:
    """A stop asked for as the loop trained its last step (or waited for its last probes) finds no log
    step to stop at: the run trained to its end, and stops here, before its export and the stages after
    it (a `vitpipe run` of a long job would otherwise go on to fine-tune)."""
    if end is None or end.reason != "finished" or not ray.get(control.stop_requested.remote()):
        return
    raise TrainingStopped(
        f"pretraining stopped on request after its last step, {end.step:,} (checkpointed in {run_dir}); the "
        "same command exports it and goes on"
    )


def _card_data(plan: PretrainPlan) -> dict[str, Any]:
    """The pretraining data as the model card describes it."""
    data = plan.data
    return {
        "name": posixpath.basename(data.directory.rstrip("/")),
        "directory": data.directory,
        "split": data.split,
        "images": data.samples,
        "classes": len(data.classes),
    }


def _check_placeable(plan: PretrainPlan) -> None:
    """A fixed-size group (and the probing actor beside it) the cluster cannot place would wait forever:
    refused at once. An elastic one waits for its minimum (MinimumWatch) as nodes may come."""
    group, probes = plan.group, plan.probes
    if group.elastic:
        return
    needs = run_needs(group, probes.needs() if probes is not None else None)
    beside = " and the probes' actor" if probes is not None else ""
    check_resources(
        needs,
        f"pretrain: {group.describe()}{beside}",
        "lower num_workers or cpus_per_worker"
        + (", or pretrain.eval.cpus/gpus" if probes is not None else "")
        + ", or grow the cluster",
    )


def _fit(
    plan: PretrainPlan,
    name: str,
    storage: str,
    run_dir: str,
    control: Any,
    tracking: TrackingTarget,
    signals: bool = True,
    prober: Any = None,
):
    settings = worker_settings(plan, run_dir, control, tracking, prober)
    trainer = _trainer(train_loop, settings, storage, name, control)
    group = plan.group
    watch = MinimumWatch(group, group.elastic_wait_s, control) if group.elastic else None
    with _elastic_start_timeout(group.elastic):
        return fit_stoppably(trainer.fit, control, watch, signals)


# Ray Train waits this long for a group it decided to start before it counts the cluster again; after a
# node's loss it may decide on the old size once (its view of the cluster lags), so an elastic run waits
# less than Ray's default minute before it starts on what is left. A user's own setting is kept.
ELASTIC_START_TIMEOUT_S = "10"
START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def _elastic_start_timeout(elastic: bool) -> Iterator[None]:
    """Ray Train hands the driver's setting to its controller when a fit starts."""
    if not elastic or START_TIMEOUT_VARIABLE in os.environ:
        yield
        return
    os.environ[START_TIMEOUT_VARIABLE] = ELASTIC_START_TIMEOUT_S
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_VARIABLE, None)


# An elastic group is resized by vitpipe at a checkpoint (a regroup), never by Ray Train mid-step.
NO_RESIZE_WHILE_RUNNING_S = 10.0**9


class _RegisterController(ControllerCallback):
    """Hands Ray Train's controller of this fit to the launch's RunControl, so that the driver can abort
    a group that waits for a cluster below its minimum (Ray Train would wait for ever)."""

    def __init__(self, control: Any) -> None:
        self.control = control

    def after_controller_start(self, train_run_context: Any) -> None:
        self.control.set_controller.remote(ray.get_runtime_context().current_actor)


def _trainer(
    loop: Any, settings: WorkerSettings, storage: str, name: str, control: Any = None
) -> TorchTrainer:
    """Ray Train's trainer of `loop` on the run's workers, its own state in `storage/name`."""
    storage_fs, storage_path = resolve(storage) if "://" in storage else (None, storage)
    group = settings.plan.group
    return TorchTrainer(
        loop,
        train_loop_config={SETTINGS: settings},
        scaling_config=ScalingConfig(
            num_workers=group.num_workers,
            use_gpu=group.use_gpu,
            resources_per_worker=group.per_worker,
            placement_strategy=group.placement,
            elastic_resize_monitor_interval_s=NO_RESIZE_WHILE_RUNNING_S,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=group.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=group.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(group.use_gpu)},
            callbacks=[_RegisterController(control)] if control is not None else None,
        ),
    )


DATA_ONLY_DIR = "data-only"


def probe_data(plan: PretrainPlan, *, run_dir: str, steps: int | None, address: str | None = None) -> str:
    """`vitpipe pretrain JOB --data-only`: the run's data path on its workers, no training, for `steps`
    (default: the run's budget); records in `run_dir/data-only/metrics.jsonl`, never the run's own."""
    if steps is not None:
        plan = plan.with_steps(steps)
    say(plan.describe().replace("pretrain:", "pretrain --data-only:", 1), err=True)
    connect_ray(address)
    _check_placeable(replace(plan, probes=None))
    out = join(run_dir, DATA_ONLY_DIR)
    settings = worker_settings(plan, out, None)
    result = _trainer(data_loop, settings, run_dir, DATA_ONLY_DIR).fit()
    if result.error is not None:
        raise RuntimeError(f"pretrain --data-only in {out} failed: {result.error}") from result.error
    return out


def _plot(records: list[dict], run_dir: str) -> str | None:
    if not any("loss" in record for record in records):
        return None
    filesystem, root = resolve(run_dir)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return str(plot_loss(records, Path(root) / LOSS_PLOT))
    with tempfile.TemporaryDirectory() as scratch:
        local = plot_loss(records, Path(scratch) / LOSS_PLOT)
        pafs.copy_files(str(local), posixpath.join(root, LOSS_PLOT), destination_filesystem=filesystem)
    return join(run_dir, LOSS_PLOT)
