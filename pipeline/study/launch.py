"""A study point as one Ray task: pretrain on its subset (its own Ray Train run), then transfer to every
target (its own Ray tasks). All missing points are submitted at once and Ray places each one's workers as
the cluster's resources allow, so a large cluster runs them side by side and a small one in turn.

Ray Train reserves its workers' resources, not those of the Ray Data readers that feed them: two runs
whose workers took every CPU would both wait forever for a reader. So a point pretrains only while it
holds one of the run's pretraining slots, as many as the cluster holds whole runs (workers and readers).
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from pipeline.console import say
from pipeline.pretrain.checkpoints import best_dir, is_run_output, read_best
from pipeline.pretrain.control import TrainingStopped
from pipeline.pretrain.launch import PretrainResult, pretrain
from pipeline.pretrain.plan import PretrainPlan, check_pretrain
from pipeline.storage import join, remove_entries, target_name, write_atomic
from pipeline.study.plan import POINT_FILE, Point
from pipeline.study.slots import point_needs, pretrain_slots
from pipeline.study.subsets import read_subset
from pipeline.tracking import OFF, TrackingTarget
from pipeline.transfer.launch import clear_groups, transfer
from pipeline.transfer.plan import plan_transfer
from vit.build import build_model
from vit.flops import train_flops

if TYPE_CHECKING:  # a point receives its sections as values; nothing here loads or checks a config
    from pipeline.config import AnyModel, EvaluateConfig, FinetuneConfig, PretrainConfig


@dataclass(frozen=True)
class PointSettings:
    """What one point's task receives."""

    point: Point
    model: AnyModel
    pretrain: PretrainConfig | None  # None for a scratch point
    corpus: str  # the corpus's patch folder
    subset: str | None  # the subset manifest of the point's size
    storage: str  # Ray Train storage of its pretraining run (the run is `pretrain` in it)
    finetune: FinetuneConfig
    evaluate: EvaluateConfig | None
    targets: dict[str, str]
    out: str  # the point's folder
    clear: bool  # redo: its old work is discarded (clear_point, on the driver) and none of it reused
    tracking: TrackingTarget = OFF  # the point's tracking run: its pretraining steps, its tasks as children
    control: Any = None  # its RunControl (pipeline.pretrain.control), which the driver asks to stop


def submit_point(settings: PointSettings, run: str) -> ray.ObjectRef:
    """Start the point's task. It holds no CPU itself: what it runs (the Ray Train workers, the data
    readers, the fine-tuning tasks) asks Ray for its own resources and waits for them."""
    if settings.clear:
        clear_point(settings)
    slots = pretrain_slots(point_needs(settings.pretrain), run) if settings.pretrain is not None else None
    remote = ray.remote(run_point).options(num_cpus=0, name=f"study:{settings.point.name}", max_retries=0)
    return remote.remote(settings, slots)


def clear_point(settings: PointSettings) -> None:
    """A point redone (--force study, --from) starts from nothing: its pretraining run's outputs and its
    fine-tuning results go, here on the driver before its task starts, so that a stop before the task got
    that far leaves nothing old for the next run (which resumes: its "continue with" has no --force)."""
    clear_groups(join(settings.out, "transfer"))  # first: files of others there refuse the redo
    remove_entries(join(settings.storage, "pretrain"), is_run_output)


def run_point(settings: PointSettings, slots: Any = None) -> dict[str, Any]:
    """The task's body: pretraining (unless a scratch point) in a slot, transfer, then OUT/point.json. A
    point asked to stop returns {point, stopped: why} where it stands: pretraining checkpoints its step,
    and no more work starts (a transfer under way finishes: fine-tuning keeps no checkpoint to resume)."""
    started = time.perf_counter()
    point = settings.point
    say(f"study: {point.name}: started", err=True)
    summary: dict[str, Any] = {
        "point": point.name,
        "size": point.size,
        "model": point.model,
        "seed": point.seed,
    }
    try:
        if point.pretrained:
            summary |= _pretrain_in_slot(settings, slots)
        done = "pretrained and exported; " if point.pretrained else ""
        _stop_if_asked(settings, f"{done}stopped on request before fine-tuning")
    except TrainingStopped as stop:  # the driver says it, with every other point's
        return {"point": point.name, "stopped": str(stop)}

    planned = plan_transfer(
        settings.finetune,
        settings.evaluate,
        settings.targets,
        out=join(settings.out, "transfer"),
        weights=summary.get("weights"),
        model=settings.model,
    )
    result = transfer(planned, name=point.name, tracking=settings.tracking, reuse=not settings.clear)
    summary["results"] = result.document["results"]
    summary["failures"] = result.failures
    summary["params"] = summary.get("params") or _scratch_params(result.document["results"])
    summary["seconds"] = time.perf_counter() - started
    write_atomic(posixpath.join(settings.out, POINT_FILE), json.dumps(summary, indent=2) + "\n")
    say(f"study: {point.name}: done in {summary['seconds']:.0f}s", err=True)
    return summary


def _pretrain_in_slot(settings: PointSettings, slots: Any) -> dict[str, Any]:
    """The point's pretraining once it holds one of the run's slots (unless asked to stop as it waited)."""
    say(f"study: {settings.point.name}: waiting for a pretraining slot", err=True)
    ray.get(slots.acquire.remote())
    try:
        _stop_if_asked(settings, "stopped on request before pretraining")
        return _pretrain(settings)
    finally:
        ray.get(slots.release.remote())


def _stop_if_asked(settings: PointSettings, where: str) -> None:
    """TrainingStopped (saying `where`) when the driver asked the point to stop (its RunControl says so)."""
    if settings.control is not None and ray.get(settings.control.stop_requested.remote()):
        raise TrainingStopped(where)


def _pretrain(settings: PointSettings) -> dict[str, Any]:
    config = settings.pretrain
    if config is None or settings.subset is None:
        raise ValueError(f"study point {settings.point.name}: pretrained, but no pretrain config or subset")
    run_dir = join(settings.storage, "pretrain")
    subset = read_subset(settings.subset)
    redo = f"--force study --point {settings.point.name}"
    beyond = f"raise the study's steps (or epochs) to go on from there, or redo the point with {redo}"
    probed = _probed_targets(settings)
    plan = check_pretrain(
        config, settings.corpus, run_dir, subset.rows, redo=redo, beyond_budget=beyond, probe_targets=probed
    )
    _refuse_other_probes(plan, run_dir, redo)
    result = pretrain(
        plan, storage=settings.storage, name="pretrain", tracking=settings.tracking, control=settings.control
    )
    images = result.steps * config.global_batch_size
    model = build_model(plan.architecture)
    return {
        "run": result.run_dir,
        "weights": result.export.vitpipe,
        "steps": result.steps,
        "epochs": images / plan.data.samples,
        "images_seen": images,
        "pretrain_flops": float(train_flops(plan.architecture)) * images,
        "params": sum(parameter.numel() for parameter in model.parameters()),
        "architecture": plan.architecture.describe(),
        "per_class": subset.per_class,
        **exported_step(result),
    }


def _refuse_other_probes(plan: PretrainPlan, run_dir: str, redo: str) -> None:
    """A point's run whose best step other probes scored (other shots, targets, hold-out) is refused: its
    probes would find the best again among the steps still to come, the last alone for a finished run,
    and the point would fine-tune from that step as if it were the best of its training."""
    if plan.probes is None:
        return
    for kind in ("raw", "ema"):
        best = read_best(best_dir(run_dir, kind))
        if best is not None and best["probe_key"] != plan.probes.key:
            raise ValueError(
                f"{run_dir}: its best {kind} step ({best['step']:,}) was scored by other probes (key "
                f"{best['probe_key']}; these probes' is {plan.probes.key}), which cannot score its steps "
                f"before this launch; redo the point with {redo}"
            )


def _probed_targets(settings: PointSettings) -> dict[str, str] | None:
    """The folders of the targets the point's probes score (of its finetune targets: the job checks so)."""
    probes = settings.pretrain.eval if settings.pretrain is not None else None
    if probes is None:
        return None
    # A target the job names by its folder goes by that folder's name (as its transfer's).
    names = [entry if entry in settings.targets else target_name(entry) for entry in probes.targets or ()]
    missing = [name for name in names if name not in settings.targets]
    if missing:
        raise ValueError(
            f"study point {settings.point.name}: pretrain.eval.targets {missing} are not among its targets "
            f"{sorted(settings.targets)}; probe the finetune targets (drop pretrain.eval.targets)"
        )
    return {name: settings.targets[name] for name in names}


def exported_step(result: PretrainResult) -> dict[str, Any]:
    """Which step of the point's pretraining its fine-tuning starts from, and why: `start_step` (the
    export's), `start_selection` (last or best, raw or EMA) and, with probes, the best step's record (the
    paper's protocol: the step of best validation few-shot accuracy)."""
    selection = result.export.selection
    found: dict[str, Any] = {
        "start_step": result.export.step,
        "start_selection": {"select": selection.select, "weights": selection.weights},
    }
    if result.plan.probes is not None:
        best = read_best(best_dir(result.run_dir, selection.weights))
        if best is not None:
            found["best"] = {key: best.get(key) for key in ("step", "score", "metric", "images_seen")}
    return found


def _scratch_params(results: list[dict[str, Any]]) -> int | None:
    """A scratch point's size: the parameters of the model it trained (on its first target)."""
    return next((r["trainable_parameters"] for r in results if r.get("trainable_parameters")), None)
