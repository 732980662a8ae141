"""The `vitpipe` command line as users call it: exit codes, messages, the preview picture."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.datasets.card import read_card
from pipeline.preprocess.manifest import read_manifest
from pipeline.storage import URL_OPTIONS
from tests.conftest import GOOD_JOB, REPO, run_vitpipe


def test_datasets_fractals_with_preview(tmp_path, ray_local, capsys):
    out = tmp_path / "fr"
    code = main(
        [
            "datasets",
            "fractals",
            str(out),
            "--classes",
            "3",
            "--per-class",
            "4",
            "--size",
            "24",
            "--shard-size",
            "5",
            "--seed",
            "3",
            "--preview",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "train: 12 samples in 3 shard(s)" in printed
    preview = Image.open(out / "preview.png")
    assert preview.size[1] == 3 * 66  # one row per class
    assert read_card(out)["config"]["seed"] == 3


def test_existing_output_is_refused_with_exit_1(tmp_path, ray_local, capsys):
    out = tmp_path / "d"
    assert main(["datasets", "digits", str(out)]) == 0
    capsys.readouterr()
    assert main(["datasets", "digits", str(out)]) == 1
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")  # a file of the user's beside the dataset
    assert main(["datasets", "digits", str(out), "--overwrite", "--test-fraction", "0.5"]) == 0
    assert read_card(out)["splits"]["test"]["samples"] in (898, 899)
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaced the dataset, nothing else
    assert f"{out}: kept notes.txt (not the dataset's)" in capsys.readouterr().out


def test_imagefolder_missing_source_exit_1(tmp_path, ray_local, capsys):
    assert main(["datasets", "imagefolder", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "nothing: image folder does not exist" in capsys.readouterr().err


def test_imagefolder_shard_limits_from_the_command_line(tmp_path, capsys):
    assert (
        main(["datasets", "imagefolder", "src", "out", "--shard-samples", "none", "--shard-bytes", "none"])
        == 2
    )
    assert "set shard_samples, shard_bytes or both" in capsys.readouterr().err
    assert main(["datasets", "imagefolder", "src", "out", "--shard-samples", "many"]) == 2
    assert "--shard-samples: expected a whole number or 'none', got 'many'" in capsys.readouterr().err
    assert main(["datasets", "imagefolder", "src", "out", "--shard-bytes", "lots"]) == 2
    assert "--shard-bytes: could not parse value and unit from byte string" in capsys.readouterr().err


def test_validate_prints_resolved_config(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD_JOB)
    assert main(["validate", str(path)]) == 0
    printed = capsys.readouterr().out
    resolved = json.loads(printed.split("\n", 1)[1])
    assert resolved["pretrain"]["optimizer"]["betas"] == [0.9, 0.999]
    path.write_text(GOOD_JOB.replace("zero_stage: 2", "zero_stage: 5"))
    assert main(["validate", str(path)]) == 2
    assert "pretrain.zero_stage" in capsys.readouterr().err


def test_info_reports_versions_and_accelerator():
    result = run_vitpipe("info")
    assert result.returncode == 0, result.stderr
    for name in (
        "python",
        "torch",
        "ray",
        "deepspeed",
        "webdataset",
        "pyarrow",
        "accelerator",
        "ray cluster",
    ):
        assert name in result.stdout
    assert "missing" not in result.stdout


def test_the_quickstart_data_stages_build_and_preprocess_both_datasets(tmp_path, ray_local, capsys):
    run = tmp_path / "quickstart"
    assert (
        main(["run", str(REPO / "jobs" / "quickstart.yaml"), "--run-dir", str(run), "--until", "preprocess"])
        == 0
    )
    assert read_card(run / "datasets" / "fractals")["splits"]["train"]["samples"] == 5000
    assert read_card(run / "datasets" / "digits")["splits"]["test"]["samples"] == 360
    assert (run / "datasets" / "fractals" / "preview.png").is_file()
    assert read_manifest(str(run / "patches" / "fractals"))["totals"]["samples"] == 5000
    assert read_manifest(str(run / "patches" / "digits"))["splits"]["test"]["samples"] == 360
    assert (run / "patches" / "digits" / "samples.png").is_file()
    assert "steps: 4 ran" in capsys.readouterr().out
    assert not (run / "pretrain").exists()
    # the analyses of a run folder whose models are not trained yet: what to run first, in that folder
    assert main(["analyze", str(run)]) == 2
    err = capsys.readouterr().err
    first = f"`vitpipe run {run / 'job.yaml'} --run-dir {run} --until pretrain` first"
    assert f"pretrain has not run in {run}; run {first}" in err
    assert not (run / "analysis").exists()
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such run folder or job file" in capsys.readouterr().err


def test_every_job_in_jobs_validates():
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert jobs
    for job in jobs:
        assert main(["validate", str(job), "--skip-inputs"]) == 0, job  # the paper-scale data is a cluster's


def test_a_jobs_address_without_a_scheme_is_the_dashboard_and_fails_in_seconds():
    # In a process of its own: `jobs` may turn Ray's token mode on, which Ray reads once, at import.
    done = run_vitpipe("jobs", "list", "--address", "127.0.0.1:1", timeout=30)
    assert done.returncode == 1
    assert "the Ray Jobs API at http://127.0.0.1:1: nothing answers at 127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr


def test_data_only_flags_that_do_not_fit_are_refused_saying_why(capsys):
    job = str(REPO / "jobs" / "smoke.yaml")
    assert main(["pretrain", job, "--data-only", "--force"]) == 2
    assert "--data-only trains nothing; drop --force" in capsys.readouterr().err
    assert main(["pretrain", job, "--data-only", "--steps", "0"]) == 2
    assert "--steps must be at least 1 (got 0)" in capsys.readouterr().err
    assert main(["pretrain", job, "--steps", "5"]) == 2
    assert "--steps goes with --data-only" in capsys.readouterr().err


def test_the_guard_fails_a_command_that_reaches_ray(cli_before_ray, tmp_path):
    """cli_before_ray itself: `vitpipe datasets` joins Ray once its options are valid, through a
    `connect_ray` it imports as it runs (after the guard replaced the function), and the test fails, though
    the command turns the guard's error into an exit code of its own."""
    with pytest.raises(AssertionError, match="started or joined Ray"):
        cli_before_ray("datasets", "digits", str(tmp_path / "digits"))
    assert not (tmp_path / "digits").exists()


def test_every_command_taking_a_url_refuses_a_wrong_or_unreachable_one_in_one_line(cli_before_ray, tmp_path):
    bogus = "s3://bucket/runs?bogus=1"
    job = tmp_path / "job.yaml"
    job.write_text("name: j\npretrain:\n  model: {variant: Ti/4}\n  data: " + bogus + "\n")
    weights = tmp_path / "w.yaml"
    weights.write_text("name: w\nfinetune:\n  targets: [digits]\n")
    for command in (
        ["preprocess", bogus, str(tmp_path / "out")],
        ["preprocess", str(tmp_path), bogus],
        ["pretrain", str(job), "--storage", bogus],
        ["export", bogus],
        ["export", str(tmp_path), "--out", bogus],
        ["inspect", bogus],
        ["analyze", bogus],
        ["finetune", str(weights), "--weights", bogus],
        ["evaluate", str(weights), "--target", f"digits={bogus}"],
    ):
        code, stderr = cli_before_ray(*command)
        assert code == 1, (command, stderr)
        known = ", ".join(URL_OPTIONS["s3"])
        assert stderr.splitlines() == [
            f"vitpipe: error: {bogus}: unknown s3:// URL option 'bogus' (known: {known})"
        ]
    code, stderr = cli_before_ray("validate", str(job))  # a job file's URL: named with its file and step
    assert code == 2
    assert f"{job}: " in stderr
    assert "unknown s3:// URL option 'bogus'" in stderr
    assert len(stderr.splitlines()) == 1

    unreachable = "s3://bucket/corpus?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"
    code, stderr = cli_before_ray("preprocess", unreachable, str(tmp_path / "out"))
    assert code == 1
    assert stderr.startswith(f"vitpipe: error: {unreachable}: cannot reach the S3 endpoint 127.0.0.1:1: ")
    assert len(stderr.splitlines()) == 1
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
