"""Elastic pretraining (`num_workers: [min, max]`) on a cluster that changes under the run: nodes of one
worker each (`ray.cluster_utils.Cluster`), drained (a spot notice), removed for good and added back while
`vitpipe pretrain` runs, as a user launches it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from pipeline.config import PretrainConfig
from pipeline.metrics import read_records
from pipeline.pretrain import elastic
from pipeline.pretrain.checkpoints import list_checkpoints
from pipeline.pretrain.control import ABORT_WAIT_S, RunControl, start_control
from pipeline.pretrain.launch import START_TIMEOUT_VARIABLE, _elastic_start_timeout
from pipeline.pretrain.plan import WorkerGroup, placeable, pretrain_recipe
from tests.conftest import run_vitpipe
from tests.test_pretrain import _launch, assert_learned, events, steps, write_config
from vit.recipe import BatchSplit

ELASTIC = {"num_workers": [1, 2], "steps": 300, "checkpoint_every": 100, "log_every": 2}


@contextlib.contextmanager
def one_worker_nodes(count: int) -> Iterator:
    """A head and `count - 1` more nodes of one CPU each: one pretraining worker per node. Started after the
    session's own local Ray (see conftest's `two_nodes`)."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(count - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def wait_for(
    run_dir: Path, run: subprocess.Popen, what: Callable[[list[dict]], bool], seconds: float = 300
) -> bool:
    """Whether the run's records came to satisfy `what` within `seconds`, while it still ran."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and run.poll() is None:
        if what(read_records(str(run_dir))):
            return True
        time.sleep(0.2)
    return False


def _last_checkpoint_written(run_dir: Path, records: list[dict]) -> bool:
    """Whether the checkpoint a preemption notice takes just before its deadline is complete in the run
    folder (every rank's files), as it is by the time the node goes."""
    last = events(records, "last_checkpoint")
    return bool(last) and last[0]["step"] in {info.step for info in list_checkpoints(str(run_dir))}


def drain(cluster, node, deadline_s: int) -> None:
    """What a spot node's reclaim notice (or a pod's preStop hook) does: Ray's drain with a deadline."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "drain-node",
            "--address",
            cluster.address,
            "--node-id",
            node.node_id,
            "--reason",
            "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message",
            "spot instance reclaim",
            "--deadline-remaining-seconds",
            str(deadline_s),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_a_node_lost_for_good_after_its_spot_notice_leaves_one_worker_to_finish_from_the_notice_step(
    ray_local, fractal_patches, tmp_path, monkeypatch
):
    """Two workers on two nodes; the second node gets a spot notice (a drain with a 12 s deadline) and then
    goes for good. The notice checkpoints the step at once and once more just before the deadline; the run
    resumes from that last step on the one worker left (global batch kept: accumulation 1 -> 2, ZeRO-2
    state resharded, each step's lr its own), finishes all its steps, learns, and its records, console and
    status say so. No periodic checkpoint comes between: the notice's are all there is."""
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")  # Ray Train looks for drains each second
    with one_worker_nodes(2) as cluster:
        second = cluster.list_all_nodes()[1]
        config = write_config(
            tmp_path / "spot.yaml", fractal_patches, **{**ELASTIC, "steps": 1000, "checkpoint_every": 1000}
        )
        run_dir = tmp_path / "spot"
        command = ["pretrain", str(config), "--storage", str(tmp_path), "--address", cluster.address]
        with _launch(command) as run:
            reached = wait_for(
                run_dir, run, lambda records: any(r.get("step", 0) >= 20 for r in steps(records))
            )
            assert reached, run.stderr.read()[-3000:] if run.poll() is not None else "no step 20"
            drain(cluster, second, deadline_s=12)
            noticed = wait_for(run_dir, run, lambda records: _last_checkpoint_written(run_dir, records))
            cluster.remove_node(second)  # the reclaim, at its deadline
            stdout, stderr = run.communicate(timeout=500)
    assert noticed, stderr[-3000:]
    assert run.returncode == 0, stderr[-3000:]
    records = read_records(str(run_dir))
    notice, last = events(records, "preemption")[0], events(records, "last_checkpoint")[0]
    assert notice["nodes"] == [second.node_id]
    assert len(notice["ranks"]) == 1  # the one worker on it, rank 0 or 1 as Ray Train placed them
    assert 0 < notice["deadline_s"] <= 12
    checkpointed = [r["step"] for r in events(records, "checkpoint")]
    assert notice["step"] < last["step"]
    assert {notice["step"], last["step"]} <= set(checkpointed)  # at once, and again before the deadline
    resized = events(records, "resized")
    assert [(r["from_workers"], r["workers"], r["grad_accum"]) for r in resized] == [(2, 1, 2)]
    assert resized[0]["step"] == last["step"]  # resumed from the last checkpoint before the node went
    after = steps(records[records.index(resized[0]) :])
    assert {r["workers"] for r in after} == {1}
    pretrain = PretrainConfig(**yaml.safe_load(config.read_text()))
    batch = BatchSplit(pretrain.global_batch_size, pretrain.micro_batch_size)
    recipe = pretrain_recipe(pretrain, 1000, batch, 16)
    assert [r["lr"] for r in after] == pytest.approx([recipe.lr_at(r["step"] - 1) for r in after])
    assert after[-1]["step"] == 1000
    assert events(records, "finished")[-1]["step"] == 1000
    assert_learned(records)
    before = [r for r in steps(records[: records.index(resized[0])]) if r["step"] <= last["step"]][-1]
    fresh = steps(records)[0]["loss"]
    assert abs(after[0]["loss"] - before["loss"]) < abs(after[0]["loss"] - fresh) / 2  # the weights came too
    final = list_checkpoints(str(run_dir))[-1]
    assert (final.step, final.meta["world_size"]) == (1000, 1)
    assert f"preemption notice for rank(s) {notice['ranks']}" in stdout
    assert f"resized 2 -> 1 worker(s) at step {last['step']}" in stdout
    status = run_vitpipe("status", str(run_dir))
    assert f"1 worker(s); resized 2 -> 1 worker(s) at step {last['step']}" in status.stdout, status.stdout


@pytest.mark.slow
def test_a_node_that_joins_later_grows_the_group_back_at_a_checkpoint_losing_no_step(
    ray_local, fractal_patches, tmp_path
):
    """An elastic run started on a one-node cluster trains on one worker; a node joins; rank 0 sees the
    room, checkpoints and regroups, and the run goes on with two workers from exactly that step: every
    step is trained once."""
    with one_worker_nodes(1) as cluster:
        config = write_config(tmp_path / "grow.yaml", fractal_patches, **{**ELASTIC, "log_every": 1})
        run_dir = tmp_path / "grow"
        command = ["pretrain", str(config), "--storage", str(tmp_path), "--address", cluster.address]
        with _launch(command) as run:
            started = wait_for(
                run_dir, run, lambda records: any(r.get("step", 0) >= 10 for r in steps(records))
            )
            cluster.add_node(num_cpus=1)
            stdout, stderr = run.communicate(timeout=500)
    assert started, stderr[-3000:]
    assert run.returncode == 0, stderr[-3000:]
    records = read_records(str(run_dir))
    assert events(records, "started")[0]["workers"] == 1
    resized = events(records, "resized")
    assert [(r["from_workers"], r["workers"], r["grad_accum"]) for r in resized] == [(1, 2, 1)]
    room = events(records, "room")[0]
    assert resized[0]["step"] == room["step"]
    assert room["step"] in [r["step"] for r in events(records, "checkpoint")]
    assert [r["step"] for r in steps(records)] == list(range(1, 301))  # none lost, none trained twice
    assert {r["workers"] for r in steps(records[records.index(resized[0]) :])} == {2}
    assert "the cluster has room for 1 more worker(s)" in stdout
    assert f"regrouping at step {room['step']}" in stderr
    assert_learned(records)


@pytest.mark.slow
def test_a_cluster_below_the_minimum_is_waited_for_then_refused_naming_min_and_what_it_has(
    two_nodes, fractal_patches, tmp_path
):
    """Five workers at least, on a cluster of four CPUs: Ray Train would wait for ever; vitpipe waits
    `elastic_wait_s`, then fails naming the minimum and the resources it saw, and keeps nothing."""
    config = write_config(
        tmp_path / "small.yaml",
        fractal_patches,
        num_workers=[5, 6],
        global_batch_size=240,
        micro_batch_size=8,
        elastic_wait_s=3.0,
    )
    started = time.monotonic()
    result = run_vitpipe("pretrain", str(config), "--storage", str(tmp_path), "--address", two_nodes.address)
    assert result.returncode != 0
    assert time.monotonic() - started >= 3
    assert "waiting for the cluster to place at least 5 worker(s)" in result.stderr
    assert (
        "could not place the run's minimum of 5 worker(s) for 3 s (elastic_wait_s): the cluster has 4 CPU "
        "on 2 live node(s): room for 4 worker(s) of 1 CPU" in result.stderr
    ), result.stderr[-3000:]
    assert not list(tmp_path.rglob("checkpoint_*"))


# ---------------------------------------------------------------- the pieces, without a training run


def test_workers_are_placed_node_by_node_not_from_the_cluster_s_sum():
    """Three nodes with 1.5 free CPUs each hold three 1-CPU workers, not four; a GPU worker needs both."""
    cpu = WorkerGroup(1, 4, {"CPU": 1.0})
    assert placeable(cpu, [{"CPU": 1.5}] * 3) == 3
    gpu = WorkerGroup(1, 4, {"CPU": 8.0, "GPU": 1.0})
    assert placeable(gpu, [{"CPU": 96.0, "GPU": 8.0}, {"CPU": 96.0}, {"CPU": 4.0, "GPU": 1.0}]) == 8


def test_a_regroup_is_tried_once_per_set_of_live_nodes():
    """Room a regroup could not use (another job's CPUs) does not restart the group again and again; a
    changed cluster may be tried."""
    control = RunControl()
    assert control.try_regroup(["b", "a"])
    assert not control.try_regroup(["a", "b"])
    assert control.try_regroup(["a", "b", "c"])


def test_the_driver_waits_for_the_minimum_then_aborts_the_group_naming_what_it_saw(ray_local, monkeypatch):
    """Below min: one line when the wait starts, the fit's controller aborted and a clear error after
    `elastic_wait_s`; a cluster that can place min again resets the wait (on the session's 2-CPU Ray)."""

    class Control:  # the run's RunControl actor, as the watch calls it
        aborted = 0

        class abort_group:  # noqa: N801
            @staticmethod
            def remote():
                Control.aborted += 1
                return ray_ref

    ray_ref = ray.put(None)
    monkeypatch.setattr(elastic, "CLUSTER_POLL_SECONDS", 0.0)
    lines: list[str] = []
    monkeypatch.setattr(elastic, "say", lambda line, err=False: lines.append(line))
    fits = elastic.MinimumWatch(WorkerGroup(2, 2, {"CPU": 1.0}), wait_s=0.2, control=Control)
    fits()
    assert fits.below_since is None  # 2 CPUs hold 2 workers
    watch = elastic.MinimumWatch(WorkerGroup(3, 4, {"CPU": 1.0}), wait_s=0.3, control=Control)
    watch()
    assert lines[-1].startswith("pretrain: waiting for the cluster to place at least 3 worker(s)")
    watch.bounds = WorkerGroup(2, 4, {"CPU": 1.0})  # as if a node came back
    watch()
    assert watch.below_since is None
    assert lines[-1] == "pretrain: the cluster can place 2 worker(s) again"
    watch.bounds = WorkerGroup(3, 4, {"CPU": 1.0})
    watch()
    time.sleep(0.35)
    with pytest.raises(elastic.GroupBelowMinimumError, match=r"minimum of 3 worker\(s\) for 0 s.*room for 2"):
        watch()
    assert Control.aborted == 1


def test_an_elastic_launch_waits_less_for_a_group_ray_cannot_place_unless_the_user_says_otherwise(
    monkeypatch,
):
    monkeypatch.delenv(START_TIMEOUT_VARIABLE, raising=False)
    with _elastic_start_timeout(elastic=True):
        assert os.environ[START_TIMEOUT_VARIABLE] == "10"
    assert START_TIMEOUT_VARIABLE not in os.environ
    with _elastic_start_timeout(elastic=False):
        assert START_TIMEOUT_VARIABLE not in os.environ
    monkeypatch.setenv(START_TIMEOUT_VARIABLE, "45")
    with _elastic_start_timeout(elastic=True):
        assert os.environ[START_TIMEOUT_VARIABLE] == "45"


@pytest.mark.slow
def test_a_controller_that_never_answers_the_abort_does_not_hang_the_driver(ray_local):
    """Ray Train's controller, stuck waiting for placement, may never answer `abort`: the driver giving up
    on the group waits ABORT_WAIT_S for it at most, then goes on to fail with its message."""

    @ray.remote(num_cpus=0)
    class StuckController:
        def abort(self) -> None:
            time.sleep(3600)

    stuck = StuckController.remote()
    control = start_control()
    ray.get(control.set_controller.remote(stuck))
    started = time.monotonic()
    ray.get(control.abort_group.remote(), timeout=ABORT_WAIT_S + 30)  # before the fix: for ever
    assert ABORT_WAIT_S - 1 <= time.monotonic() - started <= ABORT_WAIT_S + 15
    ray.kill(stuck)
    ray.kill(control)
