"""`vitpipe status`: a run folder read while another process writes it (its lock held, a step running,
a metrics line half written), a stopped run, a failed step with its log, and a job file's run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.metrics import MetricsLog
from pipeline.runner.records import write_record
from tests.conftest import REPO


def write_run(root: Path, status: str, steps: list[str]) -> None:
    listed = [{"step": step, "status": "ran", "seconds": 1.0, "note": ""} for step in steps]
    run = {"format": "vitpipe.run/1", "name": "demo", "status": status, "steps": listed}
    (root / "run.json").write_text(json.dumps(run))


def training(root: Path, total: int, steps: range) -> None:
    log = MetricsLog(str(root / "pretrain"))
    log.event("started", step=0, workers=2, total_steps=total)
    for step in steps:
        log.write({"step": step, "loss": 2.0 - step / 100, "images_per_s": 1234.0, "step_s": 0.5})
    log.close()


@pytest.fixture
def writer():
    """Another live process: the run's lock names it."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_status_of_a_run_another_process_is_writing(tmp_path, writer, capsys):
    root = tmp_path / "run"
    root.mkdir()
    write_run(root, "running", ["datasets:digits"])
    write_record(
        str(root / "stages"),
        "datasets:digits",
        {"key": "k", "status": "done", "seconds": 3.2, "finished": "2026-12-02T10:00:00"},
    )
    write_record(
        str(root / "stages"), "pretrain", {"key": "k", "status": "running", "started": "2026-12-02T10:00:01"}
    )
    (root / ".lock").write_text(json.dumps({"pid": writer.pid, "host": socket.gethostname()}))
    training(root, 600, range(10, 130, 10))
    with (root / "pretrain" / "metrics.jsonl").open("a") as stream:
        stream.write('{"step": 130, "loss": 0.7')  # the line rank 0 is writing at this moment

    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"run 'demo': running (pid {writer.pid} on {socket.gethostname()})" in out
    assert "  datasets:digits  done     3.2s, finished 2026-12-02T10:00:00" in out
    assert "  pretrain         running  since 2026-12-02T10:00:01" in out
    assert "pretraining: step 120/600 (20%), loss 0.8000, 1,234 img/s, ETA 4m00s" in out

    writer.kill()
    writer.wait()  # the writer is gone without ending its run: said so, not "running"
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "run 'demo': stopped (its process is gone)" in out
    assert "  pretrain         stopped  started 2026-12-02T10:00:01; `vitpipe run` resumes it" in out
    assert "pretraining: step 120/600 (20%), loss 0.8000, 1,234 img/s\n" in out + "\n"  # no ETA: none trains
    assert "ETA" not in out
    assert " running " not in out


def test_a_side_command_s_steps_are_listed_apart_and_leave_the_run_s_state(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    write_run(root, "finished", ["pretrain", "finetune"])
    for step in ("pretrain", "finetune"):
        write_record(
            str(root / "stages"), step, {"key": "k", "status": "done", "seconds": 1.0, "fingerprint": "f"}
        )
    refused = {"key": "k", "status": "failed", "seconds": 2.0, "error": "ValueError: weights do not fit"}
    write_record(str(root / "stages"), "finetune:out-1a2b3c4d", refused)
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "run 'demo': finished" in out
    assert "last error" not in out
    assert "  side commands (other weights or targets; not the job's steps):" in out
    assert "    finetune:out-1a2b3c4d  failed   after 2.0s: ValueError: weights do not fit" in out


def test_status_names_the_last_error_and_its_log(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    write_run(root, "failed", ["pretrain"])
    failed = {"key": "k", "status": "failed", "seconds": 12.0, "error": "RuntimeError: diverged at step 40"}
    write_record(str(root / "stages"), "pretrain", failed)
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "run 'demo': failed" in out
    assert f"last error: pretrain: RuntimeError: diverged at step 40 (log: {root}/logs/pretrain.log)" in out


def test_status_of_a_job_file_reads_its_run_folder_and_refuses_what_is_neither(tmp_path, capsys):
    job = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    job["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    (tmp_path / "run").mkdir()
    write_run(tmp_path / "run", "finished", [])
    training(tmp_path / "run", 40, range(5, 45, 5))
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "run 'demo': finished" in out
    assert "pretraining: step 40/40 (100%)" in out
    assert "ETA" not in out

    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder or job file" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["status", str(tmp_path / "empty")]) == 2
    assert "not a vitpipe run folder" in capsys.readouterr().err


def test_status_names_an_unreadable_record_and_exits_non_zero(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    write_run(root, "finished", ["datasets:digits", "pretrain"])
    done = {"key": "k", "status": "done", "seconds": 3.0, "finished": "2026-12-02T10:00:00"}
    for step in ("datasets:digits", "pretrain"):
        write_record(str(root / "stages"), step, done)
    record = root / "stages" / "pretrain.json"
    record.write_text(record.read_text()[:20])  # truncated

    assert main(["status", str(root)]) == 1
    out = capsys.readouterr().out
    assert "  datasets:digits  done" in out
    assert "  pretrain         unreadable" in out  # not "pending", not "done"
    assert f"  unreadable: {record}: not valid JSON (" in out

    (root / "run.json").write_text("{not json")
    assert main(["status", str(root)]) == 1
    out = capsys.readouterr().out
    assert "run 'run': unknown (run.json is unreadable)" in out  # not "not started"
    assert f"  unreadable: {root / 'run.json'}: not valid JSON (" in out
    assert "  datasets:digits  done" in out  # the records it could read are still shown

    (root / "run.json").write_text(json.dumps({"status": "finished", "steps": "all"}))
    record.write_text("[]")
    assert main(["status", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"unreadable: {root / 'run.json'}: its 'steps' is not a list of steps" in out
    assert f"unreadable: {record}: not a JSON object" in out

    (root / "job.yaml").write_text("name: [")  # the run's copy of its job, damaged
    assert main(["status", str(root)]) == 1
    assert f"unreadable: {root / 'job.yaml'}: not valid YAML" in capsys.readouterr().out
