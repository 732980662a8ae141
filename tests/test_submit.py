"""`vitpipe submit` and `vitpipe jobs` against a real two-node Ray cluster with token authentication,
started by `cluster/local.sh` (`ray start` head + worker on 127.0.0.1) as a user starts it."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, VITPIPE, free_port

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class TokenCluster:
    address: str  # the Jobs API
    env: dict[str, str]  # a client environment holding the cluster's token


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[TokenCluster]:
    state = tempfile.mkdtemp(prefix="vp-", dir="/tmp")
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "RAY_AUTH_TOKEN": secrets.token_hex(16),  # never the user's ~/.ray/auth_token
        "RAY_PORT": str(free_port()),
        "DASHBOARD_PORT": str(dashboard),
        "STATE_DIR": state,
        "VENV_BIN": str(Path(sys.executable).parent),
    }
    script = [str(REPO / "cluster" / "local.sh")]
    started = subprocess.run([*script, "start"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        cluster = TokenCluster(f"http://127.0.0.1:{dashboard}", env)
        _wait_for_jobs_api(cluster)
        yield cluster
    finally:
        _stop_and_check(script, env, Path(state))


def _stop_and_check(script: list[str], env: dict[str, str], state: Path) -> None:
    """`cluster/local.sh stop` ends every process of both nodes' groups, in seconds, also after a job ran
    (Ray's default 30 s drain on SIGTERM held the head past local.sh's 20 s grace then)."""
    groups = [
        int((state / f"{node}.pid").read_text())
        for node in ("head", "worker")
        if (state / f"{node}.pid").is_file()
    ]
    started = time.monotonic()
    stopped = subprocess.run([*script, "stop"], env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert stopped.returncode == 0, stopped.stderr
    left = _live_members(set(groups))
    assert not left, f"processes of node group(s) {groups} still run after stop: {left}"
    assert took < 15, f"cluster/local.sh stop took {took:.1f} s"


def _live_members(groups: set[int]) -> list[str]:
    """The processes of these process groups that are not zombies (this machine's init reaps late)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue  # it ended while being listed
        state, _, pgid = fields.split()[:3]
        if int(pgid) in groups and state != "Z":
            live.append(f"{stat.parent.name} {name.split('(', 1)[1]} ({state})")
    return live


def _wait_for_jobs_api(cluster: TokenCluster) -> None:
    for _ in range(60):
        if vitpipe(cluster, "jobs", "list").returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(vitpipe(cluster, "jobs", "list").stderr)


def vitpipe(cluster: TokenCluster, *args: str, env: dict[str, str] | None = None, timeout: int = 120):
    command = [*VITPIPE, *args]
    if args[0] in ("submit", "jobs", "status"):
        command += ["--address", cluster.address]
    return subprocess.run(
        command, cwd=REPO, env=env or cluster.env, capture_output=True, text=True, timeout=timeout
    )


def test_a_submitted_job_runs_the_whole_pipeline_on_the_cluster(token_cluster, tmp_path):
    run = tmp_path / "smoke"
    result = vitpipe(token_cluster, "submit", "jobs/smoke.yaml", "--run-dir", str(run), "--wait", timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted smoke to" in result.stdout
    assert "Ray 2.60.0: 2 node(s), 2 CPU" in result.stdout  # the driver joined the two-node cluster
    assert "job smoke: SUCCEEDED" in result.stdout
    followed = result.stdout + result.stderr  # the job's console: vitpipe's lines, none of Ray's
    assert [line for line in followed.splitlines() if "pid=" in line or "TrainController" in line] == []
    probes = [line for line in followed.splitlines() if line.startswith("pretrain: probe")]  # one a result
    assert len(followed.splitlines()) - len(probes) <= 50, followed
    steps = json.loads((run / "run.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["ran"] * 8
    assert (run / "report.md").is_file()
    assert len(json.loads((run / "transfer" / "results.json").read_text())["results"]) == 2

    status = vitpipe(token_cluster, "jobs", "status", "smoke")
    assert status.returncode == 0, status.stderr
    assert "smoke: SUCCEEDED" in status.stdout
    assert "git.revision=" in status.stdout
    assert f"vitpipe.run_dir={run}" in status.stdout
    logs = vitpipe(token_cluster, "jobs", "logs", "smoke")
    assert "[run] pretrain: done" in logs.stdout
    listed = vitpipe(token_cluster, "jobs", "list")
    assert f"| smoke | SUCCEEDED | smoke | {run} |" in listed.stdout

    # the same job again: a new submission id, and every stage comes from the run folder's cache
    again = vitpipe(token_cluster, "submit", "jobs/smoke.yaml", "--run-dir", str(run), "--wait", timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "submitted smoke-2 to" in again.stdout
    assert "steps: 8 cached" in again.stdout

    status = vitpipe(token_cluster, "status", "smoke-2")  # the run folder is visible from here
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("job smoke-2: SUCCEEDED")
    assert "run 'smoke': finished" in status.stdout
    assert "pretraining: step 40/40 (100%)" in status.stdout
    run.rename(tmp_path / "elsewhere")  # as seen from a laptop that does not mount the cluster's storage
    status = vitpipe(token_cluster, "status", "smoke")
    assert status.returncode == 0, status.stderr
    assert f"run folder: {run} (not visible from here: from the job's console)" in status.stdout
    assert "  [run] report: done in " in status.stdout
    assert "  pretrain: step 40/40 (100%)" in status.stdout


def test_a_wrong_token_fails_with_a_clear_message(token_cluster, tmp_path):
    wrong = {**token_cluster.env, "RAY_AUTH_TOKEN": "not-the-token"}
    for args in (("jobs", "list"), ("submit", "jobs/smoke.yaml", "--run-dir", str(tmp_path / "never"))):
        result = vitpipe(token_cluster, *args, env=wrong)
        assert result.returncode == 1
        assert (
            "refused the request: it uses token authentication and we sent the token from RAY_AUTH_TOKEN"
            in (result.stderr)
        )
    assert not (tmp_path / "never").exists()


def test_stop_stops_a_running_job_and_a_running_name_is_not_submitted_twice(token_cluster, tmp_path):
    run = ["jobs/smoke.yaml", "--run-dir", str(tmp_path / "stopped"), "--name", "stopme"]
    submitted = vitpipe(token_cluster, "submit", *run)
    assert submitted.returncode == 0, submitted.stderr
    for _ in range(60):
        if "stopme: RUNNING" in vitpipe(token_cluster, "jobs", "status", "stopme").stdout:
            break
        time.sleep(1)
    twice = vitpipe(token_cluster, "submit", *run)
    assert twice.returncode == 1
    assert "run 'stopme' is already on the cluster as 'stopme' (RUNNING)" in twice.stderr
    stopped = vitpipe(token_cluster, "jobs", "stop", "stopme")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopme: STOPPED" in stopped.stdout
    assert "stopme: STOPPED" in vitpipe(token_cluster, "jobs", "status", "stopme").stdout


def test_an_unknown_job_is_named(token_cluster):
    result = vitpipe(token_cluster, "jobs", "logs", "no-such-job")
    assert result.returncode == 1
    assert "no job 'no-such-job' on the cluster" in result.stderr


def test_a_run_folder_other_nodes_cannot_see_is_refused_before_contacting_a_cluster():
    result = subprocess.run(
        [*VITPIPE, "submit", "jobs/smoke.yaml", "--address", "http://127.0.0.1:1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "a job on a cluster needs a run folder every node sees" in result.stderr


def test_info_joins_a_token_cluster_with_the_token_at_hand_and_names_only_the_address_given(
    token_cluster, tmp_path
):
    """`vitpipe info --address HEAD:PORT`: with a token at hand (RAY_AUTH_TOKEN, no RAY_AUTH_MODE) it
    joins; without one it says what to set, naming no address but the one typed."""
    gcs = f"127.0.0.1:{token_cluster.env['RAY_PORT']}"
    joined = vitpipe(token_cluster, "info", "--address", gcs)
    assert joined.returncode == 0, joined.stderr
    assert "resources: CPU=" in joined.stdout

    bare = {k: v for k, v in token_cluster.env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    refused = vitpipe(token_cluster, "info", "--address", gcs, env=bare)
    line = next(line for line in refused.stdout.splitlines() if line.startswith("ray cluster"))
    assert f"the Ray cluster at '{gcs}' answers but did not let this process join" in line
    assert "set RAY_AUTH_MODE=token here and RAY_AUTH_TOKEN" in line
    assert re.findall(r"\d+\.\d+\.\d+\.\d+:\d+", line) == [gcs]
