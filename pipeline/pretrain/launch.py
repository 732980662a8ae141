"""The pretrain stage's Ray part: check everything, then run the DeepSpeed workers under Ray Train's
TorchTrainer (the runner's `pretrain` step calls `pretrain`; `vitpipe pretrain JOB` is that step alone).

A run is `STORAGE/NAME` (where the run layout puts it). Launching a run that already has checkpoints
resumes it from the newest one (Ray Train restores its own state from the same folder); a worker lost
mid-run restarts the worker group from the newest checkpoint, up to `max_failures` times.
"""

from __future__ import annotations

import posixpath
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import DataContext, ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.config import PretrainConfig
from pipeline.metrics import LOSS_PLOT, plot_loss, read_records
from pipeline.pretrain.checkpoints import latest_checkpoint
from pipeline.pretrain.control import TrainingStopped, fit_stoppably, start_control
from pipeline.pretrain.export import Export, export_checkpoint
from pipeline.pretrain.plan import PretrainPlan, should_cache, shuffled_files, worker_settings
from pipeline.pretrain.worker import DATASET, SETTINGS, train_loop
from pipeline.ray_session import check_resources, init_ray, worker_env
from pipeline.storage import join, resolve, resolve_all

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
    config: PretrainConfig, plan: PretrainPlan, *, storage: str, name: str, address: str | None = None
) -> PretrainResult:
    """Pretrain (or resume) run `storage/name` as `plan` (from `check_pretrain`, which the caller runs
    first so that a refused run never imports Ray Train or torch) says."""
    run_dir = join(storage, name)
    print(plan.describe(), file=sys.stderr)
    print(init_ray(address), file=sys.stderr)
    # Ray Data reads beside the workers: without CPUs to spare its read tasks never start.
    needs = {"CPU": config.num_workers * config.cpus_per_worker + config.data_cpus}
    if config.use_gpu:
        needs["GPU"] = config.num_workers
    check_resources(needs, f"pretrain: {config.num_workers} worker(s) and the data readers",
                    "lower num_workers, cpus_per_worker or data_cpus, or grow the cluster")  # fmt: skip
    control = start_control()
    result = _fit(config, plan, name, storage, run_dir, control)
    if result.error is not None:
        raise RuntimeError(f"pretrain run {run_dir} failed: {result.error}") from result.error
    _refuse_unfinished(ray.get(control.end.remote()), run_dir)
    exported = export_checkpoint(run_dir)
    plot = _plot(read_records(run_dir), run_dir)
    return PretrainResult(run_dir, plan, exported.step, exported, plot)


def _refuse_unfinished(end: LoopEnd | None, run_dir: str) -> None:
    """A launch whose loop stopped or diverged ends here, before any export, saying where it stands."""
    if end is None or end.reason == "finished":
        return
    latest = latest_checkpoint(run_dir)
    kept = f"step {latest.step:,} ({latest.path})" if latest is not None else "none"
    if end.reason == "stopped":
        where = latest.path if latest is not None else run_dir
        raise TrainingStopped(
            f"pretraining stopped at step {end.step:,} and checkpointed it ({where}); the same command "
            f"continues from step {end.step:,}"
        )
    raise RuntimeError(
        f"pretraining diverged at step {end.step:,}: {end.detail} (not finite); nothing was exported and "
        f"no checkpoint of that state kept. The last good checkpoint is {kept}. Lower optimizer.lr (or fix "
        "the data), then start afresh (another name, or --force pretrain)"
    )


def training_dataset(config: PretrainConfig, plan: PretrainPlan) -> ray.data.Dataset:
    """The split's patch files in the run's file order, whole, or (a study's subset) only their chosen
    rows: one Ray Data task per file reads it and keeps those rows."""
    files = shuffled_files(plan.data.files, config.seed)
    if plan.data.rows is not None:
        items = [{"file": file, "rows": list(plan.data.rows[file])} for file in files]
        return ray.data.from_items(items).map_batches(
            _read_rows, batch_size=1, batch_format="pyarrow", num_cpus=config.data_cpus
        )
    # Filesystems resolved here, so that a URL's own settings (endpoint_override=..., scheme=...) reach
    # Ray Data and Ray Train, which would otherwise read the query as part of the path.
    data_fs, paths = resolve_all(files)
    return ray.data.read_parquet(paths, filesystem=data_fs, columns=COLUMNS, num_cpus=config.data_cpus)


COLUMNS = ["patches", "label"]


def _read_rows(batch: pa.Table) -> pa.Table:
    """One patch file's chosen rows (a batch of one item: the file and its row numbers)."""
    file, rows = batch.column("file")[0].as_py(), batch.column("rows")[0].as_py()
    filesystem, path = resolve(file)
    with filesystem.open_input_file(path) as stream:
        return pq.read_table(stream, columns=COLUMNS).take(rows)


def _fit(config: PretrainConfig, plan: PretrainPlan, name: str, storage: str, run_dir: str, control: Any):
    dataset = training_dataset(config, plan)
    store = ray.cluster_resources().get("object_store_memory", 0)
    if should_cache(config.cache_data, plan.data.bytes_in_memory, store):
        print(f"pretrain: caching the {plan.data.bytes_in_memory / 2**20:,.0f} MiB split in the object store",
              file=sys.stderr)  # fmt: skip
        dataset = _materialize_in_order(dataset)
    settings = worker_settings(config, plan, run_dir, _resume_point(run_dir), control)
    storage_fs, storage_path = resolve(storage) if "://" in storage else (None, storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={SETTINGS: settings},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
            placement_strategy=config.placement,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(config.use_gpu)},
        ),
        datasets={DATASET: dataset},
        # The same order every epoch and every relaunch, so a resumed worker can skip what it trained on.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    return fit_stoppably(trainer.fit, control)


def _resume_point(run_dir: str) -> str | None:
    """The newest finished checkpoint in the run folder. A relaunch resumes from it even where Ray
    Train's own record of the run (its checkpoint snapshot) lags behind or is missing, as after a
    killed driver; a worker restart inside one launch gets Ray Train's newer checkpoint instead."""
    latest = latest_checkpoint(run_dir)
    return latest.path if latest is not None else None


def _materialize_in_order(dataset):
    """Read the dataset into the object store once, its blocks in file order (what resuming relies on)."""
    options = DataContext.get_current().execution_options
    previous, options.preserve_order = options.preserve_order, True
    try:
        return dataset.materialize()
    finally:
        options.preserve_order = previous


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
