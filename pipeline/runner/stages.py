"""What each step of a job does: the thin calls into the stage entry points (datasets, preprocess,
pretrain, transfer, study, analysis, report), with the run's folders as their inputs and outputs.

Each runner imports its stage when it runs: those bring Ray Train, Ray Data and torch (~6 s), which a
cached step or a job refused by its checks never needs."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray  # noqa: TID253 (steps run on Ray; the stages' launches stay lazy)

from pipeline.analysis.subjects import ANALYSIS_FILE, run_subjects, study_subjects
from pipeline.config import EvaluateConfig, digest
from pipeline.console import detail, say
from pipeline.datasets.build import build_dataset
from pipeline.datasets.card import CARD_FILE, read_card
from pipeline.preprocess.manifest import MANIFEST_FILE, failure_advice
from pipeline.preprocess.summary import write_grid
from pipeline.pretrain.checkpoints import EXPORT_DIR, VITPIPE_DIR, is_run_output, latest_checkpoint
from pipeline.pretrain.control import TrainingStopped, start_control
from pipeline.pretrain.plan import check_pretrain, training_split
from pipeline.ray_session import connect_ray, task_error  # noqa: TID253
from pipeline.runner.plan import JobPlan, Step
from pipeline.runner.records import file_fingerprint, fresh_fingerprint, read_record
from pipeline.runner.report import write_report
from pipeline.storage import absolute, join, remove_entries, remove_folder, resolve
from pipeline.study.plan import POINT_FILE, Point, point_finetune, point_model, point_pretrain, study_job
from pipeline.study.subsets import draw_subsets, subset_file
from pipeline.tracking import OFF, TrackingTarget, log_artifacts
from pipeline.transfer.report import RESULTS_JSON, RESULTS_MD, RESULTS_PLOT
from vit.config import CONFIG_FILE

# Steps whose outputs a changed key does not clear: a pretraining run's (or a study point's) checkpoints
# are resumed (check_pretrain refuses checkpoints of another model); a finetune step keeps each run whose
# own key (pipeline.transfer.reuse: weights, target, recipe at its rate) still matches, so a rate added to
# the sweep trains that rate alone. Only --force / --from start afresh.
RESUMED_ON_CHANGE = frozenset({"pretrain", "study", "finetune"})


@dataclass
class StepOutcome:
    fingerprint: str
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the step finished but failed (outputs written, e.g. some targets failed)


@dataclass
class RunContext:
    plan: JobPlan
    address: str | None
    ray_was_running: bool = field(default_factory=ray.is_initialized)
    tracking: TrackingTarget = OFF  # the run's tracking run; each running step has a child
    children: dict[str, TrackingTarget] = field(default_factory=dict)

    def tracked(self, step: Step) -> TrackingTarget:
        return self.children.get(step.id, OFF)

    def ensure_ray(self) -> None:
        """Start or join Ray when a step needs it (a fully cached run never does); the pretrain and
        transfer stages join it themselves, after their checks, so a refused step never starts Ray."""
        connect_ray(self.address)

    def close(self) -> None:
        """Shut down a Ray this run started or joined."""
        if not self.ray_was_running and ray.is_initialized():
            ray.shutdown()


def pretrained_weights(plan: JobPlan) -> str | None:
    """The weights the finetune stage starts from: finetune.weights, else the pretraining export."""
    finetune = plan.job.finetune
    if finetune is not None and finetune.weights is not None:
        return finetune.weights
    if plan.job.pretrain is not None:
        return join(plan.layout.pretrain, EXPORT_DIR, VITPIPE_DIR)
    return None


def run_datasets(context: RunContext, step: Step, clear: bool) -> StepOutcome:
    """Build the dataset (always from scratch: the builders are quick and write the same bytes); Ray is
    joined once its checks passed (classes that differ between splits are refused before it starts)."""
    config = context.plan.job.datasets[step.item or ""]
    detail(build_dataset(config, Path(step.output), overwrite=True, preview=True, address=context.address))
    card = read_card(step.output)
    card.pop("seconds", None)  # how long the build took is the one thing that differs between rebuilds
    return StepOutcome(digest(card), {"folder": step.output})


def run_preprocess(context: RunContext, step: Step, clear: bool) -> StepOutcome:
    """Preprocess the entry's input; shards an earlier attempt finished are kept unless `clear`."""
    job, name = context.plan.job, step.item or ""
    config = job.preprocess[name]
    reads = config.input or name
    source = context.plan.layout.dataset(reads) if reads in job.datasets else reads
    from pipeline.preprocess.run import preprocess

    if clear:
        remove_folder(step.output)
    context.ensure_ray()
    result = preprocess(source, step.output, config, overwrite=True)
    grid = write_grid(step.output)
    detail(result.summary() + f"\n  samples: {grid}")  # the progress line said it; failures are warned of
    totals = result.manifest["totals"]
    if totals["failed"] or totals["unreadable_shards"]:
        failed, unreadable = totals["failed"], totals["unreadable_shards"]
        advice = "".join(f"\n  {line}" for line in failure_advice(result.manifest["failures"]))
        say(
            f"vitpipe: warning: {step.id}: {failed:,} sample(s) failed, {unreadable} shard(s) unreadable "
            f"({result.failure_rate:.2%}); details in {step.output}/{MANIFEST_FILE}{advice}",
            err=True,
        )
    fingerprint = file_fingerprint(posixpath.join(step.output, MANIFEST_FILE))
    error = "more samples failed than max_failure_rate allows" if result.exceeded else None
    return StepOutcome(fingerprint, {"folder": step.output, "samples": grid}, error)


def run_pretrain(context: RunContext, step: Step, clear: bool) -> StepOutcome:
    """Pretrain; a run folder with checkpoints is resumed from the newest unless `clear` (a forced redo:
    see RESUMED_ON_CHANGE)."""
    config, layout = context.plan.job.pretrain, context.plan.layout
    if config is None:
        raise ValueError("the job has no pretrain section")
    latest = latest_checkpoint(layout.pretrain)
    if clear and latest is not None:
        say(f"pretrain: redone on request: discarding the {latest.step:,} steps trained in {layout.pretrain}")
    if clear:  # the run's own outputs only: the folder may be the run folder, or hold others' files
        remove_entries(layout.pretrain, is_run_output)
    probes = context.plan.job.probes()
    targets = step.settings["eval"]["targets"] if probes is not None else None  # by name, as folders
    plan = check_pretrain(
        config.model_copy(update={"eval": probes}),
        context.plan.patch_dir(config.data),
        layout.pretrain,
        probe_targets=targets,
    )
    if latest is not None and not clear:  # said once the plan holds: a refused run resumes nothing
        say(f"resuming pretraining from its checkpoint at step {latest.step:,}")

    from pipeline.pretrain.launch import pretrain

    tracking = context.tracked(step)
    result = pretrain(
        plan,
        storage=layout.pretrain_storage,
        name=layout.pretrain_name,
        address=context.address,
        tracking=tracking,
    )
    say(result.summary())
    log_artifacts(tracking, [result.loss_plot, *result.export.described_files()])
    outputs = {
        "run": result.run_dir,
        "steps": result.steps,
        "weights": result.export.vitpipe,
        "hf": result.export.hf,
    }
    return StepOutcome(fresh_fingerprint(), outputs)


def run_transfer(context: RunContext, step: Step, clear: bool) -> StepOutcome:
    """Fine-tune and evaluate every target (finetune), or evaluate the weights as they are (evaluate);
    transfer() replaces each (target, mode) folder it runs, keeping (unless `clear`) the runs of it whose
    own key still matches."""
    plan = context.plan
    finetune = plan.job.finetune
    if finetune is None:
        raise ValueError("the job has no finetune section")
    from pipeline.transfer.launch import transfer
    from pipeline.transfer.plan import plan_transfer

    train = step.stage == "finetune"
    planned = plan_transfer(
        finetune,
        plan.job.evaluate if plan.job.evaluate is not None or train else EvaluateConfig(),
        dict(step.settings["targets"]),
        out=step.output,
        weights=pretrained_weights(plan),
        model=plan.job.pretrain.model if plan.job.pretrain else None,
        train=train,
    )
    tracked = context.tracked(step)
    result = transfer(planned, name=plan.job.name, address=context.address, tracking=tracked, reuse=not clear)
    say(result.summary().split("\n\n", 1)[0])  # the table comes once, at the end of the run
    if "://" not in result.out:
        log_artifacts(context.tracked(step), [Path(result.out) / RESULTS_MD, Path(result.out) / RESULTS_PLOT])
    if train and plan.job.pretrain is not None and finetune.weights is None:
        _card_results(join(plan.layout.pretrain, EXPORT_DIR), result.document["results"])
    failed = [f["target"] + (f"/{f['mode']}" if f.get("mode") else "") for f in result.failures]
    for where, failure in zip(failed, result.failures, strict=True):
        say(f"vitpipe: {where} failed: {failure['error']}", err=True)
    error = f"{len(failed)} transfer run(s) failed: {', '.join(failed)}" if failed else None
    return StepOutcome(fresh_fingerprint(), {"folder": result.out}, error)


def _card_results(export: str, results: list[dict[str, Any]]) -> None:
    """The run's model cards, written again with how its weights transferred; a card that cannot be
    written is a warning (the results are in the transfer folder all the same)."""
    from pipeline.pretrain.export import add_transfer_results

    own = [r for r in results if r.get("mode") == "pretrained"]
    try:
        add_transfer_results(export, own)
    except OSError as error:
        say(f"vitpipe: warning: the model cards in {export} keep no transfer results: {error}", err=True)


def run_study_subsets(context: RunContext, step: Step, clear: bool) -> StepOutcome:
    """Draw the study's nested subsets of the corpus (manifests over its patch files)."""
    study = study_job(context.plan.job, context.plan.source)
    corpus = context.plan.patch_dir(study.corpus)
    split = training_split(corpus, study.pretrain.split)
    written = draw_subsets(corpus, split, study.study.sizes, study.study.subset_seed, step.output)
    sizes = ", ".join(f"{size:,}" for size in written)
    say(f"study: nested subsets of {corpus} ({split!r}) of {sizes} images in {step.output}")
    return StepOutcome(
        digest({size: file_fingerprint(path) for size, path in written.items()}),
        {"subsets": {str(size): path for size, path in written.items()}},
    )


def submit_study_point(context: RunContext, step: Step, clear: bool) -> tuple[ray.ObjectRef, Any]:
    """Start one study point's task (pipeline.study.launch): its ref, which `collect_study_point` takes, and
    its RunControl, made here on the driver's node, which the driver asks to stop on a signal."""
    from pipeline.study.launch import PointSettings, submit_point

    context.ensure_ray()
    plan = context.plan
    study = study_job(plan.job, plan.source)
    point = Point(**step.settings["point"])
    subsets = plan.step("study:subsets").output
    settings = PointSettings(
        point=point,
        model=point_model(study, point),
        pretrain=point_pretrain(study, point) if point.pretrained else None,
        corpus=plan.patch_dir(study.corpus),
        subset=subset_file(subsets, point.size) if point.pretrained else None,
        storage=plan.layout.study_storage(point.name),
        finetune=point_finetune(study, point),
        evaluate=study.evaluate,
        targets=dict(step.settings["targets"]),
        out=step.output,
        clear=clear,
        tracking=context.tracked(step),
        control=start_control(),
    )
    return submit_point(settings, plan.layout.root), settings.control


def collect_study_point(ref: ray.ObjectRef) -> StepOutcome:
    """A finished point's outcome; a point whose task failed raises what the task raised (a one-line
    error, not Ray's coloured traceback: the log keeps that), one stopped on request TrainingStopped."""
    try:
        summary = ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        raise (cause if isinstance(cause, Exception) else RuntimeError(task_error(error))) from error
    if "stopped" in summary:
        raise TrainingStopped(summary["stopped"])
    failed = [f"{f['target']}: {f['error']}" for f in summary["failures"]]
    error = f"{len(failed)} transfer run(s) failed: {'; '.join(failed)}" if failed else None
    return StepOutcome(
        fresh_fingerprint(), {"summary": summary["point"], "seconds": summary["seconds"]}, error
    )


def run_analyze(context: RunContext, step: Step, clear: bool) -> StepOutcome:
    """The paper's analyses of every ViT the run trained (pipeline.analysis), each model's folder
    replaced whole; a model whose analysis fails is named and the others are kept."""
    from pipeline.analysis.launch import analyze
    from pipeline.analysis.task import ImageSource
    from pipeline.transfer.plan import TEST_SPLIT

    plan = context.plan
    if plan.job.study is not None:
        vits = {name for name, model in plan.job.study.models.items() if model.family == "vit"}
        subjects = study_subjects(finished_points(plan), vits)
    else:
        export = (
            join(plan.layout.pretrain, EXPORT_DIR, VITPIPE_DIR) if plan.job.pretrain is not None else None
        )
        transfer = next((s.output for s in plan.steps if s.stage == "finetune"), None)
        subjects = run_subjects(export, transfer)
    images = dict(step.settings["images"], directory=absolute(step.settings["images"]["directory"]))
    if images["split"] != TEST_SPLIT:  # the pretraining data's ("." when its shards had no split folders)
        images["split"] = training_split(images["directory"], images["split"])
    source = ImageSource(**images)
    result = analyze(subjects, source, plan.job.analyze, step.output, address=context.address)
    say(result.summary())
    figures = [join(step.output, name) for name in result.index["figures"].values()]
    log_artifacts(context.tracked(step), [join(step.output, ANALYSIS_FILE), *figures])
    failed = [failure["model"] for failure in result.failures]
    error = f"{len(failed)} model(s) could not be analysed: {', '.join(failed)}" if failed else None
    return StepOutcome(fresh_fingerprint(), {"folder": step.output}, error)


def finished_points(plan: JobPlan) -> list[tuple[str, str]]:
    """The study's points whose record says done, `(name, folder)`: a point that failed or stopped since
    an earlier run wrote its point.json is no subject of this run's analyses."""
    points = [step for step in plan.steps if step.stage == "study" and step.concurrent]
    records = {step.id: read_record(plan.layout.stages, step.id) or {} for step in points}
    return [(step.item or "", step.output) for step in points if records[step.id].get("status") == "done"]


def run_report(context: RunContext, step: Step, clear: bool) -> StepOutcome:
    path = write_report(context.plan)
    detail(f"report: {path}")
    pictures = [path, *sorted((Path(path).parent / "report").glob("*.png"))]
    log_artifacts(context.tracking, pictures)  # MLflow: on the run itself
    log_artifacts(context.tracked(step), pictures)  # W&B has no parent run: on the report's own
    return StepOutcome(file_fingerprint(path), {"report": path})


RUNNERS: dict[str, Callable[[RunContext, Step, bool], StepOutcome]] = {
    "datasets": run_datasets,
    "preprocess": run_preprocess,
    "pretrain": run_pretrain,
    "finetune": run_transfer,
    "evaluate": run_transfer,
    "study": run_study_subsets,
    "analyze": run_analyze,
    "report": run_report,
}
# Steps that run beside each other (Step.concurrent): started all at once, each collected as it ends.
CONCURRENT_RUNNERS: dict[
    str, tuple[Callable[[RunContext, Step, bool], Any], Callable[[Any], StepOutcome]]
] = {
    "study": (submit_study_point, collect_study_point),
}


def outputs_present(step: Step) -> bool:
    """Whether what a finished step wrote is still there (someone may have deleted it since)."""
    if step.stage == "study":
        largest = max(step.settings.get("sizes") or [0])
        marker = subset_file("", largest) if step.item == "subsets" else POINT_FILE
        return _intact(join(step.output, marker))
    marker = {
        "datasets": CARD_FILE,
        "preprocess": MANIFEST_FILE,
        "pretrain": posixpath.join(EXPORT_DIR, VITPIPE_DIR, CONFIG_FILE),
        "finetune": RESULTS_JSON,
        "evaluate": RESULTS_JSON,
        "analyze": ANALYSIS_FILE,
        "report": "",
    }[step.stage]
    return _intact(join(step.output, marker) if marker else step.output)


def _intact(location: str) -> bool:
    """Whether a step's marker file is there and, for a JSON one, a JSON object: a damaged one (torn,
    hand-edited, truncated by a full disk) is named, and the step runs again rather than being trusted."""
    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return False
    if not path.endswith(".json"):
        return True
    try:
        with filesystem.open_input_stream(path) as stream:
            document = json.loads(stream.read())
    except (ValueError, OSError) as error:  # not JSON, not UTF-8, unreadable
        say(f"[run] {location}: damaged ({type(error).__name__}: {error}); its step runs again", err=True)
        return False
    if not isinstance(document, dict):
        say(f"[run] {location}: damaged (not a JSON object); its step runs again", err=True)
        return False
    return True
