"""`vitpipe status RUN_DIR|JOB`: where a run stands, read from its folder while it may still be written
(run.json and the step records are replaced whole; a metrics line being written is skipped): each step's
state, the pretraining step, loss, images/s and ETA, and the last error with its log file. With
`--address`, a submitted job's Ray status too, and what its console printed when its folder is not
visible from here."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_config
from pipeline.metrics import format_seconds, probe_line, probe_records, read_records, resizes
from pipeline.runner.layout import JOB_FILE, RunLayout, run_layout
from pipeline.runner.lock import LOCK_FILE, RUN_FILE, lock_holder
from pipeline.runner.records import is_side, record_path_name
from pipeline.runner.submit import call_api, connect, job_details


@dataclass
class RunStatus:
    root: str
    name: str
    state: str  # run.json's status, or "running" while a live process holds the lock
    holder: str | None = None
    steps: list[tuple[str, str, str]] = field(default_factory=list)  # (step, state, detail)
    side: list[tuple[str, str, str]] = field(default_factory=list)  # side commands' steps, apart
    training: str | None = None
    error: str | None = None
    unreadable: list[str] = field(default_factory=list)  # "PATH: why", for each record that could not be read

    def text(self) -> str:
        lines = [
            f"run {self.name!r}: {self.state}" + (f" ({self.holder})" if self.holder else ""),
            f"  folder: {self.root}",
        ]
        width = max((len(step) for step, _, _ in self.steps), default=0)
        lines += [f"  {step:<{width}}  {state:<8} {detail}".rstrip() for step, state, detail in self.steps]
        if self.side:
            lines.append("  side commands (other weights or targets; not the job's steps):")
            lines += [f"    {step}  {state:<8} {detail}".rstrip() for step, state, detail in self.side]
        if self.training:
            lines.append(f"  {self.training}")
        if self.error:
            lines.append(f"  last error: {self.error}")
        lines += [f"  unreadable: {why}" for why in self.unreadable]
        return "\n".join(lines)


def run_status(target: str) -> RunStatus:
    """The status of the run in folder `target`, or of the run of job file `target`. A record that is
    there but cannot be read is named in `unreadable`, and no state is made up for it."""
    unreadable: list[str] = []
    layout = _layout(target, unreadable)
    root = Path(layout.root)
    document = _read_json(root / RUN_FILE, unreadable, _check_run_document)
    holder = _live_holder(root / LOCK_FILE)
    if holder:
        state = "running"
    elif document is None and unreadable:
        state = f"unknown ({RUN_FILE} is unreadable)"
    else:
        state = (document or {}).get("status", "not started")
    if state == "running" and not holder:
        state = "stopped (its process is gone)"
    status = RunStatus(str(root), (document or {}).get("name", layout.name), state, holder)
    for step_id in _step_ids(layout, document or {}):
        path = Path(layout.stages) / record_path_name(step_id)
        failures = len(unreadable)
        record = _read_json(path, unreadable, _check_record) or {}  # as written, unjudged
        step_state = "unreadable" if len(unreadable) > failures else record.get("status", "pending")
        if step_state == "running" and not holder:  # its process stopped (or was killed) inside it
            step_state, record = "stopped", {**record, "status": "stopped"}
        if is_side(step_id):
            error = f": {record.get('error')}" if record.get("status") == "failed" else ""
            status.side.append((step_id, step_state, (_step_detail(record) if record else "") + error))
            continue
        status.steps.append((step_id, step_state, _step_detail(record) if record else ""))
        if record.get("status") == "failed":
            stage = step_id.split(":", 1)[0]
            status.error = f"{step_id}: {record.get('error')} (log: {Path(layout.logs) / f'{stage}.log'})"
    status.training = training_line(layout.pretrain, live=holder is not None)
    status.unreadable = unreadable
    return status


def training_line(run_dir: str, live: bool = True) -> str | None:
    """`pretraining: step 120/600 (20%), loss 1.234, 512 img/s, ETA 3m10s` from a run's metrics; no ETA
    when no process is training it (`live` false: the run stopped)."""
    records = read_records(run_dir)
    steps = [r for r in records if "loss" in r and "step" in r]
    if not steps:
        return None
    last = steps[-1]
    totals = [
        r["total_steps"] for r in records if r.get("event") in ("started", "resumed") and "total_steps" in r
    ]
    total = totals[-1] if totals else None
    finished = any(r.get("event") == "finished" for r in records[records.index(last) :])
    text = f"pretraining: step {last['step']:,}" + (
        f"/{total:,} ({last['step'] / total:.0%})" if total else ""
    )
    text += f", loss {last['loss']:.4f}, {last.get('images_per_s', 0):,.0f} img/s"
    if "workers" in last:
        text += f", {last['workers']} worker(s)"
    recent = [r["step_s"] for r in steps[-5:] if r.get("step_s")]
    if live and total and recent and not finished and last["step"] < total:
        text += f", ETA {format_seconds(statistics.mean(recent) * (total - last['step']))}"
    resized = resizes(records)
    probes = probe_records(records)
    latest = [
        next(r for r in reversed(probes) if r["probe"] == kind)
        for kind in ("raw", "ema")
        if any(r["probe"] == kind for r in probes)
    ]
    return text + (f"; {resized}" if resized else "") + "".join(f"\n  {probe_line(r)}" for r in latest)


def remote_status(client: Any, submission_id: str, address: str) -> str:
    """A submitted job: its Ray status, then its run folder's status when visible from here, else the
    last step line, progress line and error its console printed."""
    job = job_details(client, submission_id)
    lines = [f"job {submission_id}: {job.status}" + (f" ({job.message})" if job.message else "")]
    run_dir = (job.metadata or {}).get("vitpipe.run_dir")
    if run_dir and (Path(run_dir) / RUN_FILE).is_file():
        return "\n".join([*lines, run_status(run_dir).text()])
    lines.append(f"  run folder: {run_dir or 'unknown'} (not visible from here: from the job's console)")
    console = call_api(lambda: client.get_job_logs(submission_id), address).splitlines()
    for prefix in ("[run] ", "pretrain: step", "vitpipe: "):
        last = next((line for line in reversed(console) if line.startswith(prefix)), None)
        if last:
            lines.append(f"  {last}")
    return "\n".join(lines)


def submitted_status(address: str, submission_id: str) -> str:
    """`remote_status` of a job submitted to the cluster whose Jobs API is at `address`."""
    client = connect(address)
    return remote_status(client, submission_id, client.get_address())


def _layout(target: str, unreadable: list[str]) -> RunLayout:
    """The run's layout, from its job.yaml (where its pretraining went); a job.yaml that cannot be read
    is added to `unreadable`, and the folder's default layout used."""
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / RUN_FILE).is_file() and not (path / "stages").is_dir():
            raise ConfigError(f"{target}: not a vitpipe run folder (no {RUN_FILE} or stages/)")
        job = path / JOB_FILE
        if job.is_file():
            try:
                return _plan_layout(job, str(path))
            except (ConfigError, OSError) as error:
                first = str(error).splitlines()[0].removeprefix(f"{job}: ")
                unreadable.append(f"{job}: {first} (pretraining looked for in {path / 'pretrain'})")
        return RunLayout(str(path.absolute()), path.name, str(path.absolute()), "pretrain")
    if path.is_file():
        return _plan_layout(path, None)
    raise ConfigError(f"{target}: no such run folder or job file")


def _plan_layout(job: Path, run_dir: str | None) -> RunLayout:
    return run_layout(load_config(job), run_dir)


def _step_ids(layout: RunLayout, document: dict[str, Any]) -> list[str]:
    """The steps in run order: those run.json lists, then any other record (a single-stage command's)."""
    listed = [step["step"] for step in document.get("steps", [])]
    recorded = sorted(path.stem.replace(".", ":", 1) for path in Path(layout.stages).glob("*.json"))
    return listed + [step for step in recorded if step not in listed]


def _step_detail(record: dict[str, Any]) -> str:
    if record.get("status") == "done":
        return f"{format_seconds(record.get('seconds', 0))}, finished {record.get('finished', '?')}"
    if record.get("status") == "running":
        return f"since {record.get('started', '?')}"
    if record.get("status") == "failed":
        return f"after {format_seconds(record.get('seconds', 0))}"
    if record.get("status") == "stopped":
        return f"started {record.get('started', '?')}; `vitpipe run` resumes it"
    return ""


def _live_holder(lock: Path) -> str | None:
    """Who holds the run's lock, when that process still runs (or runs on another host)."""
    holder = lock_holder(lock) if lock.is_file() else None
    return f"pid {holder.get('pid')} on {holder.get('host')}" if holder else None


def _read_json(
    path: Path, unreadable: list[str], check: Callable[[dict[str, Any]], str | None]
) -> dict[str, Any] | None:
    """The JSON object in `path`; None when there is no such file, or when there is one that cannot be
    read (then "PATH: why" is added to `unreadable`)."""
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as error:  # not JSON, or not UTF-8
        unreadable.append(f"{path}: not valid JSON ({error})")
        return None
    except OSError as error:
        unreadable.append(f"{path}: {error.strerror or error}")
        return None
    problem = "not a JSON object" if not isinstance(value, dict) else check(value)
    if problem:
        unreadable.append(f"{path}: {problem}")
        return None
    return value


def _check_run_document(document: dict[str, Any]) -> str | None:
    steps = document.get("steps", [])
    if not isinstance(steps, list) or not all(
        isinstance(s, dict) and isinstance(s.get("step"), str) for s in steps
    ):
        return "its 'steps' is not a list of steps"
    if not isinstance(document.get("status", ""), str):
        return "its 'status' is not a string"
    return None


def _check_record(record: dict[str, Any]) -> str | None:
    return None if isinstance(record.get("status"), str) else "a step record without a 'status'"
