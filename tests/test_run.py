"""`vitpipe run` end to end on the local Ray: a run killed mid-pretraining resumes from its checkpoint,
a rerun skips every stage, and a changed setting or --force/--from redoes only what it must."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import transformers
import yaml
from mlflow.tracking import MlflowClient
from safetensors.numpy import load_file
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from pipeline.cli import main
from pipeline.metrics import probe_records, read_records
from pipeline.runner.execute import _failed, _Started
from pipeline.runner.plan import load_plan
from pipeline.runner.stages import RunContext
from pipeline.runner.status import run_status
from tests.conftest import REPO, VITPIPE
from vit.weights import load_pretrained

SMOKE = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())


def statuses(run: Path) -> dict[str, str]:
    return {step["step"]: step["status"] for step in json.loads((run / "run.json").read_text())["steps"]}


def record(run: Path, step: str) -> dict:
    return json.loads((run / "stages" / f"{step.replace(':', '.')}.json").read_text())


def finished_checkpoint_steps(pretrain: Path) -> list[int]:
    return sorted(
        int(c.name.split("_")[-1]) for c in pretrain.glob("checkpoint_*") if (c / "vitpipe.json").is_file()
    )


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_a_rerun_skips_every_stage(
    ray_local, mlflow_server, tmp_path
):
    """Also with images stored larger (20 px) than the models see (16 px: random crops in training,
    the centre in evaluation), and the data path alone (--data-only) on the finished run. Tracked in
    MLflow (a real server) and W&B (offline): the relaunch continues the same tracking runs; `vitpipe
    status` follows the first launch as it runs; the console shows no Ray internals."""
    job = {**SMOKE, "run_dir": str(tmp_path / "run")}
    job["tracking"] = {
        "mlflow": mlflow_server,
        "experiment": "killed-run",
        "wandb": {"project": "vitpipe-e2e", "mode": "offline"},
    }
    job["preprocess"] = {name: {**entry, "image_size": 20} for name, entry in SMOKE["preprocess"].items()}
    job["pretrain"] = {**SMOKE["pretrain"], "steps": 80, "checkpoint_every": 10, "image_size": 16, "crop": {}}
    job["finetune"] = {**SMOKE["finetune"], "image_size": 16, "crop": {"area": [0.5, 1.0]}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run = tmp_path / "run"
    command = [*VITPIPE, "run", str(path), "--address", ray.get_runtime_context().gcs_address]

    first = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 400
    seen = set()
    while time.monotonic() < deadline and not [
        s for s in finished_checkpoint_steps(run / "pretrain") if s >= 20
    ]:
        assert first.poll() is None, "the run ended before it was killed"
        if (run / "run.json").is_file():
            seen.add(run_status(str(run)).text())  # read while the run writes its folder
        time.sleep(0.5)
    live = [text for text in seen if "pretraining: step" in text]
    assert live, seen
    assert all(text.startswith("run 'smoke': running (pid ") for text in live)
    assert any("  pretrain             running  since " in text and "ETA" in text for text in live)
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-pretraining; Ray ends its workers
    first.wait()
    assert record(run, "pretrain")["status"] == "running"
    assert record(run, "preprocess:fractals")["status"] == "done"
    killed_at = max(finished_checkpoint_steps(run / "pretrain"))
    assert killed_at < 80

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert_a_quiet_console(second.stdout + second.stderr, run)
    assert_tracked(mlflow_server, run, killed_at)
    assert_model_cards(run / "pretrain" / "export")
    assert_tensorboard_events(run / "pretrain")
    assert "[run] pretrain: resuming" in second.stdout
    assert statuses(run) == {
        "datasets:fractals": "cached",
        "datasets:digits": "cached",
        "preprocess:fractals": "cached",
        "preprocess:digits": "cached",
        "pretrain": "resumed",
        "finetune": "ran",
        "analyze": "ran",
        "report": "ran",
    }
    resumed = [r for r in read_records(str(run / "pretrain")) if r.get("event") == "resumed"]
    assert resumed
    assert resumed[-1]["step"] >= killed_at  # it went on from the newest finished checkpoint, not step 0
    assert max(r["step"] for r in read_records(str(run / "pretrain")) if "loss" in r) == 80
    report = (run / "report.md").read_text()
    assert "| digits | pretrained |" in report
    assert "| digits | scratch |" in report
    assert_transfer_was_watched_while_pretraining(run, killed_at)
    for picture in ("loss.png", "probes.png", "transfer.png", "samples-fractals.png", "samples-digits.png"):
        assert f"(report/{picture})" in report
        assert (run / "report" / picture).stat().st_size > 1000
    assert "pretrain: step 80/80" in (run / "logs" / "pretrain.log").read_text()
    # every checkpoint records where the ranks stood in the run's order; the resume started there
    steps_per_epoch = 300 // SMOKE["pretrain"]["global_batch_size"]
    for step in finished_checkpoint_steps(run / "pretrain"):
        data = json.loads((run / "pretrain" / f"checkpoint_{step:08d}" / "vitpipe.json").read_text())["data"]
        epoch, position = divmod(step, steps_per_epoch)
        assert (data["epoch"], data["position"]) == (epoch, position)
        assert data["lineage"] == ([[0, 2]] if position else [])
    exported = json.loads((run / "pretrain" / "export" / "vitpipe" / "config.json").read_text())
    assert exported["vit"]["image_size"] == 16
    results = json.loads((run / "transfer" / "results.json").read_text())
    assert {r["mode"] for r in results["results"] if r.get("top1") is not None} == {"pretrained", "scratch"}
    assert_the_analyses_are_of_the_stored_weights(run, results)

    trained = read_records(str(run / "pretrain"))
    probe = subprocess.run(
        [
            *VITPIPE,
            "pretrain",
            str(path),
            "--data-only",
            "--steps",
            "12",
            "--address",
            ray.get_runtime_context().gcs_address,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    read = [r for r in read_records(str(run / "pretrain" / "data-only")) if "images_per_s" in r]
    assert [r["step"] for r in read] == list(range(1, 13))
    assert {r["epoch"] for r in read} == {0, 1}  # across an epoch boundary
    assert all(r["data_wait_s"] >= 0 and r["worker_images_per_s"] > 0 for r in read)
    assert read_records(str(run / "pretrain")) == trained  # the run's own records untouched

    keys = {step: record(run, step)["key"] for step in statuses(run)}
    third = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert set(statuses(run).values()) == {"cached"}
    assert "Ray 2.60.0" not in third.stdout  # nothing to do: Ray was not even joined
    assert "steps: 8 cached" in third.stdout
    assert "| digits | pretrained |" in third.stdout  # the table is printed again
    assert {step: record(run, step)["key"] for step in statuses(run)} == keys

    # `vitpipe analyze RUN`: the run's own step, cached; with --force done again, in place
    analysis = run / "analysis" / "pretrained" / "analysis.json"
    written = analysis.stat().st_mtime_ns
    assert main(["analyze", str(run)]) == 0
    assert statuses(run) == {**dict.fromkeys(keys, "cached")}  # its own step updated, the others kept
    assert main(["analyze", str(run), "--force"]) == 0
    assert statuses(run) == {**dict.fromkeys(keys, "cached"), "analyze": "ran"}
    assert analysis.stat().st_mtime_ns > written

    # a run folder moved elsewhere keeps its finished steps: analysing it finds them all done
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    run.rename(moved)
    assert main(["analyze", str(moved)]) == 0
    assert statuses(moved)["analyze"] == "cached"
    assert main(["analyze", str(moved), "--force"]) == 0  # its models read where they are now
    assert statuses(moved)["analyze"] == "ran"


def assert_a_quiet_console(console: str, run: Path) -> None:
    """vitpipe's lines only: none of Ray's, Ray Train's or DeepSpeed's, which are in the stage logs."""
    lines = console.splitlines()
    probes = [line for line in lines if line.startswith("pretrain: probe ")]  # one per probe result, wanted
    assert len(lines) - len(probes) <= 40, console
    ray_internals = re.compile(
        r"pid=\d+|TrainController|RayTrainWorker|\bINFO\b|DeepSpeed|core_worker|Warning"
    )
    internals = [line for line in lines if ray_internals.search(line)]
    assert internals == [], internals
    assert "pretrain: TensorBoard: tensorboard --logdir " in console
    log = (run / "logs" / "pretrain.log").read_text()
    assert "(RayTrainWorker pid=" in log  # what Ray's workers printed was kept, where a person can look


def assert_transfer_was_watched_while_pretraining(run: Path, killed_at: int) -> None:
    """The smoke job probes digits every 10 steps (raw and EMA weights) and exports the best-probed step:
    the probes of the killed launch are kept beside the relaunch's, the best is the best of them all (the
    relaunch kept what the killed launch found), the export holds those weights and its card says so, and
    each checkpoint holds every rank's EMA part."""
    records = read_records(str(run / "pretrain"))
    probes = probe_records(records)
    skipped = {r["step"] for r in records if r.get("event") == "probe_skipped"}  # the prober was busy
    for kind in ("raw", "ema"):
        mine = [r for r in probes if r["probe"] == kind]
        probed = {r["step"] for r in mine}
        assert probed <= set(range(10, 81, 10))
        assert 80 in probed  # the last step waits for a busy prober rather than skip its probe
        assert min(probed) < killed_at  # the killed launch's probes are in the history
        # From the relaunch on (it probes its first step again if the kill lost that probe), every probe
        # step was probed or said to be skipped; before it, a probe running at the kill went with it.
        assert set(range(killed_at, 81, 10)) <= probed | skipped  # killed_at: a checkpoint, every 10 steps
        best = max(mine, key=lambda r: (r["score"], -r["step"]))
        assert (mine[-1]["best_step"], mine[-1]["best_score"]) == (best["step"], best["score"])
        kept = json.loads((run / "pretrain" / "best" / kind / "best.json").read_text())
        assert (kept["step"], kept["score"]) == (best["step"], best["score"])
    exported = json.loads((run / "pretrain" / "export" / "export.json").read_text())
    best_raw = json.loads((run / "pretrain" / "best" / "raw" / "best.json").read_text())
    assert (exported["select"], exported["weights"], exported["step"]) == ("best", "raw", best_raw["step"])
    exported_weights = load_file(run / "pretrain" / "export" / "vitpipe" / "model.safetensors")
    best_weights = load_file(run / "pretrain" / "best" / "raw" / best_raw["folder"] / "model.safetensors")
    assert exported_weights.keys() == best_weights.keys()
    assert all(np.array_equal(exported_weights[name], best_weights[name]) for name in best_weights)
    card = (run / "pretrain" / "export" / "vitpipe" / "README.md").read_text()
    assert f"raw weights of step {best_raw['step']}, the step the probes scored best" in card
    assert (run / "pretrain" / "export" / "ema" / "vitpipe" / "model.safetensors").is_file()
    for checkpoint in (run / "pretrain").glob("checkpoint_0*"):
        assert sorted(p.name for p in (checkpoint / "ema").iterdir()) == [
            "rank-00000.safetensors",
            "rank-00001.safetensors",
        ]
    before = (run / "pretrain" / "export" / "export.json").read_text()
    assert main(["export", str(run / "pretrain")]) == 0  # the last raw weights, beside the job's choice
    assert (run / "pretrain" / "export" / "export.json").read_text() == before
    assert json.loads((run / "pretrain" / "export-last" / "export.json").read_text())["step"] == 80
    status = run_status(str(run)).text()
    assert "probe raw @ step 80:" in status
    assert "probe ema @ step 80:" in status


def assert_tracked(uri: str, run: Path, killed_at: int) -> None:
    """One MLflow run for the vitpipe run, a child per step and per fine-tune task; the pretraining child
    is the same run across the kill, holding every logged step of both launches."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("killed-run").experiment_id
    runs = client.search_runs([experiment], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.optimizer.lr"] == "0.003"
    assert parent.data.params["tracking.wandb.mode"] == "offline"
    children = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    steps = {
        "datasets:fractals",
        "datasets:digits",
        "preprocess:fractals",
        "preprocess:digits",
        "pretrain",
        "finetune",
        "analyze",
        "report",
    }
    assert set(children) == steps
    pretrain = children["pretrain"]
    assert pretrain.info.status == "FINISHED"
    logged = sorted({m.step for m in client.get_metric_history(pretrain.info.run_id, "loss")})
    assert logged[0] < killed_at < logged[-1] == 80  # both launches in one tracking run
    probed = {m.step for m in client.get_metric_history(pretrain.info.run_id, "probe_ema/score")}
    recorded = {r["step"] for r in probe_records(read_records(str(run / "pretrain"))) if r["probe"] == "ema"}
    # under its kind's name; the relaunch's every one (the killed launch's last, buffered, may be lost)
    assert {step for step in recorded if step > killed_at} <= probed <= recorded
    assert {a.path for a in client.list_artifacts(pretrain.info.run_id)} >= {
        "loss.png",
        "config.json",
        "README.md",
    }
    tasks = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == children["finetune"].info.run_id
    }
    assert set(tasks) == {"digits/pretrained", "digits/scratch"}
    assert all(task.info.status == "FINISHED" and "test_top1" in task.data.metrics for task in tasks.values())
    members = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == tasks["digits/pretrained"].info.run_id
    ]
    assert [r.info.run_name for r in members] == ["digits/pretrained/lr=0.03"]  # the job's one rate
    assert tasks["digits/pretrained"].data.metrics["lr"] == 0.03
    assert {a.path for a in client.list_artifacts(children["finetune"].info.run_id)} >= {
        "results.md",
        "results.png",
    }
    assert "report.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    analysis = {a.path for a in client.list_artifacts(children["analyze"].info.run_id)}
    assert analysis == {"analysis.json", "attention_distance_by_model.png"}
    offline = [
        re.match(r"offline-run-\d+_\d+-(\w+)", folder.name).group(1)
        for folder in (run / "tracking" / "wandb").glob("offline-run-*")
    ]
    # W&B: a run per child that logged something (pretrain, finetune, its two (target, mode) runs with
    # their chosen rate, the one rate's task under each, analyze, report), and the pretraining's one id
    # for both launches and its artifacts
    assert len(set(offline)) == 8
    assert max(offline.count(run_id) for run_id in offline) >= 3


def assert_the_analyses_are_of_the_stored_weights(run: Path, results: dict) -> None:
    """The report shows the four analyses of the pretrained model, and each model's numbers are of the
    weights the run stored: its position embeddings' similarity, its filters, its attention on B's images."""
    index = json.loads((run / "analysis" / "analysis.json").read_text())
    chosen = {f"{r['target']}-{r['mode']}": r["weights"] for r in results["results"]}
    export = str(run / "pretrain" / "export" / "vitpipe")
    assert {m["name"]: m["weights"] for m in index["models"]} == {"pretrained": export, **chosen}
    assert index["images"]["split"] == "test"
    assert index["failures"] == []
    report = (run / "report.md").read_text()
    for picture in ("rollout", "distance", "position_embedding", "filters"):
        assert f"(report/analysis-{picture}.png)" in report
        assert (run / "report" / f"analysis-{picture}.png").stat().st_size > 5000
    assert "| digits fine-tuned (scratch) |" in report
    for model in index["models"]:
        document = json.loads((run / "analysis" / model["folder"] / "analysis.json").read_text())
        assert document["images"]["count"] == 128  # the paper's 128, spread over the 360 test images
        weights = load_file(Path(model["weights"]) / "model.safetensors")
        grid = weights["pos_embed"][0, 1:]  # the class token's row left out
        unit = grid / np.linalg.norm(grid, axis=1, keepdims=True)
        np.testing.assert_allclose(document["position_embedding"]["similarity"], unit @ unit.T, atol=1e-4)
        distances = np.array(document["attention_distance"]["per_layer_and_head"])
        assert distances.shape == (2, 2)  # smoke's depth and heads
        assert (distances > 0).all()
        assert (distances < document["attention_distance"]["uniform"] * 1.6).all()
    fine_tuned = json.loads((run / "analysis" / "digits-pretrained" / "analysis.json").read_text())
    pretrained = json.loads((run / "analysis" / "pretrained" / "analysis.json").read_text())
    assert fine_tuned["attention_distance"] != pretrained["attention_distance"]  # each model its own


def assert_model_cards(export: Path) -> None:
    """Each export folder has a README.md model card in HF's layout, with the transfer results written in
    after fine-tuning, and both folders still load."""
    for folder, library in (("vitpipe", "vitpipe"), ("hf", "transformers")):
        text = (export / folder / "README.md").read_text()
        front = yaml.safe_load(text.split("---\n")[1])
        assert front["library_name"] == library
        assert front["datasets"] == ["fractals"]
        assert "vitpipe" in front["tags"]
        assert front["metrics"] == ["accuracy"]
        scores = front["model-index"][0]["results"]
        assert [(s["dataset"]["name"], s["metrics"][0]["type"]) for s in scores] == [("digits", "accuracy")]
        assert "- pretraining: 80 steps on 2 worker(s), DeepSpeed ZeRO stage 2" in text
        assert "300 images of fractals ('train' split, 10 classes)" in text
    transformers.ViTForImageClassification.from_pretrained(export / "hf")
    load_pretrained(export / "vitpipe")


def assert_tensorboard_events(pretrain: Path) -> None:
    """TensorBoard's own reader finds every logged step's loss in the run's event files."""
    board = EventMultiplexer().AddRunsFromDirectory(str(pretrain / "tensorboard")).Reload()
    logged = {r["step"]: r["loss"] for r in read_records(str(pretrain)) if "loss" in r}
    events = {}
    for name in board.Runs():
        if "train/loss" in board.Runs()[name].get("scalars", []):
            events |= {event.step: event.value for event in board.Scalars(name, "train/loss")}
    assert set(events) == set(logged)
    assert all(abs(events[step] - logged[step]) < 1e-5 for step in logged)


DATA_ONLY = {
    "name": "data-only",
    "datasets": {"digits": {"kind": "digits", "shard_size": 900}},
    "preprocess": {"digits": {"image_size": 16, "patch_size": 4}},
}


def test_a_changed_setting_or_a_forced_stage_redoes_only_what_depends_on_it(ray_local, tmp_path, capsys):
    path = tmp_path / "job.yaml"
    run = tmp_path / "run"

    def run_with(job: dict, *options: str) -> dict[str, str]:
        path.write_text(yaml.safe_dump({**job, "run_dir": str(run)}))
        assert main(["run", str(path), *options]) == 0, capsys.readouterr().err
        return statuses(run)

    assert run_with(DATA_ONLY) == {"datasets:digits": "ran", "preprocess:digits": "ran", "report": "ran"}
    manifest = record(run, "preprocess:digits")["fingerprint"]
    assert run_with(DATA_ONLY) == {
        "datasets:digits": "cached",
        "preprocess:digits": "cached",
        "report": "cached",
    }

    bigger = {**DATA_ONLY, "preprocess": {"digits": {"image_size": 24, "patch_size": 4}}}
    assert run_with(bigger) == {"datasets:digits": "cached", "preprocess:digits": "ran", "report": "ran"}
    assert (
        json.loads((run / "patches" / "digits" / "_manifest.json").read_text())["patches"]["image_size"] == 24
    )

    # rebuilding the dataset writes the same bytes: what reads it stays cached
    assert run_with(bigger, "--force", "datasets") == {
        "datasets:digits": "ran",
        "preprocess:digits": "cached",
        "report": "cached",
    }
    assert run_with(bigger, "--from", "preprocess") == {
        "datasets:digits": "cached",
        "preprocess:digits": "ran",
        "report": "ran",
    }
    assert record(run, "preprocess:digits")["fingerprint"] != manifest  # 24 px now, not 16

    # outputs deleted by hand are noticed and made again
    (run / "patches" / "digits" / "_manifest.json").unlink()
    assert (
        run_with(bigger)["preprocess:digits"] == "resumed"
    )  # its finished shards kept, the manifest rewritten
    assert (run / "patches" / "digits" / "_manifest.json").is_file()
    assert run_with(bigger, "--until", "datasets") == {"datasets:digits": "cached"}

    # --force of a stage the job lacks, or one the command does not reach, is refused, not "cached"
    for options, refusal in (
        (("--force", "pretrain"), f"--force pretrain: {path} has no pretrain step"),
        (
            ("--force", "report", "--until", "preprocess"),
            "the report step is not among those --until preprocess",
        ),
    ):
        assert main(["run", str(path), *options]) == 2
        assert refusal in capsys.readouterr().err
    assert statuses(run) == {"datasets:digits": "cached"}

    # a side command (other weights on a target) that fails is recorded apart: the run's state stays
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "config.json").write_text("{}")
    target = f"digits={run / 'patches' / 'digits'}"
    assert main(["finetune", str(path), "--target", target, "--weights", str(bogus)]) == 1
    said = capsys.readouterr()
    assert "neither a vitpipe model" in said.err
    assert "(a side command of run 'data-only') FAILED in" in said.out
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert statuses(run) == {"datasets:digits": "cached"}
    (side,) = [name for name in os.listdir(run / "stages") if name.startswith("finetune.out-")]
    assert json.loads((run / "stages" / side).read_text())["status"] == "failed"


def test_a_failed_steps_error_is_one_line_without_colour_codes_in_its_record_and_on_the_console(
    tmp_path, capsys
):
    """An error that carries a Ray task's coloured traceback: the record (which report.md's tables read)
    and the console get one line without escape codes; the stage's log keeps the traceback."""
    plan = load_plan(REPO / "jobs" / "smoke.yaml", str(tmp_path / "run"))
    step = plan.steps[0]
    for folder in (plan.layout.stages, plan.layout.logs):
        Path(folder).mkdir(parents=True)
    raised = RuntimeError(
        '\x1b[36mray::point()\x1b[39m (pid=7, ip=10.0.0.1)\n  File "launch.py", line 9, in run_point\n'
        "    raise\nValueError: /runs/x: has trained 32 steps"
    )
    report = _failed(RunContext(plan, None), _Started(step, "k", {}, {}, False, False), raised)
    expected = "RuntimeError: ray::point() (pid=7, ip=10.0.0.1) ValueError: /runs/x: has trained 32 steps"
    assert report.note == expected
    assert record(tmp_path / "run", step.id)["error"] == expected
    said = capsys.readouterr().err
    assert re.search(rf"\[run\] {step.id}: FAILED after \S+: {re.escape(expected)} \(traceback in ", said)
    log = (Path(plan.layout.logs) / f"{step.stage}.log").read_text()
    assert 'File "launch.py", line 9' in log
    assert "\x1b" not in log


def test_a_failed_step_stops_the_run_and_is_retried_by_the_next(ray_local, tmp_path, capsys):
    empty = tmp_path / "images"
    empty.mkdir()
    job = {
        "name": "broken",
        "run_dir": str(tmp_path / "run"),
        "datasets": {"images": {"kind": "imagefolder", "src": str(empty)}},
        "preprocess": {"images": {"image_size": 16, "patch_size": 4}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "[run] datasets:images: FAILED after" in err
    assert "traceback in" in err
    run = tmp_path / "run"
    assert statuses(run) == {"datasets:images": "failed", "preprocess:images": "not run", "report": "not run"}
    assert record(run, "datasets:images")["status"] == "failed"
    assert "Traceback (most recent call last)" in (run / "logs" / "datasets.log").read_text()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / ".lock").exists()
    assert main(["run", str(path)]) == 1  # the failed step is tried again, not taken from the cache
    assert "[run] datasets:images: resuming" in capsys.readouterr().out


STAGED = {
    **DATA_ONLY,
    "name": "staged",
    "preprocess": {"digits": {"image_size": 16}},  # the patch size is the model's
    "pretrain": {
        "data": "digits",
        "model": {"patch_size": 4, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
        "num_workers": 1,
        "cpus_per_worker": 0.5,
        "global_batch_size": 32,
        "micro_batch_size": 32,
        "steps": 6,
        "checkpoint_every": 3,
        "log_every": 3,
    },
}


@pytest.mark.slow
def test_a_single_stage_command_is_the_run_s_own_step(ray_local, tmp_path, capsys):
    """`vitpipe pretrain JOB` records the job's pretrain step: a following `vitpipe run JOB` takes it from
    the cache instead of pretraining again; and while a `vitpipe run` holds the run folder, a single-stage
    command is refused."""
    path, run = tmp_path / "job.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump({**STAGED, "run_dir": str(run)}))
    assert main(["run", str(path), "--until", "preprocess"]) == 0, capsys.readouterr().err
    assert main(["pretrain", str(path)]) == 0, capsys.readouterr().err
    assert record(run, "pretrain")["status"] == "done"
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    assert statuses(run)["pretrain"] == "cached"
    assert len([r for r in read_records(str(run / "pretrain")) if r.get("event") == "started"]) == 1

    # The holder runs on a Ray of its own and is stopped with Ctrl-C (its Ray ends with it): a Ray Train
    # run's controller outlives a killed driver on a shared Ray and would hold this session's CPUs.
    command = [*VITPIPE, "run", str(path), "--force", "pretrain"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as holder:
        try:
            deadline = time.monotonic() + 60
            while not (run / ".lock").exists() and time.monotonic() < deadline and holder.poll() is None:
                time.sleep(0.1)
            assert (run / ".lock").exists(), "the run never took its lock"
            capsys.readouterr()
            assert main(["pretrain", str(path)]) == 1
            assert f"{run} is in use by another vitpipe command (pid {holder.pid}" in capsys.readouterr().err
        finally:
            holder.send_signal(signal.SIGINT)
            try:
                holder.wait(timeout=120)
            except subprocess.TimeoutExpired:
                holder.kill()
