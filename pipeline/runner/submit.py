"""`vitpipe submit JOB` and `vitpipe jobs ...`: a job's run on a Ray cluster through the Ray Jobs API.

The project folder goes to the cluster as the job's working_dir (less data, runs, .venv and caches),
the entrypoint is `python -m pipeline.cli run JOB --run-dir RUN` on the head node, and the submission
id is the run's name. Clusters started with token authentication need the token on this side too:
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's own lookup); finding one turns Ray's
token mode on for this process (before ray is imported).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.config import ConfigError
from pipeline.console import say
from pipeline.runner.plan import RunOptions, load_plan
from pipeline.runner.provenance import PROJECT_ROOT, REVISION_ENV, git_revision

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# Never uploaded: environments, datasets and run outputs (on the cluster they live on shared storage).
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "data",
    "runs",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "build",
    "dist",
]
TOKEN_FILE = Path("~/.ray/auth_token").expanduser()
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
T = TypeVar("T")


class ClusterError(RuntimeError):
    """The cluster could not be reached, refused us, or does not know the job; the message says which."""


def token_source() -> str | None:
    """Where Ray will read the cluster token from, in its own order; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and Path(path).expanduser().is_file():
        return path
    return str(TOKEN_FILE) if TOKEN_FILE.is_file() else None


def use_token_if_present() -> None:
    """Turn Ray's token mode on for this process when a token is at hand (Ray sends it only in token
    mode). Ray reads the mode once, when it is first imported: once it is, setting it would only reach the
    processes started from here (a local Ray's servers), at odds with this one."""
    if "ray" in sys.modules:
        return
    if os.environ.get("RAY_AUTH_MODE") is None and token_source() is not None:
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str | None) -> JobSubmissionClient:
    """A Jobs API client for the dashboard at `address` (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)."""
    where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not where:
        raise ConfigError("no cluster: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS")
    from ray.job_submission import JobSubmissionClient

    from pipeline.ray_session import check_reachable

    if "://" not in where and where != "auto":
        # Without a scheme Ray takes HOST:PORT for a GCS and spends ~40 s failing to find the dashboard
        # through it; the Jobs API is the dashboard, so HOST:PORT means http://HOST:PORT.
        where = f"http://{where}"
    if where.startswith(("http://", "https://")):
        try:
            check_reachable(where.split("://", 1)[1].split("/", 1)[0])
        except ConnectionError as error:
            raise ClusterError(
                f"cannot reach the Ray Jobs API at {where}: {error}; it is the dashboard's address, "
                "http://HEAD:8265 by default"
            ) from None
    return call_api(lambda: JobSubmissionClient(where), where)


def call_api(action: Callable[[], T], address: str) -> T:
    """Run one Jobs API call; turn Ray's errors into messages that say what to fix."""
    from ray.exceptions import AuthenticationError

    try:
        return action()
    except AuthenticationError as error:
        source = token_source()
        used = (
            f"the token from {source}" if source else "no token (none in RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        )
        raise ClusterError(
            f"the Ray cluster at {address} refused the request: it uses token authentication and we sent "
            f"{used}. Set RAY_AUTH_TOKEN to the cluster's token (on the head node: `ray get-auth-token`). "
            f"Ray said: {str(error).splitlines()[0]}"
        ) from None
    except ConnectionError as error:
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {address} ({error}); it is the dashboard's address, "
            "http://HEAD:8265 by default"
        ) from None


@dataclass(frozen=True)
class Submission:
    submission_id: str
    entrypoint: str
    run_dir: str
    address: str

    def describe(self, *, waiting: bool) -> str:
        """What `vitpipe submit` says of it, and how to follow it unless the command follows it itself."""
        lines = [
            f"submitted {self.submission_id} to {self.address}: {self.entrypoint}",
            f"  run folder: {self.run_dir}",
        ]
        if not waiting:
            follow_it = f"vitpipe jobs logs {self.submission_id} --follow --address {self.address}"
            lines.append(f"  follow it: {follow_it}")
        return "\n".join(lines)


def submit(
    job_path: Path,
    *,
    address: str | None,
    run_dir: str | None = None,
    name: str | None = None,
    options: RunOptions = RunOptions(),  # noqa: B008 (frozen dataclass)
    env: dict[str, str] | None = None,
    working_dir: Path = PROJECT_ROOT,
    verbose: bool = False,
) -> Submission:
    """Validate the job here, then submit its run; refuse a second run of the same name while one runs."""
    options.check()
    plan = load_plan(job_path, run_dir)
    location = run_dir or plan.job.run_dir
    if not location or not Path(location).expanduser().is_absolute():
        raise ConfigError(
            f"{job_path}: a job on a cluster needs a run folder every node sees; set run_dir to an absolute "
            f"path on shared storage (e.g. /mnt/shared/runs/{plan.job.name}) or pass --run-dir"
        )
    job_file = Path(job_path).resolve()
    if not job_file.is_relative_to(working_dir.resolve()):
        raise ConfigError(f"{job_path}: the job file must lie inside the uploaded folder {working_dir}")
    relative = job_file.relative_to(working_dir.resolve()).as_posix()
    entrypoint = _entrypoint(relative, location, options, verbose)
    git = git_revision(working_dir)
    revision = f"{git['rev']}{'+dirty' if git['dirty'] else ''}" if git else "unknown"
    client = connect(address)
    where = client.get_address()
    submission_id = _free_submission_id(client, name or plan.job.name, where)
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "env_vars": {REVISION_ENV: revision, "PYTHONUNBUFFERED": "1", **(env or {})},
    }
    metadata = {
        "vitpipe.job": plan.job.name,
        "vitpipe.job_file": relative,
        "vitpipe.run_dir": location,
        "git.revision": revision,
    }
    call_api(
        lambda: client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env, metadata=metadata
        ),
        where,
    )
    return Submission(submission_id, entrypoint, location, where)


def _entrypoint(job_file: str, run_dir: str, options: RunOptions, verbose: bool = False) -> str:
    """The cluster's command: `vitpipe run` whose console (the job's logs) is as quiet as it is here."""
    words = ["python", "-m", "pipeline.cli", "run", job_file, "--run-dir", run_dir]
    if verbose:
        words.append("--verbose")
    if options.from_stage:
        words += ["--from", options.from_stage]
    for stage in options.force:
        words += ["--force", stage]
    if options.until:
        words += ["--until", options.until]
    for point in options.points:
        words += ["--point", point]
    return shlex.join(words)


def _free_submission_id(client: JobSubmissionClient, name: str, address: str) -> str:
    """`name`, or `name-2`, `name-3`, ... when earlier runs of it have finished; a run still going under
    the name is refused (two drivers must not write one run folder)."""
    taken = {
        job.submission_id: str(job.status) for job in call_api(client.list_jobs, address) if job.submission_id
    }
    for candidate in [name, *(f"{name}-{n}" for n in range(2, 1000))]:
        status = taken.get(candidate)
        if status is None:
            return candidate
        if status not in TERMINAL:
            raise ClusterError(
                f"run {name!r} is already on the cluster as {candidate!r} ({status}); follow it with "
                f"`vitpipe jobs logs {candidate} --follow`, or stop it with `vitpipe jobs stop {candidate}`"
            )
    raise ClusterError(f"too many runs named {name!r} on the cluster; pass --name")


def follow(client: JobSubmissionClient, submission_id: str, out: Any = None) -> str:
    """Print the job's logs as they come until it ends; returns its final status. The logs are the
    cluster's `vitpipe run` console, already as quiet as one here: they are shown as vitpipe's own."""
    address = client.get_address()

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            if out is None:
                say(lines.rstrip("\n"))
            else:
                out.write(lines)
                out.flush()

    call_api(lambda: asyncio.run(tail()), address)
    return wait_for_end(client, submission_id)


def follow_to_end(submission: Submission) -> str | None:
    """`vitpipe submit --wait`: the job's logs until it ends, then its final status; None when the user
    stops following (Ctrl-C), which leaves the job running."""
    client = connect(submission.address)
    try:
        status = follow(client, submission.submission_id)
    except KeyboardInterrupt:
        say(f"\nstopped following; the job goes on (vitpipe jobs stop {submission.submission_id})")
        return None
    say(f"job {submission.submission_id}: {status}")
    return status


def wait_for_end(client: JobSubmissionClient, submission_id: str, timeout_s: float = 120.0) -> str:
    """The job's status once terminal (the log stream can close a moment before the status is set)."""
    address = client.get_address()
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(call_api(lambda: client.get_job_status(submission_id), address))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def job_details(client: JobSubmissionClient, submission_id: str) -> Any:
    address = client.get_address()
    try:
        return call_api(lambda: client.get_job_info(submission_id), address)
    except RuntimeError as error:
        if isinstance(error, ClusterError):
            raise
        raise ClusterError(f"no job {submission_id!r} on the cluster at {address} ({error})") from None


def describe_job(job: Any) -> str:
    """A few lines about one job: status, times, the run it belongs to, the message."""
    metadata = job.metadata or {}
    lines = [
        f"{job.submission_id}: {job.status}",
        f"  entrypoint: {job.entrypoint}",
        f"  started: {_when(job.start_time)}; ended: {_when(job.end_time)}",
    ]
    if metadata:
        lines.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(metadata.items())))
    if job.message:
        lines.append(f"  message: {job.message}")
    return "\n".join(lines)


def jobs_table(jobs: list[Any]) -> str:
    rows = [
        "| submission id | status | job | run folder | started | ended |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        metadata = job.metadata or {}
        rows.append(
            f"| {job.submission_id or job.job_id} | {job.status} | {metadata.get('vitpipe.job', '—')} | "
            f"{metadata.get('vitpipe.run_dir', '—')} | {_when(job.start_time)} | {_when(job.end_time)} |"
        )
    return "\n".join(rows)


def jobs_action(
    action: str, address: str | None, submission_id: str = "", *, follow_logs: bool = False
) -> bool:
    """`vitpipe jobs list|status|logs|stop`; False only when followed logs end in a job that did not
    succeed."""
    client = connect(address)
    where = client.get_address()
    if action == "list":
        say(jobs_table(call_api(client.list_jobs, where)))
        return True
    job = job_details(client, submission_id)  # an unknown id fails here, naming it
    if action == "status":
        say(describe_job(job))
    elif action == "logs":
        if follow_logs:
            return follow(client, submission_id) == "SUCCEEDED"
        print(call_api(lambda: client.get_job_logs(submission_id), where), end="")
    elif action == "stop":
        if call_api(lambda: client.stop_job(submission_id), where):
            say(f"{submission_id}: {wait_for_end(client, submission_id, timeout_s=60)}")
        else:
            say(f"{submission_id}: already {job.status}")
    return True


def _when(milliseconds: int | None) -> str:
    if not milliseconds:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(milliseconds / 1000))
