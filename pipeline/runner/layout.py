"""Where every output of a job lives: the one map the runner and the single-stage commands share.

RUN (the job's `run_dir`, default `runs/NAME`) holds:

    datasets/NAME/     WebDataset shards of each `datasets:` entry
    patches/NAME/      Parquet patch shards of each `preprocess:` entry (+ samples.png)
    pretrain/          the Ray Train run: checkpoints, metrics, loss.png, export/ (unless storage_path)
    transfer/          fine-tune and few-shot results of every target
    study/             a study's subsets/ manifests, one folder per point (pretrain/, transfer/,
                       point.json), and results.json, results.md, transfer_vs_data.png
    analysis/          the paper's looks inside every ViT trained: one folder of pictures and numbers
                       per model, analysis.json, and the figures that compare them
    stages/            one record per finished (or interrupted) step: its cache key and outputs
    logs/              what each stage printed
    report.md, report/ the results table and pictures
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DEFAULT_RUNS, ConfigError, PipelineConfig
from pipeline.storage import join

PRETRAIN_DIR = "pretrain"
JOB_FILE = "job.yaml"  # the job a run folder was run with, kept in it


@dataclass(frozen=True)
class RunLayout:
    """The folders of one job's run; `root` is absolute, so Ray tasks on other nodes see the same paths."""

    root: str
    name: str
    pretrain_storage: str  # Ray Train's storage_path: RUN, or the pretrain section's storage_path
    pretrain_name: str  # the Ray Train run name inside it

    def dataset(self, name: str) -> str:
        return posixpath.join(self.root, "datasets", name)

    def patches(self, name: str) -> str:
        return posixpath.join(self.root, "patches", name)

    @property
    def pretrain(self) -> str:
        return join(self.pretrain_storage, self.pretrain_name)

    @property
    def transfer(self) -> str:
        return posixpath.join(self.root, "transfer")

    @property
    def evaluate(self) -> str:
        return posixpath.join(self.root, "evaluate")

    @property
    def study(self) -> str:
        return posixpath.join(self.root, "study")

    def study_point(self, point: str) -> str:
        """A study point's folder: its transfer results and summary (and its pretraining run, unless
        the pretrain section's storage_path puts that elsewhere: `study_storage`)."""
        return posixpath.join(self.study, point)

    def study_storage(self, point: str) -> str:
        """Where a study point's Ray Train run goes (as run `pretrain` in it)."""
        if self.pretrain_storage == self.root:
            return self.study_point(point)
        return join(self.pretrain_storage, self.name, "study", point)

    @property
    def analysis(self) -> str:
        return posixpath.join(self.root, "analysis")

    @property
    def stages(self) -> str:
        return posixpath.join(self.root, "stages")

    @property
    def logs(self) -> str:
        return posixpath.join(self.root, "logs")

    @property
    def report(self) -> str:
        return posixpath.join(self.root, "report.md")


def run_layout(job: PipelineConfig, run_dir: str | None = None) -> RunLayout:
    """The layout of `job`'s run in `run_dir` (default: the job's run_dir, else runs/NAME).

    The run folder is a filesystem path (on a cluster: a mount every node shares); pretraining
    checkpoints alone may go to object storage, through the pretrain section's storage_path.
    """
    location = run_dir or job.run_dir or posixpath.join(DEFAULT_RUNS, job.name)
    if "://" in location:
        raise ConfigError(
            f"run_dir {location!r}: the run folder must be a filesystem path (on a cluster, a shared mount "
            "such as /mnt/shared/runs); pretrain.storage_path may be an object-storage URL"
        )
    root = str(Path(location).expanduser().absolute())
    storage = job.pretrain.storage_path if job.pretrain and job.pretrain.storage_path else None
    if storage is None:
        return RunLayout(root, job.name, root, PRETRAIN_DIR)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().absolute())
    return RunLayout(root, job.name, storage, job.name)


def job_and_run_folder(target: str) -> tuple[Path, str | None]:
    """(job file, run folder) of a command's RUN|JOB argument: a run folder's own job file, or a job file
    whose run folder is its own (None)."""
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / JOB_FILE).is_file():
            raise ConfigError(
                f"{target}: not a vitpipe run folder (no {JOB_FILE}); give the run folder or its job"
            )
        return path / JOB_FILE, str(path)
    if not path.is_file():
        raise ConfigError(f"{target}: no such run folder or job file")
    return path, None
