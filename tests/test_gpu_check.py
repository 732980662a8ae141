"""benchmarks/gpu/check.sh, the prepared GPU check, kept from rotting between GPU runs: its `--cpu` mode runs
the same script and path (synthetic Parquet patch shards, Ray Train workers, DeepSpeed ZeRO-2 bf16) at toy
size, and the GPU configurations are valid jobs."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from benchmarks.gpu.check import CPU, GPU, Deadline, Report, job_config, measured
from tests.conftest import REPO

SECTIONS = ["machine", "matmul", "host_to_device", "augmentation", "data", "pretrain", "nan_check", "summary"]


@pytest.mark.slow
def test_cpu_mode_measures_every_section_and_names_what_the_deadline_skipped(tmp_path):
    """One run (activation checkpointing on), the compiled one skipped by the deadline (planned at 150 s, with
    less than that left), the others not selected: every section in the JSON, the run's numbers in it."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    command = [
        "bash",
        str(REPO / "benchmarks/gpu/check.sh"),
        "--cpu",
        "--configs",
        "tiny-eager-ac,tiny-compiled",
        "--deadline-s",
        "140",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert (tmp_path / "gpu_check_cpu.log").stat().st_size > 0
    assert list(report["sections"]) == SECTIONS
    assert {name: s["status"] for name, s in report["sections"].items()} == dict.fromkeys(SECTIONS, "done")
    (row,) = report["pretrain"]["rows"]
    assert (row["name"], row["status"], row["activation_checkpointing"], row["workers"]) == (
        "tiny-eager-ac",
        "done",
        True,
        2,
    )
    assert row["steps_done"] == 4
    assert row["steps_timed"] == 3
    assert row["images_per_s"] > 0
    assert row["mfu_measured_matmul"] > 0
    assert row["mfu_datasheet"] is None
    assert 0 <= row["data_wait_share"] < 1
    assert row["peak_memory_gib"] is None
    assert len(row["losses"]) == 4
    assert all(math.isfinite(loss) for loss in row["losses"])
    skipped = {item["name"]: item["reason"] for item in report["pretrain"]["skipped"]}
    assert skipped.pop("tiny-compiled").startswith("the deadline: about 150 s needed")
    assert skipped == dict.fromkeys(["tiny-eager", "tiny-compiled-ac"], "not selected (--configs)")
    assert report["nan_check"]["all_finite"] is True
    assert report["nan_check"]["steps"] == 4
    assert report["matmul"]["bf16_flops"] > 0
    assert report["host_to_device"]["pageable"]["gb_per_s"] > 0
    assert report["augmentation"]["inception_crop_and_flip_ms"] > 0
    assert report["data"]["images"] == CPU.images
    assert report["summary"]["runs"] == {"done": 1, "stopped": 0, "error": 0, "skipped": 3}
    assert "tiny-compiled      skipped: the deadline" in result.stdout  # the table at the end of the output


def test_the_report_is_on_disk_after_every_section_and_a_failed_one_does_not_stop_the_rest(tmp_path):
    path = tmp_path / "check.json"
    report = Report(path, {"benchmark": "gpu_check"})
    with report.section("first") as results:
        results["value"] = 1
        assert json.loads(path.read_text())["sections"]["first"]["status"] == "running"
    with report.section("broken"):
        raise RuntimeError("lost the device")
    on_disk = json.loads(path.read_text())
    assert on_disk["first"] == {"value": 1}
    assert on_disk["sections"]["first"]["status"] == "done"
    assert on_disk["sections"]["broken"]["status"] == "error"
    assert on_disk["sections"]["broken"]["error"] == "RuntimeError: lost the device"
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("configuration", GPU.configurations, ids=lambda c: c.name)
def test_every_gpu_configuration_is_a_valid_job(configuration):
    """What only the GPU runs is still checked here: each configuration's `pretrain:` section validates."""
    config = job_config(GPU, configuration, "/data/patches")
    assert (config.use_gpu, config.bf16, config.zero_stage, config.num_workers) == (True, True, 2, 1)
    assert config.compile is configuration.compile
    assert config.activation_checkpointing is configuration.activation_checkpointing
    assert config.global_batch_size % config.micro_batch_size == 0
    assert config.log_every == 1
    assert [c.name for c in GPU.configurations][:5] == [
        "b16-eager",
        "b16-compiled",
        "b16-compiled-ac",
        "l16-compiled",
        "l16-compiled-ac",
    ]


def test_a_gpu_runs_records_become_its_row():
    """The numbers a GPU run's metrics.jsonl gives (peak memory is CUDA's alone), as `measured` reads them:
    medians over the steps after the warmup, MFU of one device against each peak."""
    configuration = GPU.configurations[0]
    steps = [
        {
            "step": step,
            "images_per_s": 1000.0 * step,
            "step_s": 256 / (1000.0 * step),
            "data_wait_s": 0.01,
            "mfu": 0.1,
            "loss": 6.9,
            "grad_norm": 1.0,
            "peak_memory_gb": 10.0 + step,
            "skipped_steps": 0,
        }
        for step in range(1, configuration.steps + 1)
    ]
    records = [{"event": "started", "time": 100.0}, *steps, {"event": "finished", "time": 130.0}]
    row = measured(records, configuration, 1e9, 1, {"datasheet": 1e15, "measured_matmul": 5e14})
    timed = steps[configuration.warmup :]
    assert (row["steps_done"], row["steps_timed"], row["train_s"]) == (configuration.steps, len(timed), 30.0)
    assert row["images_per_s"] == statistics.median(r["images_per_s"] for r in timed)
    assert row["mfu_datasheet"] == pytest.approx(row["images_per_s"] * 1e9 / 1e15)
    assert row["mfu_measured_matmul"] == pytest.approx(2 * row["mfu_datasheet"])
    assert row["peak_memory_gib"] == 10.0 + configuration.steps
    assert row["data_wait_share"] == pytest.approx(0.01 * len(timed) / sum(r["step_s"] for r in timed))
    assert row["first_step_s"] == steps[0]["step_s"]
    assert row["finite"] is True
    diverged = measured([*steps[:2], {**steps[2], "loss": float("nan")}], configuration, 1e9, 1, {})
    assert diverged["finite"] is False


def test_the_deadline_sends_the_stop_a_launch_takes_and_nothing_starts_after_it():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = Deadline(0.3)
        assert deadline.why_not(0.1) is None
        assert deadline.why_not(10).startswith("the deadline: about 10 s needed")
        with deadline.stop_when_due():  # outside a launch, the check's own handler takes the SIGINT
            time.sleep(1)
        assert deadline.signalled == "SIGINT"
        assert deadline.why_not(0) == "stopped by SIGINT"
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
