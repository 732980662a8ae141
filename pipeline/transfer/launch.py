"""`vitpipe finetune` / `vitpipe evaluate`: every (target, mode) as its own Ray task, all submitted at once,
results gathered as they finish. A target that fails is reported beside the others' results, not instead.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray

from pipeline.config import AnyModel, EvaluateConfig, FinetuneConfig
from pipeline.console import detail, say
from pipeline.metrics import METRICS_FILE
from pipeline.ray_session import check_resources, connect_ray, task_error
from pipeline.storage import join, local_folder, publish_folder, remove_folder, resolve
from pipeline.tracking import OFF, StepLogger, TrackingTarget, end, open_child
from pipeline.transfer.plan import TargetError, TargetPlan, check_fits, plan_target, target_architecture
from pipeline.transfer.report import RESULTS_MD, write_results
from pipeline.transfer.sweep import choose, is_member_folder, member_folder, write_group_result
from pipeline.transfer.task import RESULT_FILE, TaskSettings, transfer_task
from vit.config import Architecture


@dataclass(frozen=True)
class TransferResult:
    out: str
    document: dict[str, Any]
    table: str

    @property
    def failures(self) -> list[dict[str, Any]]:
        return self.document["failures"]

    def summary(self) -> str:
        finished = len(self.document["results"])
        return (
            f"{finished} run(s) finished, {len(self.failures)} failed; results in {self.out} "
            f"({RESULTS_MD}, results.json, results.png)\n\n{self.table}"
        )


def read_architecture(weights: str) -> Architecture:
    """The architecture of a vitpipe or HF weights folder (path or URL); errors name the folder."""
    from vit.weights import read_checkpoint

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
) -> tuple[list[tuple[TargetPlan, str, Architecture]], list[dict[str, Any]]]:
    """(target, mode, architecture) of every run that can start, and a failure for each that cannot.

    The architecture is the weights' (`architecture`), else the one `model` describes for the target.
    """
    runs, failures = [], []
    for name, directory in targets.items():
        try:
            target = plan_target(name, directory, image_size)
            fitted = architecture if architecture is not None else _model_for(model, target)
            check_fits(target, fitted, weights or "the model config")
        except TargetError as error:
            failures.extend({"target": name, "mode": mode, "error": str(error)} for mode in modes)
            say(f"transfer: skipping {error}", err=True)
            continue
        detail(f"transfer: {target.describe()}")
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


def _refuse_foreign(folder: str) -> None:
    """A (target, mode) folder is replaced only when it is vitpipe's: empty, holding the metrics a task
    writes first or the result.json written last, or the sweep's member folders, each of them a task's by
    the same rule. Anything else there is named and kept."""
    filesystem, path = resolve(folder)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return
    names = {info.base_name for info in filesystem.get_file_info(pafs.FileSelector(path))}
    members = {name for name in names if is_member_folder(name)}
    ours = not names or names & {RESULT_FILE, METRICS_FILE} or names == members
    if not ours:
        shown = ", ".join(sorted(names)[:5])
        raise FileExistsError(
            f"{folder}: holds files a vitpipe fine-tuning task did not write ({shown}); vitpipe replaces "
            "only its own. Choose another --out or move them"
        )
    for member in sorted(members):
        _refuse_foreign(join(folder, member))


def absolute(location: str) -> str:
    """A URL as it is; a local path made absolute."""
    return location if "://" in location else str(Path(location).expanduser().absolute())


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it (local paths resolved; URLs compared as written)."""

    def scheme(location: str) -> str:
        return location.split("://", 1)[0] if "://" in location else ""

    inner, outer = resolve(path)[1].rstrip("/") + "/", resolve(folder)[1].rstrip("/") + "/"
    return scheme(path) == scheme(folder) and inner.startswith(outer)


def transfer(
    finetune: FinetuneConfig,
    evaluate: EvaluateConfig | None,
    targets: dict[str, str],
    *,
    out: str,
    weights: str | None = None,
    model: AnyModel | None = None,
    train: bool = True,
    name: str = "",
    address: str | None = None,
    tracking: TrackingTarget = OFF,
) -> TransferResult:
    """Fine-tune (or, with `train=False`, only evaluate) every target in every mode; write the results.

    `weights` are the pretrained weights (needed by mode `pretrained`); `model` describes the model that
    mode `scratch` builds when there are no weights to take the architecture from. Each task is a child
    run of `tracking`.
    """
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
        targets, weights=weights, architecture=architecture, model=model, modes=modes,
        image_size=finetune.image_size,
    )  # fmt: skip
    settings = {
        "name": name,
        "weights": weights,
        "train": train,
        "finetune": finetune.model_dump(mode="json"),
        "evaluate": evaluate.model_dump(mode="json") if evaluate else None,
        "targets": dict(targets),
    }
    results: list[dict[str, Any]] = []
    if runs:
        connect_ray(address)
        needs = {"CPU": finetune.cpus_per_task, "GPU": finetune.gpus_per_task}
        remedy = "lower cpus_per_task or gpus_per_task, or add bigger nodes"
        check_resources(needs, "finetune: a task", remedy, per_node=True)
        results, task_failures = _run_tasks(
            finetune, evaluate, runs, weights=weights, out=out, train=train, tracking=tracking
        )
        failures += task_failures
    with tempfile.TemporaryDirectory(prefix="vitpipe-results-") as scratch:
        document = write_results(Path(scratch) / "results", results, failures, settings)
        table = (Path(scratch) / "results" / RESULTS_MD).read_text()
        publish_folder(Path(scratch) / "results", out)
    return TransferResult(out, document, table)


def _run_tasks(
    finetune: FinetuneConfig,
    evaluate: EvaluateConfig | None,
    runs: list[tuple[TargetPlan, str, Architecture]],
    *,
    weights: str | None,
    out: str,
    train: bool,
    tracking: TrackingTarget = OFF,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Submit every (target, mode, rate), collect each as it finishes, then each (target, mode)'s result:
    its member of best validation top-1 (`sweep.choose`). A failed task becomes a failure entry; a
    (target, mode) is reported from the members that finished."""
    groups = [join(out, target.name, mode) for target, mode, _ in runs]
    for group in groups:
        _refuse_foreign(group)
    pending: dict[Any, tuple[str, str, float | None, TrackingTarget]] = {}
    parents: dict[tuple[str, str], TrackingTarget] = {}
    for (target, mode, architecture), group in zip(runs, groups, strict=True):
        remove_folder(group)  # a new command starts afresh; a retried task appends to its log
        params = {"target": target.name, "mode": mode, "weights": weights, "train": train,
                  "finetune": finetune.model_dump(mode="json")}  # fmt: skip
        parent = open_child(tracking, f"{target.name}/{mode}", f"{target.name}/{mode}", params)
        parents[target.name, mode] = parent
        for index, lr in enumerate(finetune.lr_sweep if train else (None,)):
            member = _member_settings(finetune, evaluate, (target, mode, architecture), weights, train, group,
                                      parent, lr, probe=index == 0)  # fmt: skip
            pending[_submit(member, finetune)] = (target.name, mode, lr, member.tracking)
    detail(f"transfer: {len(pending)} task(s) submitted")
    members, failures = _gather(pending)
    results = []
    for (target, mode), parent in parents.items():
        finished = [r for r in members if (r["target"], r["mode"]) == (target, mode)]
        if not finished:
            end(parent, "FAILED")
            continue
        result = choose(finished) if train else finished[0]
        if train:
            write_group_result(join(out, target, mode), result)
            _track_choice(parent, result)
        results.append(result)
    return results, failures


def _member_settings(
    finetune: FinetuneConfig,
    evaluate: EvaluateConfig | None,
    run: tuple[TargetPlan, str, Architecture],
    weights: str | None,
    train: bool,
    group: str,
    parent: TrackingTarget,
    lr: float | None,
    *,
    probe: bool,
) -> TaskSettings:
    """One task's settings: the sweep's member at `lr` in its own folder and tracking run (evaluating
    alone, `lr` None: the group's folder and run)."""
    target, mode, architecture = run
    if lr is None:
        return TaskSettings(target, mode, weights, architecture, train, finetune, evaluate, group, parent)
    tracking = open_child(parent, f"lr={lr:g}", f"{target.name}/{mode}/lr={lr:g}", {"lr": lr})
    folder = member_folder(group, lr)
    return TaskSettings(target, mode, weights, architecture, train, finetune.at_rate(lr), evaluate, folder,
                        tracking, probe)  # fmt: skip


def _submit(settings: TaskSettings, finetune: FinetuneConfig) -> Any:
    options = {
        "num_cpus": finetune.cpus_per_task,
        "num_gpus": finetune.gpus_per_task,
        "max_retries": finetune.max_retries,
        "retry_exceptions": False,  # a bad target fails the same way again; only a lost worker is retried
    }
    name = f"transfer:{settings.label.replace(' lr ', '/lr=')}"
    return ray.remote(transfer_task).options(name=name, **options).remote(settings)


def _gather(
    pending: dict[Any, tuple[str, str, float | None, TrackingTarget]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every task's result as it finishes; a failed one becomes a failure entry naming its rate."""
    started = time.perf_counter()
    results, failures = [], []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        target, mode, lr, child = pending.pop(ready[0])
        label = f"{target}/{mode}" + (f" lr {lr:g}" if lr is not None else "")
        elapsed = time.perf_counter() - started
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayError as error:
            message = task_error(error)
            failures.append({"target": target, "mode": mode, "lr": lr, "error": message})
            end(child, "FAILED")
            say(f"transfer: {label} FAILED after {elapsed:.0f}s: {message}", err=True)
            continue
        results.append(result)
        top1 = f"test top-1 {result['top1']:.4f}" if result.get("top1") is not None else "evaluated"
        detail(f"transfer: {label} done after {elapsed:.0f}s, {top1}")  # its last progress line said so
    return results, failures


def _track_choice(parent: TrackingTarget, result: dict[str, Any]) -> None:
    """The chosen rate and its scores into the (target, mode)'s tracking run, which then ends."""
    if not parent.enabled:
        return
    scores = {"lr": result["lr"], "val_top1": result.get("val_top1"), "test_top1": result.get("top1")}
    for shots, entry in (result.get("fewshot") or {}).items():
        scores[f"fewshot_{shots}shot"] = entry.get("mean")
    logger = StepLogger(parent)
    logger.log({"step": result.get("steps", 0), **{k: v for k, v in scores.items() if v is not None}})
    logger.close()
    end(parent, "FINISHED")
