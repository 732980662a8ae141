"""`vitpipe run` before anything runs: how a job's sections must refer to each other, the stage options,
the run folder lock, and every job in jobs/ planning cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml

from pipeline.analysis.subjects import ANALYSIS_FILE
from pipeline.cli import main
from pipeline.config import digest, load_config
from pipeline.pretrain.checkpoints import step_of
from pipeline.pretrain.plan import run_identity
from pipeline.ray_session import interrupt_on_sigterm
from pipeline.runner import lock as lock_module
from pipeline.runner import records as records_module
from pipeline.runner.execute import _pretrain_lock, run_job
from pipeline.runner.layout import run_layout
from pipeline.runner.lock import LOCK_FILE, run_lock
from pipeline.runner.options import going_on
from pipeline.runner.plan import (
    Overrides,
    RunOptions,
    StageOptions,
    afresh_advice,
    load_plan,
    plan_job,
)
from pipeline.runner.records import (
    is_side,
    key_matches,
    read_record,
    step_key,
    tree_fingerprint,
    write_record,
)
from pipeline.runner.report import _transfer_section
from pipeline.runner.stages import RUNNERS, outputs_present
from pipeline.storage import join, resolve_all, target_name, url_of
from tests.conftest import REPO

PATCHES = {"image_size": 16, "patch_size": 4}
JOB = {
    "name": "checks",
    "datasets": {
        "shapes": {"kind": "fractals", "classes": 3, "per_class": 4, "size": 16},
        "digits": {"kind": "digits"},
    },
    "preprocess": {"shapes": PATCHES, "digits": PATCHES},
    "pretrain": {
        "data": "shapes",
        "model": {"variant": "Ti/4", "width": 32, "depth": 1, "heads": 1, "mlp_dim": 64},
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "steps": 2,
    },
    "finetune": {"targets": ["digits"]},
}


def write_job(tmp_path: Path, job: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**job, "run_dir": str(tmp_path / "run")}, sort_keys=False))
    return path


def changed(**sections) -> dict:
    job = json.loads(json.dumps(JOB))
    for section, value in sections.items():
        job[section] = value
    return job


def test_steps_come_in_stage_order_with_their_dependencies(tmp_path):
    job = load_config(write_job(tmp_path, JOB))
    plan = plan_job(job, "job.yaml", run_layout(job))
    datasets = ["datasets:shapes", "datasets:digits"]
    preprocess = ["preprocess:shapes", "preprocess:digits"]
    steps = [*datasets, *preprocess, "pretrain", "finetune", "analyze", "report"]
    assert [step.id for step in plan.steps] == steps
    assert plan.step("preprocess:digits").depends == ("datasets:digits",)
    assert plan.step("pretrain").depends == ("preprocess:shapes",)
    assert plan.step("finetune").depends == ("preprocess:digits", "pretrain")
    # the analyses read every trained model and B's test images; they are redone when any of those is
    assert plan.step("analyze").depends == ("pretrain", "finetune", "preprocess:digits")
    images = {"name": "digits", "directory": str(tmp_path / "run" / "patches" / "digits"), "split": "test"}
    assert plan.step("analyze").settings["images"] == images
    assert plan.step("analyze").output == str(tmp_path / "run" / "analysis")
    assert plan.step("pretrain").output == str(tmp_path / "run" / "pretrain")
    # how often to log or checkpoint does not change what pretraining computes: not part of its key
    assert "log_every" not in plan.step("pretrain").settings
    assert "steps" in plan.step("pretrain").settings


def test_a_job_that_only_pretrains_analyses_its_model_on_its_own_training_data(tmp_path):
    job = load_config(write_job(tmp_path, {k: v for k, v in JOB.items() if k != "finetune"}))
    plan = plan_job(job, "job.yaml", run_layout(job))
    assert [step.id for step in plan.steps][-3:] == ["pretrain", "analyze", "report"]
    assert plan.step("analyze").depends == ("pretrain", "preprocess:shapes")
    assert plan.step("analyze").settings["images"]["split"] == "train"
    data_only = load_config(
        write_job(tmp_path, {k: v for k, v in JOB.items() if k not in ("pretrain", "finetune")})
    )
    assert "analyze" not in [
        step.stage for step in plan_job(data_only, "job.yaml", run_layout(data_only)).steps
    ]


def test_a_pretrain_storage_path_puts_only_the_checkpoints_there(tmp_path):
    job = load_config(
        write_job(tmp_path, changed(pretrain={**JOB["pretrain"], "storage_path": "s3://bucket/vit"}))
    )
    layout = run_layout(job)
    assert layout.pretrain == "s3://bucket/vit/checks"
    assert layout.transfer == str(tmp_path / "run" / "transfer")


PRETRAIN = JOB["pretrain"]


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (
            changed(preprocess={"other": PATCHES}, pretrain={**PRETRAIN, "data": "other"}),
            "preprocess.other: there is no dataset named 'other' to read",
        ),
        (
            changed(pretrain={**PRETRAIN, "data": "digits", "model": {"variant": "Ti/8"}}),
            "pretrain.model (Ti/8) does not fit preprocess.digits: patch_size 4 in the data, 8 in the model",
        ),
        (
            changed(pretrain={**PRETRAIN, "model": {**PRETRAIN["model"], "channels": 1}}),
            "channels 3 in the data, 1 in the model "
            "(set preprocess.shapes.channels: 1 or drop model.channels)",
        ),
        (
            changed(preprocess={"digits": PATCHES}),
            "pretrain.data 'shapes' is a dataset, not preprocessed patches; add preprocess.shapes",
        ),
        (
            changed(finetune={"targets": ["shapes", "digits"]}, preprocess={"shapes": PATCHES}),
            "finetune target 'digits' is a dataset, not preprocessed patches",
        ),
        (
            changed(preprocess={"shapes": PATCHES, "digits": {**PATCHES, "patch_size": 8}}),
            "finetune target 'digits' does not fit the pretrained model",
        ),
        ({k: v for k, v in JOB.items() if k != "pretrain"}, "finetune mode 'pretrained' needs weights"),
    ],
)
def test_a_job_whose_sections_do_not_fit_together_fails_naming_the_key(tmp_path, capsys, job, message):
    assert main(["run", str(write_job(tmp_path, job))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--from", "train"], "--from: unknown stage 'train'; stages are datasets, preprocess"),
        (["--force", "pretraining"], "--force: unknown stage 'pretraining'"),
        (["--from", "finetune", "--until", "preprocess"], "--from finetune comes after --until preprocess"),
        (["--run-dir", "s3://bucket/run"], "the run folder must be a filesystem path"),
    ],
)
def test_bad_run_options_fail_before_anything_runs(tmp_path, capsys, options, message):
    assert main(["run", str(write_job(tmp_path, JOB)), *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_missing_outside_input_fails_naming_it_before_any_step(tmp_path, capsys):
    job = changed(
        preprocess={**JOB["preprocess"], "extra": {"input": str(tmp_path / "nowhere"), "image_size": 16}}
    )
    job["preprocess"]["extra"]["patch_size"] = 4
    assert main(["run", str(write_job(tmp_path, job))]) == 2
    err = capsys.readouterr().err
    assert f"preprocess:extra reads '{tmp_path / 'nowhere'}', which is unusable" in err
    assert not (tmp_path / "run" / "stages").exists()


def test_redo_options_select_stages():
    options = RunOptions(from_stage="pretrain", force=("datasets",), until="finetune")
    assert [options.redo(s) for s in ("datasets", "preprocess", "pretrain", "finetune")] == [
        True,
        False,
        True,
        True,
    ]
    assert options.beyond("report")
    assert not options.beyond("finetune")


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # a live process
    with pytest.raises(RuntimeError, match=r"in use by another vitpipe command \(pid"), run_lock(tmp_path):
        pass
    assert lock.exists()
    lock.write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname()}))  # no such process
    with run_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_export_takes_the_lock_of_the_run_it_writes_into(tmp_path, capsys):
    live = json.dumps({"pid": os.getppid(), "host": socket.gethostname()})  # a live process's lock
    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": "vitpipe.run/1", "status": "running", "steps": []}))
    (run / LOCK_FILE).write_text(live)
    assert main(["export", str(run / "pretrain")]) == 1  # RUN/pretrain/export: the run's own export
    err = capsys.readouterr().err
    assert f"{run} is in use by another vitpipe command (pid {os.getppid()}" in err
    assert "or write elsewhere with --out" in err
    assert sorted(p.name for p in (run / "pretrain").iterdir()) == []  # nothing written
    assert main(["export", str(run / "pretrain"), "--out", str(tmp_path / "copy")]) == 1  # elsewhere: no lock
    assert "no complete checkpoint" in capsys.readouterr().err
    (run / LOCK_FILE).unlink()  # the run has ended: the export runs, under the run's lock, and lets it go
    assert main(["export", str(run / "pretrain")]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (run / LOCK_FILE).exists()

    elsewhere = tmp_path / "storage" / "checks"  # a pretraining folder outside any run: its own lock
    elsewhere.mkdir(parents=True)
    (elsewhere / LOCK_FILE).write_text(live)
    assert main(["export", str(elsewhere)]) == 1
    assert f"{elsewhere} is in use by another vitpipe command" in capsys.readouterr().err


def test_a_run_locks_a_pretraining_folder_outside_it(tmp_path):
    storage = tmp_path / "storage"
    job = changed(pretrain={**JOB["pretrain"], "storage_path": str(storage)})
    plan = load_plan(write_job(tmp_path, job), None, StageOptions())
    with _pretrain_lock(plan, plan.steps):
        assert json.loads((storage / "checks" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (storage / "checks" / LOCK_FILE).exists()
    inside = load_plan(write_job(tmp_path, JOB), None, StageOptions())  # RUN/pretrain: the run's lock
    with _pretrain_lock(inside, inside.steps):
        assert not (tmp_path / "run" / "pretrain" / LOCK_FILE).exists()


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_in_jobs_validates_and_plans(path):
    job = load_config(path)
    plan = plan_job(job, str(path), run_layout(job, "/tmp/plan-only"))  # noqa: S108 (never written)
    assert plan.steps[-1].stage == "report"
    if job.study is not None:  # its points pretrain, each with the pretrain section as recipe
        assert any(step.concurrent and step.settings["pretrain"] for step in plan.steps)
    elif job.pretrain is not None:
        assert any(step.stage == "pretrain" for step in plan.steps)


def test_a_single_stage_command_points_at_the_job_run_before_preprocessing_ran(tmp_path, capsys):
    path = write_job(tmp_path, JOB)
    assert main(["pretrain", str(path)]) == 2
    err = capsys.readouterr().err
    assert "datasets:shapes has not run in" in err
    assert f"run `vitpipe run {path} --until datasets` first" in err


def test_a_done_record_without_its_fingerprint_is_treated_as_not_run(tmp_path, capsys):
    stages = tmp_path / "stages"
    write_record(str(stages), "datasets:shapes", {"key": "k", "status": "done", "fingerprint": "f"})
    assert read_record(str(stages), "datasets:shapes")["fingerprint"] == "f"
    document = json.loads((stages / "datasets.shapes.json").read_text())
    del document["fingerprint"]
    (stages / "datasets.shapes.json").write_text(json.dumps(document))
    assert read_record(str(stages), "datasets:shapes") is None
    assert "datasets.shapes.json: status 'done' without fingerprint; the step is treated as not run" in (
        capsys.readouterr().err
    )
    (stages / "datasets.shapes.json").write_text("{not json")
    assert read_record(str(stages), "datasets:shapes") is None
    assert "not valid JSON" in capsys.readouterr().err


def test_an_interrupted_run_does_not_stay_running_in_run_json(tmp_path, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setitem(RUNNERS, "datasets", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_job(write_job(tmp_path, JOB))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_results_of_other_weights_or_targets_go_beside_the_run_s_own_with_their_own_record(tmp_path):
    path = write_job(tmp_path, JOB)
    own = load_plan(path).step("finetune")
    assert (own.id, own.output) == ("finetune", str(tmp_path / "run" / "transfer"))
    for options in (
        StageOptions(weights=str(tmp_path / "other")),
        StageOptions(overrides=Overrides(targets={"digits": str(tmp_path / "d")})),
    ):
        variant = next(s for s in load_plan(path, stage=options).steps if s.stage == "finetune")
        assert variant.id.startswith("finetune:out-")  # its record is not the run's finetune record
        assert variant.output.startswith(str(tmp_path / "run" / "transfer-"))
    given = next(
        s
        for s in load_plan(path, stage=StageOptions(overrides=Overrides(out="/elsewhere"))).steps
        if s.stage == "finetune"
    )
    assert (given.output, given.id != "finetune") == ("/elsewhere", True)


def test_validate_checks_the_inputs_run_would_read(tmp_path, capsys):
    job = changed(pretrain={**JOB["pretrain"], "data": str(tmp_path / "no-patches")})
    assert main(["validate", str(write_job(tmp_path, job))]) == 2
    assert f"pretrain reads '{tmp_path / 'no-patches'}', which is unusable" in capsys.readouterr().err


def test_a_url_s_query_stays_with_every_location_derived_from_it():
    url = "s3://b/runs?endpoint_override=minio:9000&scheme=http"
    assert (
        join(url, "job", "checkpoint_00000040")
        == "s3://b/runs/job/checkpoint_00000040?endpoint_override=minio:9000&scheme=http"
    )
    assert (
        url_of(url, "b/runs/job/export") == "s3://b/runs/job/export?endpoint_override=minio:9000&scheme=http"
    )
    assert step_of(join(url, "checkpoint_00000040")) == 40
    assert target_name("s3://b/cifar-384/?scheme=http") == "cifar-384"
    assert join("/local/runs", "job") == "/local/runs/job"


def test_the_files_of_one_folder_resolve_to_one_filesystem_and_its_paths(tmp_path):
    query = "?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    filesystem, paths = resolve_all([f"s3://b/p/{n}.parquet{query}" for n in ("a", "b")])
    assert type(filesystem).__name__ == "S3FileSystem"
    assert paths == ["b/p/a.parquet", "b/p/b.parquet"]
    filesystem, paths = resolve_all([str(tmp_path / "a.parquet"), "rel/b.parquet"])
    assert paths == [str(tmp_path / "a.parquet"), str(Path("rel/b.parquet").absolute())]


def test_an_input_folders_fingerprint_walks_a_symlink_loop_once(tmp_path):
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    (folder / "cats" / "a.jpg").write_bytes(b"jpeg")
    plain = tree_fingerprint(str(folder))
    (folder / "loop").symlink_to(".")
    (folder / "cats" / "up").symlink_to("..")
    assert tree_fingerprint(str(folder)) == plain  # the same files, each once, and it ends


def test_the_report_names_a_damaged_results_file(tmp_path):
    plan = load_plan(write_job(tmp_path, JOB), None, StageOptions())
    results = Path(plan.layout.transfer) / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text('{"results": [')
    with pytest.raises(ValueError, match=f"{results}: not valid JSON"):
        _transfer_section(plan, tmp_path)


def test_a_lock_appears_with_its_holder_inside_also_where_hard_links_fail(tmp_path, monkeypatch):
    seen = []
    real_link = os.link

    def link(source, target):  # what another command reading the lock sees the moment it exists
        real_link(source, target)
        seen.append(json.loads(Path(target).read_text()))

    monkeypatch.setattr(lock_module.os, "link", link)
    with run_lock(tmp_path):
        pass
    assert seen == [
        {"pid": os.getpid(), "host": socket.gethostname()}
    ]  # never an empty lock to take for stale

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")  # gcsfuse, s3fs mounts

    monkeypatch.setattr(lock_module.os, "link", no_links)
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RuntimeError, match="in use by another vitpipe command"), run_lock(tmp_path):
            pass  # (this process holds it: a live holder)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock and no partial left behind


def test_step_keys_do_not_depend_on_where_the_run_folder_lives(tmp_path):
    """A run folder moved elsewhere (`mv runs/x ../x`) keeps every key, and so every finished step; a
    record written before keys were folder-free still matches where the folder has not moved."""
    path = write_job(tmp_path, JOB)
    here, moved = load_plan(path), load_plan(path, str(tmp_path / "elsewhere" / "run"))
    upstream = {"preprocess:digits": "f"}
    differ = {step.id for step in here.steps if step.settings != moved.step(step.id).settings}
    assert {"finetune", "analyze"} <= differ  # their settings name folders of the run
    for step in here.steps:
        assert step_key(step.settings, upstream, {}, here.layout.root) == step_key(
            moved.step(step.id).settings, upstream, {}, moved.layout.root
        ), step.id
    finetune = here.step("finetune")
    assert "RUN/patches/digits" in json.dumps(records_module._in_run(finetune.settings, here.layout.root))
    legacy = {"key": digest({"settings": finetune.settings, "upstream": upstream, "external": {}})}
    assert key_matches(legacy, finetune.settings, upstream, {}, here.layout.root)
    assert not key_matches(legacy, moved.step("finetune").settings, upstream, {}, moved.layout.root)
    assert not key_matches({"key": "other"}, finetune.settings, upstream, {}, here.layout.root)


def test_a_damaged_output_record_is_not_trusted_and_its_step_runs_again(tmp_path, capsys):
    analyze = load_plan(write_job(tmp_path, JOB)).step("analyze")
    marker = Path(analyze.output) / ANALYSIS_FILE
    marker.parent.mkdir(parents=True)
    for damaged in ('{"models": [', "[1, 2]", "\xff\xfe"):
        marker.write_bytes(damaged.encode("latin-1"))
        assert not outputs_present(analyze)
        assert f"[run] {marker}: damaged" in capsys.readouterr().err
    marker.write_text('{"models": []}')
    assert outputs_present(analyze)


def test_a_lock_being_written_is_not_taken_for_a_stale_one(tmp_path):
    """On a mount without hard links the lock is created empty, then filled: a command that reads it in
    between waits its turn; an empty lock left long ago (its writer died) is taken over."""
    (tmp_path / LOCK_FILE).write_text("")
    with pytest.raises(RuntimeError, match="in use by another vitpipe command"), run_lock(tmp_path):
        pass
    long_ago = time.time() - 3600
    os.utime(tmp_path / LOCK_FILE, (long_ago, long_ago))
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_continue_with_leaves_out_the_options_that_would_redo_the_stopped_work():
    assert going_on(["pretrain", "j.yaml", "--force", "pretrain"]) == ["pretrain", "j.yaml"]
    assert going_on(["pretrain", "j.yaml", "--force", "--name", "n"]) == ["pretrain", "j.yaml", "--name", "n"]
    assert going_on(["run", "j.yaml", "--force", "study", "--point", "p1"]) == [
        "run",
        "j.yaml",
        "--point",
        "p1",
    ]
    assert going_on(["run", "j.yaml", "--force=study", "--from", "pretrain", "--until", "report"]) == [
        "run",
        "j.yaml",
        "--until",
        "report",
    ]
    assert going_on(["pretrain", "j.yaml", "--force", "--address", "x"]) == [
        "pretrain",
        "j.yaml",
        "--address",
        "x",
    ]


def test_an_interrupt_without_a_message_says_interrupted(tmp_path, monkeypatch, capsys):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setitem(RUNNERS, "datasets", interrupted)
    assert main(["run", str(write_job(tmp_path, JOB))]) == 130
    assert "vitpipe: interrupted" in capsys.readouterr().err


def test_the_advice_to_start_afresh_changes_what_decides_the_run_folder(tmp_path):
    """A refused run is advised what would put a new one beside it: with run_dir set, another name
    changes nothing."""
    path = write_job(tmp_path, JOB)  # run_dir set
    assert afresh_advice(load_plan(path)) == "set the job's run_dir to another folder"
    assert afresh_advice(load_plan(path, str(tmp_path / "other"))) == "run it with another --run-dir"
    assert afresh_advice(load_plan(path, str(tmp_path / "run"))) == "run it with another --run-dir"  # its own
    (tmp_path / "named.yaml").write_text(yaml.safe_dump(JOB))  # no run_dir: runs/NAME
    assert "give the job another name" in afresh_advice(load_plan(tmp_path / "named.yaml"))
    stored = changed(pretrain={**JOB["pretrain"], "storage_path": str(tmp_path / "store")})
    (tmp_path / "stored.yaml").write_text(yaml.safe_dump(stored))
    assert "pretrain.storage_path/NAME" in afresh_advice(load_plan(tmp_path / "stored.yaml"))


def test_a_job_file_kept_in_a_run_folder_acts_on_that_folder_wherever_it_moved(tmp_path):
    """`vitpipe finetune MOVED/job.yaml`: the run folder is the one the job file is kept in, not the
    run_dir the job names (where the folder was before it moved)."""
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "job.yaml").write_text(yaml.safe_dump({**JOB, "run_dir": str(tmp_path / "run")}))
    assert load_plan(moved / "job.yaml").layout.root == str(tmp_path / "run")  # no run.json: the job's own
    (moved / "run.json").write_text("{}")
    plan = load_plan(moved / "job.yaml")
    assert (plan.layout.root, plan.run_dir_given) == (str(moved), True)
    assert plan.step("finetune").output == str(moved / "transfer")


def test_sigterm_once_ray_is_joined_stops_a_run_as_interrupted(tmp_path, monkeypatch, capsys):
    """ray.init's own SIGTERM handler exits at once (the run stayed "failed", without a word); vitpipe's,
    installed after it, stops the run as Ctrl-C does."""
    previous = signal.getsignal(signal.SIGTERM)

    def terminated(*_):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in this thread before this ends
        raise AssertionError("SIGTERM did not interrupt the step")

    monkeypatch.setitem(RUNNERS, "datasets", terminated)
    try:
        interrupt_on_sigterm()
        assert main(["run", str(write_job(tmp_path, JOB))]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "vitpipe: stopped by SIGTERM" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"


def test_only_a_finetune_or_evaluate_item_is_a_side_command():
    assert is_side("finetune:out-1a2b3c4d")
    assert is_side("evaluate:out-1a2b3c4d")
    assert not is_side("preprocess:out-cifar")  # a name the job chose
    assert not is_side("finetune")


@pytest.mark.parametrize(
    ("pretrain", "message"),
    [
        ({"export": {"select": "best"}}, "export.select: best is the step the probes scored best: set eval"),
        ({"export": {"weights": "ema"}}, "export.weights: ema exports the EMA weights: set ema"),
        ({"eval": {"every": 10, "select_shots": 3}}, "pretrain.eval.select_shots 3 is not one of the shots"),
        ({"ema": {"decay": 1.0}}, "pretrain.ema.decay"),
    ],
)
def test_probes_ema_and_export_settings_that_cannot_work_are_refused_before_anything_runs(
    tmp_path, capsys, pretrain, message
):
    job = changed(pretrain={**JOB["pretrain"], **pretrain})
    assert main(["run", str(write_job(tmp_path, job))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_probes_of_a_dataset_not_preprocessed_are_refused_naming_it(tmp_path, capsys):
    probed = {**JOB["pretrain"], "eval": {"every": 5, "targets": ["digits"]}}
    job = changed(pretrain=probed, preprocess={"shapes": PATCHES})
    assert main(["run", str(write_job(tmp_path, job))]) == 2
    assert "pretrain.eval target 'digits' is a dataset, not preprocessed patches" in capsys.readouterr().err


def test_probes_without_targets_need_a_finetune_section(tmp_path, capsys):
    job = {
        k: v
        for k, v in changed(pretrain={**JOB["pretrain"], "eval": {"every": 5}}).items()
        if k != "finetune"
    }
    assert main(["run", str(write_job(tmp_path, job))]) == 2
    assert "pretrain.eval probes target datasets: set pretrain.eval.targets" in capsys.readouterr().err


def test_probes_read_the_finetune_targets_with_the_evaluate_settings_and_rerun_the_pretrain_step_only_by_key(
    tmp_path,
):
    """pretrain.eval takes what it leaves unset from the job (targets from finetune, shots and seeds from
    evaluate); its targets' preprocessing comes first; probes, EMA and the export change the pretrain step's
    key (the step reruns, resuming the run) but not what defines the run (its checkpoints resume)."""
    probed = {**JOB["pretrain"], "eval": {"every": 5}}
    plan = load_plan(
        write_job(tmp_path, {**changed(pretrain=probed), "evaluate": {"shots": [1, 2], "seeds": 2}})
    )
    step = plan.step("pretrain")
    assert step.depends == ("preprocess:shapes", "preprocess:digits")
    assert step.settings["eval"]["targets"] == {"digits": str(tmp_path / "run" / "patches" / "digits")}
    assert (step.settings["eval"]["shots"], step.settings["eval"]["seeds"]) == ([1, 2], 2)
    plain = load_plan(write_job(tmp_path, JOB))
    keys = {json.dumps(plain.step("pretrain").settings, sort_keys=True)}
    for extra in (
        {"eval": {"every": 5}},
        {"ema": {"decay": 0.99}},
        {"ema": {}, "export": {"weights": "ema"}},
    ):
        other = load_plan(write_job(tmp_path, changed(pretrain={**JOB["pretrain"], **extra})))
        keys.add(json.dumps(other.step("pretrain").settings, sort_keys=True))
        assert run_identity(other.job.pretrain, None) == run_identity(plain.job.pretrain, None)
    assert len(keys) == 4
    resourced = {**JOB["pretrain"], "eval": {"every": 5, "cpus": 0.25, "batch_size": 8}}
    other = load_plan(write_job(tmp_path, changed(pretrain=resourced)))
    assert json.dumps(other.step("pretrain").settings, sort_keys=True) in keys  # how probes run: no key
