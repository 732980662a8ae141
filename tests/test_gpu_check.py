"""benchmarks/gpu/check.sh, the prepared GPU check, kept from rotting between GPU runs: its `--cpu` mode runs
the same script and path (synthetic Parquet patch shards, Ray Train workers, DeepSpeed ZeRO-2 bf16) at toy
size, and the GPU configurations are valid jobs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.gpu.check import CPU, GPU, Report, job_config
from tests.conftest import REPO

SECTIONS = ["machine", "matmul", "host_to_device", "augmentation", "data", "pretrain", "nan_check", "summary"]


@pytest.mark.slow
def test_cpu_mode_measures_every_section_and_names_what_the_deadline_skipped(tmp_path):
    """One run (activation checkpointing on), the compiled one skipped by the deadline (planned at 150 s, with
    less than that left), the others not selected: every section in the JSON, the run's numbers in it."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    command = ["bash", str(REPO / "benchmarks/gpu/check.sh"), "--cpu", "--configs", "tiny-eager-ac,tiny-compiled",
               "--deadline-s", "120"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert (tmp_path / "gpu_check_cpu.log").stat().st_size > 0
    assert list(report["sections"]) == SECTIONS
    assert {name: s["status"] for name, s in report["sections"].items()} == dict.fromkeys(SECTIONS, "done")
    (row,) = report["pretrain"]["rows"]
    assert (row["name"], row["status"], row["activation_checkpointing"], row["workers"]) == (
        "tiny-eager-ac", "done", True, 2,
    )  # fmt: skip
    assert row["steps_done"] == 4 and row["steps_timed"] == 3
    assert row["images_per_s"] > 0 and row["mfu_measured_matmul"] > 0 and row["mfu_datasheet"] is None
    assert 0 <= row["data_wait_share"] < 1 and row["peak_memory_gib"] is None  # CUDA only
    assert len(row["losses"]) == 4 and all(math.isfinite(loss) for loss in row["losses"])
    skipped = {item["name"]: item["reason"] for item in report["pretrain"]["skipped"]}
    assert skipped.pop("tiny-compiled").startswith("the deadline: about 150 s needed")
    assert skipped == dict.fromkeys(["tiny-eager", "tiny-compiled-ac"], "not selected (--configs)")
    assert report["nan_check"]["all_finite"] is True and report["nan_check"]["steps"] == 4
    assert report["matmul"]["bf16_flops"] > 0 and report["host_to_device"]["pageable"]["gb_per_s"] > 0
    assert report["augmentation"]["inception_crop_and_flip_ms"] > 0
    assert report["data"]["images"] == CPU.images and report["summary"]["runs_done"] == 1
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
    assert on_disk["first"] == {"value": 1} and on_disk["sections"]["first"]["status"] == "done"
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
    assert config.global_batch_size % config.micro_batch_size == 0 and config.log_every == 1
    assert [c.name for c in GPU.configurations][:5] == [
        "b16-eager", "b16-compiled", "b16-compiled-ac", "l16-compiled", "l16-compiled-ac",
    ]  # fmt: skip
