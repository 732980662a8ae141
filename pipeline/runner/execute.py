"""`vitpipe run JOB.yaml`: every step of the job in order, each skipped when its cache key matches a
finished record, resumed when a run before stopped inside it, redone with `--from` / `--force`.

A step's record is written "running" before it starts and "done" (or "failed") when it ends, so a
killed run leaves records that say where it stopped; pretraining then resumes from its newest
checkpoint and preprocessing from its finished shards. What each stage prints also goes to
RUN/logs/STAGE.log. A lock file keeps two runs out of one folder.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray  # noqa: TID253 (steps run as Ray tasks; the stages stay lazy)
import yaml

from pipeline.config import ConfigError
from pipeline.console import ANSI, log_to, say, session
from pipeline.metrics import format_seconds
from pipeline.pretrain.control import TrainingStopped, stop_on_signals
from pipeline.pretrain.plan import plan_pretrain
from pipeline.runner.layout import JOB_FILE
from pipeline.runner.lock import RUN_FILE, run_lock
from pipeline.runner.plan import EVALUATE, JobPlan, RunOptions, StageOptions, Step, load_plan
from pipeline.runner.preflight import check_before_run
from pipeline.runner.provenance import git_revision
from pipeline.runner.records import (
    external_fingerprints,
    is_side,
    key_matches,
    read_record,
    step_key,
    write_record,
)
from pipeline.runner.stages import (
    CONCURRENT_RUNNERS,
    RESUMED_ON_CHANGE,
    RUNNERS,
    RunContext,
    StepOutcome,
    outputs_present,
)
from pipeline.storage import write_atomic
from pipeline.tracking import OFF, open_child, open_run
from pipeline.tracking import end as end_tracking

RUN_LOG = "run.log"  # what is printed outside any step: Ray starting and stopping


STATUSES = ("ran", "resumed", "cached", "failed", "not run")


@dataclass
class StepReport:
    step: str
    status: str  # one of STATUSES
    seconds: float = 0.0
    note: str = ""


@dataclass
class RunSummary:
    plan: JobPlan
    steps: list[StepReport] = field(default_factory=list)
    seconds: float = 0.0
    single: bool = False  # a single-stage command: its step updates run.json's list, the others kept

    @property
    def failed(self) -> list[StepReport]:
        return [step for step in self.steps if step.status == "failed"]

    def table(self) -> str:
        lines = ["| step | status | time |", "| --- | --- | --- |"]
        for step in self.steps:
            note = f" ({step.note})" if step.note else ""
            lines.append(f"| {step.step} | {step.status}{note} | {format_seconds(step.seconds)} |")
        return "\n".join(lines)

    def summary(self) -> str:
        layout = self.plan.layout
        verdict = "FAILED" if self.failed else "finished"
        side = [step.step for step in self.steps if is_side(step.step)]
        what = f"{', '.join(side)} (a side command of run {self.plan.job.name!r})" if side else "run"
        name = "" if side else f" {self.plan.job.name!r}"
        lines = [f"{what}{name} {verdict} in {format_seconds(self.seconds)}; folder {layout.root}"]
        counts = {s: sum(1 for r in self.steps if r.status == s) for s in STATUSES}
        lines.append("  steps: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n))
        if Path(layout.report).is_file():
            lines.append(f"  report: {layout.report}")
        return "\n".join(lines)


# Steps that still run after a failed one, when every step they read wrote something (a study whose one
# point failed: the others' analyses and the report of them all).
AFTER_FAILURE = frozenset({"analyze", "report"})


def run_job(
    job_path: str | Path,
    *,
    run_dir: str | None = None,
    options: RunOptions | None = None,
    address: str | None = None,
    only: str | None = None,
    stage: StageOptions | None = None,
) -> RunSummary:
    """Run (or resume) the job's steps in order; stop at the first failed step. With `only`, run that
    stage's step alone (`vitpipe pretrain|finetune|evaluate JOB`): the same key, record, lock and run
    folder as in a whole run, its inputs taken from the steps before it, which must have run."""
    options = options or RunOptions()
    options.check()
    plan = load_plan(job_path, run_dir, stage or StageOptions(), evaluate=only == EVALUATE)
    root = Path(plan.layout.root)
    started = time.perf_counter()
    summary = RunSummary(plan, single=only is not None)
    context = RunContext(plan, address)
    fingerprints: dict[str, str] = {}
    steps = [s for s in plan.steps if not options.beyond(s.stage)]
    if options.points:
        steps = point_steps(plan, options.points)
    if only:
        *inputs, last = _steps_of(plan, only)
        _take_cached_inputs(plan, inputs, fingerprints)
        steps = [last]
    _check_forced(plan, steps, options)
    externals = check_before_run(
        plan, steps, pretrain_redone=options.redo("pretrain"), study_redone=options.redo("study")
    )  # or fail now
    root.mkdir(parents=True, exist_ok=True)
    with (
        session(verbose=True),
        log_to(Path(plan.layout.logs) / RUN_LOG, f"{plan.job.name} {_now()}"),
        run_lock(root),
        _pretrain_lock(plan, steps),
    ):
        _keep_job_file(plan, job_path, root)
        _write_run_file(plan, summary, "running")
        context.tracking = open_run(
            plan.job.tracking, str(root), plan.job.name, plan.job.model_dump(mode="json")
        )
        try:
            _run_steps(context, steps, options, fingerprints, externals, summary, started)
        except BaseException as error:  # run.json never stays "running" after its process has stopped
            summary.seconds = time.perf_counter() - started
            stopped = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            _write_run_file(plan, summary, stopped)
            for child in [*context.children.values(), context.tracking]:
                end_tracking(child, "KILLED" if stopped == "interrupted" else "FAILED")
            if isinstance(error, TrainingStopped):  # Ray ends inside the console: its last lines to the log
                context.close()
            raise
        summary.seconds = time.perf_counter() - started
        _write_run_file(plan, summary, "failed" if summary.failed else "finished")
        end_tracking(context.tracking, "FAILED" if summary.failed else "FINISHED")
        context.close()  # a Ray this run started ends here, its workers' last lines before the summary
    return summary


def _check_forced(plan: JobPlan, steps: list[Step], options: RunOptions) -> None:
    """`--force STAGE` of a stage this command does not run is refused: it would redo nothing, and say
    "cached" with exit 0 as if it had been redone."""
    running = {step.stage for step in steps}
    for stage in options.force:
        if stage in running:
            continue
        stages = ", ".join(dict.fromkeys(step.stage for step in plan.steps))
        if not any(step.stage == stage for step in plan.steps):
            inside = (
                " (a study pretrains and fine-tunes in its points: --force study)" if plan.job.study else ""
            )
            raise ConfigError(
                f"--force {stage}: {plan.source} has no {stage} step{inside}; its stages: {stages}"
            )
        limits = [f"--from {options.from_stage}"] if options.from_stage else []
        limits += [f"--until {options.until}"] if options.until else []
        limits += [f"--point {name}" for name in options.points]
        chosen = " ".join(limits) or "this command"
        raise ConfigError(
            f"--force {stage}: the {stage} step is not among those {chosen} runs; drop --force {stage} or "
            "run the steps that include it"
        )


def _pretrain_lock(plan: JobPlan, steps: list[Step]) -> contextlib.AbstractContextManager[None]:
    """A pretraining run folder outside the run's own (a `storage_path` of its own, on local disk) is
    locked too, so that `vitpipe export` of it waits for this run."""
    pretraining = plan.layout.pretrain
    root = Path(plan.layout.root)
    if "://" in pretraining or not any(step.stage == "pretrain" for step in steps):
        return contextlib.nullcontext()
    folder = Path(pretraining)
    if folder == root or root in folder.parents:
        return contextlib.nullcontext()
    folder.mkdir(parents=True, exist_ok=True)
    return run_lock(folder)


def _run_steps(
    context: RunContext,
    steps: list[Step],
    options: RunOptions,
    fingerprints: dict[str, str],
    externals: dict[str, dict[str, str]],
    summary: RunSummary,
    started: float,
) -> None:
    """Each step in order (concurrent ones next to each other together), run.json updated after each;
    after a failure only the analyses and the report still run, on what the finished steps wrote."""
    index = 0
    while index < len(steps):
        group = [steps[index]]
        while (
            group[-1].concurrent and index + len(group) < len(steps) and steps[index + len(group)].concurrent
        ):
            group.append(steps[index + len(group)])
        index += len(group)
        if group[0].concurrent:
            summary.steps += _run_concurrently(context, group, options, fingerprints, externals, summary)
        else:
            step = group[0]
            unread = any(dep not in fingerprints for dep in step.depends)
            if summary.failed and (step.stage not in AFTER_FAILURE or unread):
                summary.steps.append(StepReport(step.id, "not run"))
                continue
            summary.steps.append(
                _run_step(context, step, fingerprints, externals[step.id], options.redo(step.stage))
            )
        summary.seconds = time.perf_counter() - started
        _write_run_file(context.plan, summary, "running")


def _steps_of(plan: JobPlan, stage: str) -> list[Step]:
    """The step of `stage` last, after every step it reads (directly or not), in run order."""
    wanted = [step for step in plan.steps if step.stage == stage]
    if not wanted and plan.job.study is not None:
        raise ConfigError(
            f"{plan.source}: a study's pretrain and finetune sections are the recipe of its points, which "
            f"`vitpipe run {plan.source}` runs (`--force study` redoes them)"
        )
    if not wanted:
        raise ConfigError(f"{plan.source}: the job has no {stage} section")
    needed, frontier = set(), list(wanted[0].depends)
    while frontier:
        step_id = frontier.pop()
        if step_id not in needed:
            needed.add(step_id)
            frontier.extend(plan.step(step_id).depends)
    return [step for step in plan.steps if step.id in needed] + wanted[:1]


def point_steps(plan: JobPlan, names: tuple[str, ...]) -> list[Step]:
    """`vitpipe run JOB --point NAME`: those study points and every step they read, in run order, without
    the report (which reads every point): for debugging one point, or redoing it with `--force study`."""
    points = {step.item: step for step in plan.steps if step.stage == "study" and step.concurrent}
    if not points:
        raise ConfigError(f"{plan.source}: --point names a study point, and the job has no study section")
    unknown = [name for name in names if name not in points]
    if unknown:
        known = ", ".join(list(points)[:6]) + (", ..." if len(points) > 6 else "")
        raise ConfigError(f"{plan.source}: no study point {', '.join(unknown)}; its points are {known}")
    needed, frontier = set(), [dep for name in names for dep in points[name].depends]
    while frontier:
        step_id = frontier.pop()
        if step_id not in needed:
            needed.add(step_id)
            frontier.extend(plan.step(step_id).depends)
    needed |= {points[name].id for name in names}
    return [step for step in plan.steps if step.id in needed]


def probe_pretrain_data(
    job_path: str | Path, *, stage: StageOptions, steps: int | None, address: str | None = None
) -> str:
    """`vitpipe pretrain JOB --data-only`: the job's pretraining data path on its workers with no training
    (pipeline.pretrain.launch.probe_data), once its inputs are done; returns the folder of its records."""
    plan = load_plan(job_path, None, stage)
    *inputs, _ = _steps_of(plan, "pretrain")
    _take_cached_inputs(plan, inputs, {})
    config = plan.job.pretrain
    data = plan_pretrain(config, plan.patch_dir(config.data))
    from pipeline.pretrain.launch import probe_data

    return probe_data(data, run_dir=plan.layout.pretrain, steps=steps, address=address)


def _take_cached_inputs(plan: JobPlan, steps: list[Step], fingerprints: dict[str, str]) -> None:
    """The fingerprints of the steps a single-stage command reads: each must be done, with the key it
    would have now, and its outputs still there; else the command says how to make it."""
    for step in steps:
        record = read_record(plan.layout.stages, step.id)
        done = record is not None and record.get("status") == "done" and outputs_present(step)
        if done:
            upstream = {dep: fingerprints[dep] for dep in step.depends}
            external = external_fingerprints(plan, step)
            done = key_matches(record, step.settings, upstream, external, plan.layout.root)
        if not done:
            state = "has not run" if record is None else "is not done with these settings"
            # a run folder given to the command (not the job's own) goes into the command to run
            folder = f" --run-dir {shlex.quote(plan.layout.root)}" if plan.run_dir_given else ""
            raise ConfigError(
                f"{plan.source}: {step.id} {state} in {plan.layout.root}; run "
                f"`vitpipe run {plan.source}{folder} --until {step.stage}` first"
            )
        fingerprints[step.id] = record["fingerprint"]


def _keep_job_file(plan: JobPlan, job_path: str | Path, root: Path) -> None:
    """RUN/job.yaml: the job file, or for a one-stage pretrain file the job it became."""
    if Path(job_path).resolve() == (root / JOB_FILE).resolve():
        return
    if plan.job.datasets or plan.job.preprocess or plan.job.finetune or plan.job.run_dir:
        shutil.copyfile(job_path, root / JOB_FILE)
    else:
        job = {"name": plan.job.name, **plan.job.model_dump(mode="json", exclude_defaults=True)}
        write_atomic(str(root / JOB_FILE), yaml.safe_dump(job, sort_keys=False))


@dataclass
class _Started:
    """A step past its cache check, recorded "running": what finishing it needs."""

    step: Step
    key: str
    upstream: dict[str, str]
    external: dict[str, str]
    clear: bool
    resume: bool
    stamp: str = field(default_factory=lambda: _now())
    began: float = field(default_factory=time.perf_counter)


def _run_step(
    context: RunContext, step: Step, fingerprints: dict[str, str], external: dict[str, str], redo: bool
) -> StepReport:
    started = _start(context, step, fingerprints, external, redo)
    if isinstance(started, StepReport):
        return started
    layout = context.plan.layout
    verb = "resuming" if started.resume else "running"
    try:
        with log_to(Path(layout.logs) / f"{step.stage}.log", f"{step.id} {verb} {started.stamp}"):
            outcome = RUNNERS[step.stage](context, step, started.clear)
    except Exception as error:  # a failed step is recorded and reported, and the run stops
        return _failed(context, started, error)
    return _finish(context, started, outcome, fingerprints)


def _start(
    context: RunContext, step: Step, fingerprints: dict[str, str], external: dict[str, str], redo: bool
) -> _Started | StepReport:
    """A cached step's report, or the step recorded as running (with whether to clear its outputs)."""
    layout = context.plan.layout
    upstream = {dep: fingerprints[dep] for dep in step.depends}
    key = step_key(step.settings, upstream, external, layout.root)
    record = read_record(layout.stages, step.id)
    same = record is not None and key_matches(record, step.settings, upstream, external, layout.root)
    if same and not redo and record.get("status") == "done" and outputs_present(step):
        fingerprints[step.id] = record["fingerprint"]
        say(f"[run] {step.id}: cached (done {record.get('finished', '?')}, key {key})")
        return StepReport(step.id, "cached")
    # Outputs are cleared only when the step is redone on purpose or its key changed; with no record
    # (outputs of a single-stage command, say a `vitpipe pretrain` of this job) they are built upon.
    clear = redo or (record is not None and not same and step.stage not in RESUMED_ON_CHANGE)
    started = _Started(step, key, upstream, external, clear, resume=same and not redo)
    say(f"[run] {step.id}: {'resuming' if started.resume else 'running'} (key {key})")
    write_record(layout.stages, step.id, {"key": key, "status": "running", "started": started.stamp})
    context.children[step.id] = open_child(context.tracking, step.id, step.id, step.settings)
    return started


def _failed(context: RunContext, started: _Started, error: BaseException) -> StepReport:
    """Record a step whose runner raised; the console gets one line, the stage's log the traceback."""
    layout, step = context.plan.layout, started.step
    seconds = time.perf_counter() - started.began
    message = one_line(f"{type(error).__name__}: {error}")
    ended = {"finished": _now(), "seconds": seconds, "error": message}
    write_record(
        layout.stages, step.id, {"key": started.key, "status": "failed", "started": started.stamp, **ended}
    )
    log = Path(layout.logs) / f"{step.stage}.log"
    with log.open("a") as stream:  # the whole traceback for whoever debugs it
        stream.write(f"{step.id}: " + ANSI.sub("", "".join(traceback.format_exception(error))))
    say(f"[run] {step.id}: FAILED after {format_seconds(seconds)}: {message} (traceback in {log})", err=True)
    end_tracking(context.children.pop(step.id, OFF), "FAILED")
    return StepReport(step.id, "failed", seconds, message)


def one_line(text: str) -> str:
    """An error as one line without colour codes, for the console, its record and the report: a traceback
    it carries (a Ray task's, a worker's) is cut to its last line; the stage's log keeps it whole."""
    lines = [line.strip() for line in ANSI.sub("", text).splitlines() if line.strip()]
    frames = next((i for i, line in enumerate(lines) if line.startswith(("Traceback (", 'File "'))), None)
    if frames is not None:
        lines = [*lines[:frames], lines[-1]]
    return " ".join(lines)


def _finish(
    context: RunContext, started: _Started, outcome: StepOutcome, fingerprints: dict[str, str]
) -> StepReport:
    """Record a step whose runner returned (done, or failed with its outputs written)."""
    step = started.step
    seconds = time.perf_counter() - started.began
    status = "failed" if outcome.error else "done"
    write_record(
        context.plan.layout.stages,
        step.id,
        {
            "key": started.key,
            "status": status,
            "started": started.stamp,
            "finished": _now(),
            "seconds": seconds,
            "fingerprint": outcome.fingerprint,
            "upstream": started.upstream,
            "external": started.external,
            "outputs": outcome.outputs,
            "error": outcome.error,
        },
    )
    fingerprints[step.id] = outcome.fingerprint  # what follows may still read a partly failed step
    end_tracking(context.children.pop(step.id, OFF), "FAILED" if outcome.error else "FINISHED")
    if outcome.error:
        say(f"[run] {step.id}: FAILED in {format_seconds(seconds)}: {outcome.error}", err=True)
        return StepReport(step.id, "failed", seconds, outcome.error)
    say(f"[run] {step.id}: done in {format_seconds(seconds)}")
    return StepReport(step.id, "resumed" if started.resume else "ran", seconds)


def _run_concurrently(
    context: RunContext,
    group: list[Step],
    options: RunOptions,
    fingerprints: dict[str, str],
    externals: dict[str, dict[str, str]],
    summary: RunSummary,
) -> list[StepReport]:
    """Steps that may run beside each other (a study's points): the cached ones skipped, the others all
    started at once, for Ray to place on the cluster's resources, and each recorded as it ends. A failed
    one is kept apart: the others go on, and the report still runs (reading it as failed). The first
    SIGINT/SIGTERM asks each started one to stop where it can resume (its RunControl: their tasks get no
    signal); once all have ended, the run stops (TrainingStopped), their records left for the next run."""
    reports: list[StepReport] = []
    pending: dict[Any, _Started] = {}
    controls: dict[Any, Any] = {}  # each started step's RunControl, read by the signal handler as it comes
    startable: list[_Started] = []  # past their cache check: submitted once Ray is up and signals held
    stage, layout = group[0].stage, context.plan.layout
    with log_to(Path(layout.logs) / f"{stage}.log", f"{len(group)} {stage} steps {_now()}"):
        for step in group:
            if summary.failed or any(dep not in fingerprints for dep in step.depends):
                reports.append(StepReport(step.id, "not run"))
                continue
            started = _start(context, step, fingerprints, externals[step.id], options.redo(step.stage))
            if isinstance(started, StepReport):
                reports.append(started)
            else:
                startable.append(started)
        if startable:  # Ray first: ray.init puts a SIGTERM handler of its own over whatever was there
            context.ensure_ray()
        with stop_on_signals(controls.values(), stage, POINTS_STOP) as received:
            for started in startable:
                if received:  # stopped before it was submitted: its "running" record resumes it next time
                    reports.append(StepReport(started.step.id, "not run"))
                    continue
                submit, _ = CONCURRENT_RUNNERS[started.step.stage]
                ref, control = submit(context, started.step, started.clear)
                pending[ref], controls[ref] = started, control
                if received:  # the signal came while it was being submitted, before the handler saw it
                    control.request_stop.remote()
            stopped = _collect_concurrently(context, pending, reports, fingerprints)
    if received or stopped:
        done = sum(1 for report in reports if report.status in ("ran", "resumed"))
        summary.steps += reports  # run.json lists what the group did before it stopped
        raise TrainingStopped(
            f"{stage}: stopped on request; {len(stopped)} step(s) stopped where the next run resumes them "
            f"(each said where above), {done} finished"
        )
    return reports


# What the first SIGINT/SIGTERM does to a study's points (pipeline.study.launch.run_point).
POINTS_STOP = (
    "each point pretraining checkpoints its step and stops, a point fine-tuning finishes first (fine-tuning "
    "keeps no checkpoint), and none starts more work"
)


def _collect_concurrently(
    context: RunContext, pending: dict[Any, _Started], reports: list[StepReport], fingerprints: dict[str, str]
) -> list[str]:
    """Record each started step as it ends (a failed one kept apart); returns those that stopped on
    request, whose records stay "running": the next run resumes them (a checkpointed pretraining)."""
    stopped = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # signals are handled between waits
        if not ready:
            continue
        started = pending.pop(ready[0])
        _, collect = CONCURRENT_RUNNERS[started.step.stage]
        try:
            reports.append(_finish(context, started, collect(ready[0]), fingerprints))
        except TrainingStopped as stop:
            say(f"[run] {started.step.id}: stopped: {stop}", err=True)
            stopped.append(started.step.id)
        except Exception as error:
            reports.append(_failed(context, started, error))
            fingerprints[started.step.id] = FAILED_FINGERPRINT
    return stopped


FAILED_FINGERPRINT = "failed"  # what the report reads of a concurrent step that failed


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_run_file(plan: JobPlan, summary: RunSummary, status: str) -> None:
    """RUN/run.json: the job's steps as they stand. A single-stage command updates its own step in it and
    keeps the others; a side command's steps (other weights or targets) are never the job's, and leave
    it as it was."""
    path = Path(plan.layout.root) / RUN_FILE
    steps = [vars(step) for step in summary.steps if not is_side(step.step)]
    if summary.single:
        if not steps:
            return
        mine = {step["step"]: step for step in steps}  # in its place in the list, or added at its end
        steps = [mine.pop(step["step"], step) for step in _listed_steps(path)] + list(mine.values())
        status = "running" if status == "running" else _merged_status(steps, status)
    document: dict[str, Any] = {
        "format": "vitpipe.run/1",
        "name": plan.job.name,
        "job_file": plan.source,
        "config_hash": plan.job.digest(),
        "git": git_revision(),
        "status": status,
        "updated": _now(),
        "seconds": round(summary.seconds, 1),
        "steps": steps,
    }
    write_atomic(str(path), json.dumps(document, indent=2) + "\n")


def _listed_steps(path: Path) -> list[dict[str, Any]]:
    """The steps an earlier command wrote into run.json (none when it is missing or unreadable)."""
    try:
        steps = json.loads(path.read_text()).get("steps", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [
        s for s in steps if isinstance(s, dict) and isinstance(s.get("step"), str) and not is_side(s["step"])
    ]


def _merged_status(steps: list[dict[str, Any]], status: str) -> str:
    """The run's status once a single-stage command ended: failed while any listed step is."""
    if status == "interrupted":
        return status
    return "failed" if any(step.get("status") == "failed" for step in steps) else "finished"
