"""Experiment tracking against a real `mlflow server` on 127.0.0.1 (read back with MLflow's own client)
and W&B in offline mode (read back from the run files it writes): one run per vitpipe run with children,
the resolved config as flattened parameters, every step's metrics, artifacts, the same runs after a
relaunch, and an unreachable server as a warning only."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from wandb.proto import wandb_internal_pb2

from pipeline import tracking
from pipeline.config import TrackingConfig
from pipeline.metrics import MetricsLog
from tests.conftest import free_port

NESTED = {
    "name": "tracked",
    "pretrain": {
        "optimizer": {"name": "adamw", "lr": 0.003, "betas": [0.9, 0.999]},
        "steps": 40,
        "crop": None,
        "model": {"variant": "Ti/16", "overrides": {}},
    },
    "note": "x" * 10_000,  # longer than MLflow takes: truncated, not refused
}


@pytest.fixture(autouse=True)
def trackers_on():
    """A failed tracker is off for the rest of its process; each test starts with both on. W&B leaves
    its service's address in this process's environment (WANDB_SERVICE), where every later `vitpipe`
    subprocess of the session would inherit it and talk to a service that is gone: it is ended here."""
    tracking._failed.clear()
    yield
    tracking._failed.clear()
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    os.environ.pop("WANDB_SERVICE", None)


def client(uri: str):
    return MlflowClient(tracking_uri=uri)


def log_steps(target: tracking.TrackingTarget, run_dir: Path, steps: range) -> None:
    """Steps logged the way rank 0 logs them: through the run's MetricsLog."""
    log = MetricsLog(str(run_dir), target)
    for step in steps:
        log.write(
            {"step": step, "loss": 1.0 / step, "accuracy": step / 100, "mfu": None, "grad_norm": float("nan")}
        )
    log.close()


def test_a_run_and_its_children_are_read_back_with_mlflows_client(mlflow_server, tmp_path):
    section = TrackingConfig(mlflow=mlflow_server, experiment="vitpipe-test-a")
    parent = tracking.open_run(section, str(tmp_path / "run"), "tracked", NESTED)
    child = tracking.open_child(parent, "pretrain", "pretrain", {"steps": 40, "optimizer": {"lr": 0.003}})
    log_steps(child, tmp_path / "pretrain", range(1, 31))
    picture = tmp_path / "loss.png"
    picture.write_bytes(b"\x89PNG not really")
    tracking.log_artifacts(child, [picture, tmp_path / "missing.png"])
    tracking.end(child, "FINISHED")

    mlflow = client(mlflow_server)
    run = mlflow.get_run(parent.mlflow_run)
    assert run.data.params["pretrain.optimizer.lr"] == "0.003"
    assert run.data.params["pretrain.optimizer.betas"] == "[0.9, 0.999]"
    assert run.data.params["pretrain.crop"] == "None"
    assert len(run.data.params["note"]) == tracking.MAX_PARAM_LENGTH
    assert run.info.run_name == "tracked"
    kids = mlflow.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    assert [kid.info.run_id for kid in kids] == [child.mlflow_run]
    assert kids[0].info.status == "FINISHED"
    history = mlflow.get_metric_history(child.mlflow_run, "loss")
    assert sorted(m.step for m in history) == list(range(1, 31))
    assert {round(m.value, 6) for m in history if m.step == 4} == {0.25}
    assert mlflow.get_metric_history(child.mlflow_run, "grad_norm") == []  # non-finite numbers are not sent
    assert [a.path for a in mlflow.list_artifacts(child.mlflow_run)] == ["loss.png"]


def test_a_relaunch_continues_the_same_tracking_runs(mlflow_server, tmp_path):
    section = TrackingConfig(mlflow=mlflow_server, experiment="vitpipe-test-b")
    root = str(tmp_path / "run")
    first = tracking.open_run(section, root, "tracked", NESTED)
    child = tracking.open_child(first, "pretrain", "pretrain", {"steps": 40})
    log_steps(child, tmp_path / "pretrain", range(1, 11))  # then the driver is killed: nothing ended

    again = tracking.open_run(
        section, root, "tracked", {**NESTED, "pretrain": {"steps": 80}}
    )  # a bigger budget
    resumed = tracking.open_child(again, "pretrain", "pretrain", {"steps": 80})
    log_steps(resumed, tmp_path / "pretrain", range(11, 21))
    tracking.end(resumed, "FINISHED")

    assert (again.mlflow_run, resumed.mlflow_run) == (first.mlflow_run, child.mlflow_run)
    mlflow = client(mlflow_server)
    run = mlflow.get_run(again.mlflow_run)
    assert run.data.params["pretrain.steps"] == "40"  # MLflow parameters are immutable: the first stays
    assert run.data.tags["vitpipe.changed.pretrain.steps"] == "80"  # and the change is kept beside it
    assert sorted(m.step for m in mlflow.get_metric_history(child.mlflow_run, "loss")) == list(range(1, 21))
    experiment = run.info.experiment_id
    assert len(mlflow.search_runs([experiment])) == 2  # one vitpipe run, one child: nothing duplicated


def test_an_unreachable_server_is_a_warning_and_the_run_goes_on(tmp_path, capsys):
    nobody = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    parent = tracking.open_run(TrackingConfig(mlflow=nobody), str(tmp_path / "run"), "tracked", NESTED)
    assert time.monotonic() - started < 10  # known in seconds, not after MLflow's retries
    assert parent.mlflow_run is None
    assert f"tracking (mlflow) at {nobody}" in capsys.readouterr().err
    child = tracking.open_child(parent, "pretrain", "pretrain", {})
    assert not child.enabled
    log_steps(child, tmp_path / "pretrain", range(1, 4))  # the records are written all the same
    assert len((tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_server_lost_mid_run_warns_once_and_logging_goes_on(mlflow_server, tmp_path, capsys):
    section = TrackingConfig(mlflow=mlflow_server, experiment="vitpipe-test-c")
    parent = tracking.open_run(section, str(tmp_path / "run"), "tracked", {})
    child = tracking.open_child(parent, "pretrain", "pretrain", {})
    gone = tracking.TrackingTarget(
        key=child.key, mlflow_uri=f"http://127.0.0.1:{free_port()}", mlflow_run=child.mlflow_run
    )
    log_steps(gone, tmp_path / "pretrain", range(1, 6))
    log_steps(gone, tmp_path / "pretrain", range(6, 11))
    assert capsys.readouterr().err.count("tracking (mlflow) logging metrics failed") == 1
    assert len((tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()) == 10


# ---------------------------------------------------------------- W&B offline, read from its files


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: W&B's LevelDB-log framing (32 KiB blocks of 7-byte-headed
    chunks) around protobuf `Record`s."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_runs_are_read_back_from_their_files(tmp_path):
    section = TrackingConfig(
        wandb={"project": "vitpipe-test", "mode": "offline", "dir": str(tmp_path / "wandb")}
    )
    parent = tracking.open_run(section, str(tmp_path / "run"), "tracked", NESTED)
    child = tracking.open_child(parent, "pretrain", "pretrain", {"optimizer": {"lr": 0.003}})
    log_steps(child, tmp_path / "pretrain", range(1, 11))
    card = tmp_path / "README.md"
    card.write_text("# a model card\n")
    tracking.log_artifacts(child, [card])

    folders = sorted((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{child.wandb['id']}*"))
    assert len(folders) == 2  # the steps (rank 0), then the artifacts (the driver), as one run id
    records = [r for folder in folders for r in wandb_records(next(folder.glob("*.wandb")))]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {(run.run_id, run.run_group, run.display_name, run.project) for run in runs} == {
        (child.wandb["id"], parent.wandb["group"], "pretrain", "vitpipe-test")
    }
    configs = [{item.key: json.loads(item.value_json) for item in run.config.update} for run in runs]
    assert all(config["step.optimizer.lr"] == 0.003 for config in configs)  # the child's settings, flattened
    assert all(config["pretrain.optimizer.betas"] == [0.9, 0.999] for config in configs)  # and the job's
    history = [
        (
            r.history.step.num,
            {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item},
        )
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [step for step, _ in history] == list(range(1, 11))
    assert [round(row["loss"], 6) for _, row in history][:2] == [1.0, 0.5]
    assert all("grad_norm" not in row for _, row in history)
    assert (folders[1] / "files" / "README.md").read_text() == "# a model card\n"


def test_a_relative_store_is_the_same_store_for_every_process(tmp_path, monkeypatch):
    """Ray workers run in other directories: a relative MLflow folder or sqlite file is made absolute."""
    monkeypatch.chdir(tmp_path)
    assert tracking.absolute_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert tracking.absolute_uri("mlruns") == str(tmp_path / "mlruns")
    for kept in ("sqlite:////abs/db.sqlite", "http://127.0.0.1:5000", "file:///abs/mlruns", "databricks"):
        assert tracking.absolute_uri(kept) == kept
    parent = tracking.open_run(TrackingConfig(mlflow="sqlite:///store.db"), str(tmp_path / "run"), "rel", {})
    monkeypatch.chdir("/")
    child = tracking.open_child(parent, "pretrain", "pretrain", {})  # as a worker elsewhere would
    log_steps(child, tmp_path / "pretrain", range(1, 4))
    history = client(parent.mlflow_uri).get_metric_history(child.mlflow_run, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert (tmp_path / "store.db").is_file()


def test_a_sqlite_stores_artifacts_sit_beside_its_database_not_in_each_processs_directory(
    tmp_path, monkeypatch
):
    """MLflow puts a sqlite store's artifacts in `./mlruns` of the process that logs them (the repository
    a test runs from, or each Ray worker's directory); vitpipe's experiments keep them beside the database."""
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    section = TrackingConfig(mlflow=f"sqlite:///{store / 'mlflow.db'}", experiment="beside-the-db")
    parent = tracking.open_run(section, str(tmp_path / "run"), "sqlite", {})
    picture = tmp_path / "loss.png"
    picture.write_bytes(b"\x89PNG not really")
    tracking.log_artifacts(parent, [picture])
    assert list(store.glob("mlartifacts/*/artifacts/loss.png"))
    assert not list(elsewhere.iterdir())
