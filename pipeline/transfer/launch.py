"""`vitpipe finetune` / `vitpipe evaluate`: every (target, mode) as its own Ray task, all submitted at once,
results gathered as they finish. A target that fails is reported beside the others' results, not instead.
With `finetune.lr_extend`, a (target, mode) whose rate is chosen at an edge of its grid runs one more rate
beyond that edge, in rounds: every such (target, mode)'s next rate at once, then every choice again.
"""

from __future__ import annotations

import posixpath
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray

from pipeline.console import detail, say
from pipeline.metrics import METRICS_FILE
from pipeline.ray_session import check_resources, connect_ray, task_error
from pipeline.storage import join, publish_folder, remove_entries, remove_folder, resolve
from pipeline.tracking import OFF, StepLogger, TrackingTarget, end, open_child
from pipeline.transfer.plan import TransferPlan, TransferTask
from pipeline.transfer.report import RESULTS_MD, write_results
from pipeline.transfer.reuse import reusable, run_keys
from pipeline.transfer.sweep import (
    choose,
    edge_of,
    is_member_folder,
    member_folder,
    next_rate,
    reachable_rates,
    with_grid,
    write_group_result,
)
from pipeline.transfer.task import RESULT_FILE, TaskSettings, transfer_task


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


def clear_groups(out: str) -> None:
    """Remove every (target, mode) folder of the transfer folder `out`, what a redo must not reuse; one
    holding files vitpipe did not write is refused (`_refuse_foreign`) before any folder goes."""
    filesystem, root = resolve(out)
    targets = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    groups = [
        join(out, target.base_name, mode.base_name)
        for target in targets
        if target.type == pafs.FileType.Directory
        for mode in filesystem.get_file_info(pafs.FileSelector(target.path))
        if mode.type == pafs.FileType.Directory
    ]
    for group in groups:
        _refuse_foreign(group)
    for group in groups:
        remove_folder(group)


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


def transfer(
    plan: TransferPlan,
    *,
    name: str = "",
    address: str | None = None,
    tracking: TrackingTarget = OFF,
    reuse: bool = False,
) -> TransferResult:
    """Run every task of `plan` (from `plan_transfer`: fine-tune, or only evaluate, every target in every
    mode) and write the results into `plan.out`; each (target, mode) is a child run of `tracking`. With
    `reuse` (not a forced redo), a member of a sweep finished earlier with its same settings (`reuse.py`)
    is taken as it is, not trained again."""
    results: list[dict[str, Any]] = []
    failures = list(plan.failures)
    if plan.tasks:
        results, task_failures = _run_tasks(plan, address, tracking, reuse)
        failures += task_failures
    with tempfile.TemporaryDirectory(prefix="vitpipe-results-") as scratch:
        document = write_results(Path(scratch) / "results", results, failures, plan.settings(name))
        table = (Path(scratch) / "results" / RESULTS_MD).read_text()
        publish_folder(Path(scratch) / "results", plan.out)
    return TransferResult(plan.out, document, table)


Member = tuple[str, str, float | None]  # (target, mode, rate) of a task
Group = tuple[str, str]  # (target, mode)


@dataclass
class _Progress:
    """A command's runs so far: the finished members (`reused`: those kept from an earlier command), the
    failures, and each (target, mode)'s grid of rates with the extensions that grew it."""

    members: list[dict[str, Any]]
    reused: set[Member]
    grids: dict[Group, list[float]]
    extended: dict[Group, list[dict[str, Any]]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def finished(self, group: Group) -> list[dict[str, Any]]:
        """The (target, mode)'s finished members, kept or run now."""
        return [r for r in self.members if (r["target"], r["mode"]) == group]


def _run_tasks(
    plan: TransferPlan, address: str | None, tracking: TrackingTarget, reuse: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Submit every task not kept from an earlier command, collect each as it finishes, extend the grid of
    each (target, mode) whose choice lands at an edge (`_extend`), then each (target, mode)'s result: its
    member of best validation top-1 (`sweep.choose`). A failed task becomes a failure entry; a (target,
    mode) is reported from the members that finished."""
    for target, mode in plan.groups():
        _refuse_foreign(join(plan.out, target.name, mode))
    reach = _reachable(plan)
    keys = run_keys(plan, [*plan.tasks, *reach])
    kept = reusable(plan, keys) if reuse else {}
    later = reusable(plan, keys, reach) if reuse else {}  # extensions an earlier command ran
    parents = _open_groups(plan, tracking, {**kept, **later})
    todo = [task for task in plan.tasks if (task.target.name, task.mode, task.lr) not in kept]
    if kept:
        say(
            f"transfer: {len(kept)} of {len(plan.tasks)} run(s) kept from an earlier command with the same "
            f"settings; {len(todo)} to run"
        )
    grids = {(target.name, mode): list(plan.finetune.lr_sweep) for target, mode in plan.groups()}
    progress = _Progress(list(kept.values()), set(kept), grids)
    _run_members(plan, todo, keys, parents, address, progress)
    _extend(plan, keys, parents, address, later, progress)
    for member in set(later) - progress.reused:  # not reached this time: not this command's
        remove_folder(member_folder(join(plan.out, member[0], member[1]), member[2]))
    return _group_results(plan, parents, progress), progress.failures


def _reachable(plan: TransferPlan) -> list[TransferTask]:
    """Every member the grid's extensions (`finetune.lr_extend`) could add, of every (target, mode)."""
    if not plan.train:
        return []
    rates = reachable_rates(plan.finetune.lr_sweep, plan.finetune.lr_extend)
    return [plan.task_at(target.name, mode, lr) for target, mode in plan.groups() for lr in rates]


def _run_members(
    plan: TransferPlan,
    todo: list[TransferTask],
    keys: dict[tuple[str, str, float], str],
    parents: dict[Group, TrackingTarget],
    address: str | None,
    progress: _Progress,
) -> None:
    """Submit `todo` all at once, each member in its own folder and tracking run, and gather them."""
    if not todo:
        return
    connect_ray(address)
    remedy = "lower cpus_per_task or gpus_per_task, or add bigger nodes"
    check_resources(plan.needs(), "finetune: a task", remedy, per_node=True)
    pending: dict[Any, tuple[str, str, float | None, TrackingTarget]] = {}
    for task in todo:
        key = keys.get((task.target.name, task.mode, task.lr))
        member = _member_settings(plan, task, parents[task.target.name, task.mode], key)
        pending[_submit(member, plan)] = (task.target.name, task.mode, task.lr, member.tracking)
    detail(f"transfer: {len(pending)} task(s) submitted")
    finished, failures = _gather(pending)
    progress.members += finished
    progress.failures += failures


def _extend(
    plan: TransferPlan,
    keys: dict[tuple[str, str, float], str],
    parents: dict[Group, TrackingTarget],
    address: str | None,
    later: dict[Member, dict[str, Any]],
    progress: _Progress,
) -> None:
    """Rounds of `finetune.lr_extend` at most: each (target, mode) whose choice lies at an edge of its grid
    gets the next rate beyond it, all such members run together (or are kept from an earlier command),
    and every choice is made again. A (target, mode) extends once a round, so `lr_extend` times at most."""
    for _ in range(plan.finetune.lr_extend if plan.train else 0):
        tasks = [task for group in progress.grids if (task := _extension(plan, group, progress))]
        if not tasks:
            return
        members = [(task.target.name, task.mode, task.lr) for task in tasks]
        reused = [member for member in members if member in later]
        progress.members += [later[member] for member in reused]
        progress.reused |= set(reused)
        todo = [task for task, member in zip(tasks, members, strict=True) if member not in later]
        _run_members(plan, todo, keys, parents, address, progress)


def _extension(plan: TransferPlan, group: Group, progress: _Progress) -> TransferTask | None:
    """(target, mode)'s next member beyond the edge of its grid its choice lies at, recorded in its grid
    and extensions; None when its choice is inside (or it has no finished member)."""
    finished, grid = progress.finished(group), progress.grids[group]
    edge = edge_of(choose(finished), grid) if finished else None
    if edge is None:
        return None
    edge_rate, added = (grid[0] if edge == "low" else grid[-1]), next_rate(grid, edge)
    steps = progress.extended.setdefault(group, [])
    steps.append({"edge": edge, "from": edge_rate, "added": added})
    progress.grids[group] = sorted([*grid, added])
    say(
        f"transfer: {group[0]}/{group[1]}: lr {edge_rate:g} scored best at the {edge} edge of the grid; "
        f"adding lr {added:g} (extension {len(steps)} of {plan.finetune.lr_extend})"
    )
    return plan.task_at(*group, added)


def _open_groups(
    plan: TransferPlan, tracking: TrackingTarget, kept: dict[Member, dict[str, Any]]
) -> dict[Group, TrackingTarget]:
    """Each (target, mode)'s folder started afresh but for the member folders kept, and its tracking run."""
    parents: dict[Group, TrackingTarget] = {}
    for target, mode in plan.groups():
        group = join(plan.out, target.name, mode)
        keep = {
            posixpath.basename(member_folder(group, lr)) for t, m, lr in kept if (t, m) == (target.name, mode)
        }
        if keep:
            remove_entries(group, lambda entry, keep=keep: entry not in keep)
        else:
            remove_folder(group)  # a retried task appends to its log
        params = {
            "target": target.name,
            "mode": mode,
            "weights": plan.weights,
            "train": plan.train,
            "finetune": plan.finetune.model_dump(mode="json"),
        }
        parents[target.name, mode] = open_child(
            tracking, f"{target.name}/{mode}", f"{target.name}/{mode}", params
        )
    return parents


def _group_results(
    plan: TransferPlan, parents: dict[Group, TrackingTarget], progress: _Progress
) -> list[dict[str, Any]]:
    """Each (target, mode)'s result from its finished members (the chosen rate of a sweep, with the grid
    it was chosen from), written beside them; a warning for a choice its validation split could not make
    or one still at an edge of the grid."""
    results = []
    for (target, mode), parent in parents.items():
        finished = progress.finished((target, mode))
        if not finished:
            end(parent, "FAILED")
            continue
        if not plan.train:
            results.append(finished[0])
            continue
        reused = {lr for t, m, lr in progress.reused if (t, m) == (target, mode)}
        grid, extended = progress.grids[target, mode], progress.extended.get((target, mode), [])
        result = with_grid(choose(finished, reused), grid, extended, plan.finetune.lr_extend)
        for note in ("lr_choice_warning", "lr_at_edge"):
            if result.get(note):
                say(f"transfer: warning: {target}/{mode}: {result[note]}", err=True)
        write_group_result(join(plan.out, target, mode), result)
        _track_choice(parent, result)
        results.append(result)
    return results


def _member_settings(
    plan: TransferPlan, task: TransferTask, parent: TrackingTarget, run_key: str | None = None
) -> TaskSettings:
    """One task's settings: the sweep's member at its rate in its own folder and tracking run, with its
    run key (evaluating alone, rate None: the group's folder and run)."""
    group = join(plan.out, task.target.name, task.mode)
    common = (
        task.target,
        task.mode,
        plan.weights,
        task.architecture,
        plan.train,
        task.finetune,
        task.recipe,
        plan.evaluate,
    )
    if task.lr is None:
        return TaskSettings(*common, group, parent)
    lr = task.lr
    tracking = open_child(parent, f"lr={lr:g}", f"{task.target.name}/{task.mode}/lr={lr:g}", {"lr": lr})
    return TaskSettings(*common, member_folder(group, lr), tracking, task.probe, run_key)


def _submit(settings: TaskSettings, plan: TransferPlan) -> Any:
    options = {
        "num_cpus": plan.finetune.cpus_per_task,
        "num_gpus": plan.finetune.gpus_per_task,
        "max_retries": plan.finetune.max_retries,
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
