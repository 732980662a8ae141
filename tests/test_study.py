"""The study of transfer against pretraining data: nested subsets, the plan of its points, and
`jobs/scaling_smoke.yaml` end to end through the real CLI on the session's Ray (a point's failure kept
apart from the others, a rerun redoing only what is missing, then fully cached)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import BitForImageClassification

from benchmarks.study_results import relative_to_run
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.metrics import read_records
from pipeline.preprocess.manifest import patch_files
from pipeline.pretrain.checkpoints import step_of
from pipeline.pretrain.control import start_control, stop_on_signals
from pipeline.pretrain.plan import plan_pretrain
from pipeline.runner.execute import point_steps
from pipeline.runner.plan import RunOptions, load_plan
from pipeline.runner.records import write_record
from pipeline.runner.stages import collect_study_point, finished_points
from pipeline.study.answer import answer, sentences
from pipeline.study.launch import PointSettings, _pretrain, _probed_targets, run_point, submit_point
from pipeline.study.plan import SCRATCH, Point, point_finetune, point_model, point_pretrain, study_job
from pipeline.study.report import write_study_results
from pipeline.study.slots import PretrainSlots
from pipeline.study.subsets import draw_subsets, read_subset
from pipeline.transfer.data import VALIDATION_BYTES, SplitReader, holdout
from tests.conftest import REPO, VITPIPE
from vit.flops import train_flops
from vit.patches import patchify
from vit.weights import load_pretrained, read_checkpoint, state_digest

SMOKE = REPO / "jobs" / "scaling_smoke.yaml"
VIT = yaml.safe_load(SMOKE.read_text())["study"]["models"]["vit"]


def drawn_rows(subset) -> set[tuple[str, int]]:
    return {(file, row) for file, rows in subset.rows.items() for row in rows}


def test_subsets_are_nested_and_count_the_classes_drawn(fractal_patches, tmp_path):
    files = patch_files(fractal_patches, "train")
    labels = {file: pq.read_table(file, columns=["label"]).column("label").to_numpy() for file in files}
    total = sum(len(values) for values in labels.values())
    written = draw_subsets(fractal_patches, "train", (50, 200, total), 7, str(tmp_path / "a"))
    small, middle, whole = (read_subset(written[size]) for size in (50, 200, total))
    assert (small.samples, middle.samples, whole.samples) == (50, 200, total)
    assert drawn_rows(small) < drawn_rows(middle) < drawn_rows(whole)
    assert whole.rows == {file: tuple(range(len(values))) for file, values in labels.items()}
    for subset in (small, middle):
        counted = np.bincount(np.concatenate([labels[f][list(rows)] for f, rows in subset.rows.items()]))
        assert sorted(subset.per_class.values()) == sorted(count for count in counted.tolist() if count)
        assert sum(subset.per_class.values()) == subset.samples
    # Drawn from the seed: the same seed draws the same rows, another seed others.
    again = read_subset(draw_subsets(fractal_patches, "train", (50,), 7, str(tmp_path / "b"))[50])
    other = read_subset(draw_subsets(fractal_patches, "train", (50,), 8, str(tmp_path / "c"))[50])
    assert again.rows == small.rows
    assert other.rows != small.rows
    with pytest.raises(ValueError, match=rf"study.sizes \[{total + 1}\]: the corpus .* has {total:,} images"):
        draw_subsets(fractal_patches, "train", (total + 1,), 0, str(tmp_path / "d"))


def test_a_study_is_planned_as_concurrent_points_reading_nested_subsets(tmp_path):
    plan = load_plan(SMOKE, str(tmp_path / "run"))
    ids = [step.id for step in plan.steps]
    assert ids[:5] == [
        "datasets:fractals",
        "datasets:digits",
        "preprocess:fractals",
        "preprocess:digits",
        "study:subsets",
    ]
    assert ids[-1] == "report"
    points = [step for step in plan.steps if step.concurrent]
    expected = [Point(size, model, 0) for size in (400, 100) for model in ("vit", "bit")]
    expected += [Point(SCRATCH, model, 0) for model in ("vit", "bit")]
    assert [step.item for step in points] == [point.name for point in expected]
    pretrained = points[0]
    assert pretrained.depends == ("study:subsets", "preprocess:digits")
    assert pretrained.settings["pretrain"]["model"]["family"] == "vit"
    assert pretrained.settings["pretrain"]["steps"] == 16
    assert pretrained.settings["finetune"]["modes"] == ["pretrained"]
    assert points[-1].settings["pretrain"] is None
    assert points[-1].settings["finetune"]["modes"] == ["scratch"]
    assert "pretrain" not in ids
    assert "finetune" not in ids
    # Each point probes the finetune targets while it pretrains (shots from evaluate), and what it probes
    # and exports is in its key: another probe or export is another point.
    probes = pretrained.settings["pretrain"]["eval"]
    assert (probes["targets"], probes["shots"], probes["every"]) == (["digits"], [1, 5], 8)
    assert "cpus" not in probes  # how the probes run is not what they measure
    assert pretrained.settings["pretrain"]["export"]["select"] == "best"


def study_with(change: dict, tmp_path: Path) -> Path:
    """The smoke job with some of its sections' settings changed, written to a file."""
    job = yaml.safe_load(SMOKE.read_text())
    for section, values in change.items():
        job[section] = {**job[section], **values}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_a_budget_in_epochs_with_a_floor_gives_small_subsets_the_floor_and_large_ones_their_epochs(tmp_path):
    path = study_with({"study": {"epochs": 2, "min_steps": 10, "steps": None}}, tmp_path)
    plan = load_plan(path, str(tmp_path / "run"))
    budgets = {
        step.item: {key: step.settings["pretrain"][key] for key in ("steps", "epochs")}
        for step in plan.steps
        if step.concurrent and step.settings["pretrain"] is not None
    }
    # 100 images are 3 steps of 32 an epoch: 2 epochs (6 steps) fall under the floor; 400 are 12 a pass.
    assert budgets["n0000000100-vit-seed0"] == {"steps": 10, "epochs": None}
    assert budgets["n0000000400-bit-seed0"]["epochs"] == 2
    with pytest.raises(ConfigError, match=r"min_steps is a floor under study\.epochs"):
        load_plan(study_with({"study": {"min_steps": 10}}, tmp_path), str(tmp_path / "run"))


def test_one_point_runs_alone_with_the_steps_it_reads_and_no_report(tmp_path):
    plan = load_plan(SMOKE, str(tmp_path / "run"))
    steps = point_steps(plan, ("n0000000100-bit-seed0",))
    assert [step.id for step in steps] == [
        "datasets:fractals",
        "datasets:digits",
        "preprocess:fractals",
        "preprocess:digits",
        "study:subsets",
        "study:n0000000100-bit-seed0",
    ]
    scratch = point_steps(plan, ("scratch-vit-seed0", "scratch-bit-seed0"))
    assert [step.id for step in scratch][-2:] == ["study:scratch-vit-seed0", "study:scratch-bit-seed0"]
    assert "study:subsets" not in [step.id for step in scratch]  # a scratch point reads no subset
    with pytest.raises(
        ConfigError, match=r"no study point n0000000100-vit-seed7; its points are n0000000400"
    ):
        point_steps(plan, ("n0000000100-vit-seed7",))
    with pytest.raises(ConfigError, match="--point runs those study points alone: drop --from and --until"):
        RunOptions(until="study", points=("scratch-vit-seed0",)).check()


def test_the_curves_are_each_sizes_mean_and_spread_over_seeds_of_the_points_own_results(tmp_path):
    rng = np.random.default_rng(0)
    points = []
    for size in (0, 100, 1000):
        for seed in (0, 1, 2):
            top1, five = rng.uniform(0.3, 0.9, 2)
            result = {"target": "digits", "top1": top1, "lr": 0.01, "fewshot": {"5": {"mean": five}}}
            points.append(
                {
                    "point": f"{size}-{seed}",
                    "size": size,
                    "model": "vit",
                    "seed": seed,
                    "status": "done",
                    "results": [result],
                }
            )
    points.append(
        {
            "point": "failed",
            "size": 100,
            "model": "vit",
            "seed": 3,
            "status": "failed",
            "results": [{"target": "digits", "top1": 0.0}],
        }
    )
    document = write_study_results(points, tmp_path, {})
    drawn = json.loads((tmp_path / "transfer_vs_data.json").read_text())
    readers = {"finetune top-1": lambda r: r["top1"], "5-shot linear": lambda r: r["fewshot"]["5"]["mean"]}
    for metric, read in readers.items():
        curve = document["curves"]["digits"][metric]["vit"]
        for entry in curve:
            values = [
                read(p["results"][0]) for p in points if p["size"] == entry["size"] and p["status"] == "done"
            ]
            assert (entry["mean"], entry["std"], entry["seeds"]) == (
                pytest.approx(np.mean(values)),
                pytest.approx(np.std(values, ddof=1)),  # the sample standard deviation
                3,
            )
        panel = drawn[f"digits: {metric}"]
        assert panel["vit"]["y"] == pytest.approx([100 * e["mean"] for e in curve[1:]])
        assert panel["vit"]["yerr"] == pytest.approx([100 * e["std"] for e in curve[1:]])
        assert panel["vit from scratch"]["y"] == pytest.approx([100 * curve[0]["mean"]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pretrain": {"model": {"variant": "Ti/4"}}}, "pretrain.model is not used by a study"),
        (
            {
                "study": {
                    "models": {
                        "a": {"patch_size": 4, "width": 32, "depth": 1, "heads": 1, "mlp_dim": 8},
                        "b": {"patch_size": 8, "width": 32, "depth": 1, "heads": 1, "mlp_dim": 8},
                    }
                }
            },
            r"read patches of sizes \[4, 8\]",
        ),
        (
            {
                "study": {
                    "models": {
                        "vit": VIT,
                        "bit": {"family": "bit", "base_width": 8, "groups": 8, "channels": 1},
                    }
                }
            },
            r"study.models.bit.channels is 1 but preprocess entries \['fractals', 'digits'\] have 3",
        ),
        ({"study": {"sizes": [100, 100]}}, "a value is listed twice"),
        ({"study": {"epochs": 2, "steps": 3}}, "set either epochs or steps"),
        ({"study": {"corpus": "nowhere"}}, "study.corpus 'nowhere' is not a preprocess entry"),
        ({"finetune": None}, "a study needs a pretrain section"),
        (
            {"pretrain": {"eval": {"every": 4, "targets": ["fractals"]}}},
            r"pretrain.eval.targets \['fractals'\]: a study's points probe only the finetune targets",
        ),
    ],
)
def test_a_study_that_cannot_run_is_refused_before_anything_starts(tmp_path, change, message):
    job = yaml.safe_load(SMOKE.read_text())
    for section, values in change.items():
        if values is None:
            job.pop(section)
        elif isinstance(values, dict):
            job[section] = {**job[section], **values}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match=message):
        load_plan(path, str(tmp_path / "run"))


def test_study_sizes_beyond_the_corpus_are_refused_before_anything_runs_naming_its_size(
    tmp_path, digits_dir, digits_patches, capsys
):
    job = yaml.safe_load(SMOKE.read_text())  # fractals: 10 classes x 40 per class, one train split
    path = tmp_path / "job.yaml"

    def validate_sizes(sizes: list, data: str = "fractals", shards: str | None = None) -> tuple[int, str]:
        changed = {**job, "study": {**job["study"], "sizes": sizes}, "run_dir": str(tmp_path / "run")}
        changed["pretrain"] = {**job["pretrain"], "data": data}
        if data != "fractals":  # the study reads the digits: generated, or shards from outside
            changed["datasets"] = {} if shards else {"digits": job["datasets"]["digits"]}
            changed["preprocess"] = {"digits": {**job["preprocess"]["digits"], "input": shards}}
        path.write_text(yaml.safe_dump(changed))
        code = main(["validate", str(path)])
        return code, capsys.readouterr().err

    code, err = validate_sizes([100, 100_000_000, 500])
    assert code == 2
    assert err.splitlines() == [
        f"vitpipe: {path}: study.sizes [500, 100000000]: the corpus 'fractals' has 400 images in split "
        "'train' (as datasets.fractals makes it); lower the sizes or use a larger corpus"
    ]
    assert not (tmp_path / "run").exists()
    assert validate_sizes([100, 400])[0] == 0
    code, err = validate_sizes([1437, 1438], data="digits")  # digits' train split: 80% of 1797, stratified
    assert code == 2
    assert "study.sizes [1438]: the corpus 'digits' has 1,437 images in split 'train'" in err
    shutil.copytree(digits_patches, tmp_path / "run" / "patches" / "digits")  # preprocessed by an earlier run
    code, err = validate_sizes([5000], data="digits", shards=str(digits_dir))  # from outside: the manifest
    assert code == 2
    assert (
        f"has 1,437 images in split 'train' (preprocessed in {tmp_path / 'run' / 'patches' / 'digits'})"
        in err
    )
    for bad, why in (([-5], "greater than 0 (got -5)"), ([True], "a valid integer (got True)")):
        code, err = validate_sizes(bad)
        assert code == 2
        assert err.splitlines()[1:] == [f"  study.sizes[0]: Input should be {why}"]  # one error, not two


def test_a_forced_point_is_cleared_before_its_task_starts_and_nothing_else(ray_local, tmp_path):
    """`--force study` clears a point on the driver as it is submitted: its pretraining run's outputs and
    its fine-tuning results go before its task starts (a stop before the task got that far leaves nothing
    old for the next run, which resumes), files of others stay; without `clear` all is kept to resume."""
    plan = load_plan(SMOKE, str(tmp_path / "run"))
    study, point = study_job(plan.job, plan.source), Point(100, "bit", 0)
    storage, out = tmp_path / "point", tmp_path / "out"
    for clear in (False, True):
        (storage / "pretrain" / "checkpoint_00000016").mkdir(parents=True, exist_ok=True)
        (storage / "pretrain" / "notes.txt").write_text("mine")
        (out / "transfer" / "digits" / "pretrained").mkdir(parents=True, exist_ok=True)
        settings = PointSettings(
            point=point,
            model=point_model(study, point),
            pretrain=point_pretrain(study, point),
            corpus=str(tmp_path / "corpus"),
            subset=str(tmp_path / "missing.json"),
            storage=str(storage),
            finetune=point_finetune(study, point),
            evaluate=None,
            targets={},
            out=str(out),
            clear=clear,
        )
        ref = submit_point(settings, str(tmp_path / "run"))
        assert (storage / "pretrain" / "checkpoint_00000016").is_dir() != clear  # before the task ran
        assert (out / "transfer" / "digits" / "pretrained").is_dir() != clear
        assert (storage / "pretrain" / "notes.txt").read_text() == "mine"
        with pytest.raises(ValueError, match=r"missing\.json: not a readable subset manifest"):
            ray.get(ref)
    # a (target, mode) folder holding a file vitpipe did not write refuses the redo; nothing goes
    (storage / "pretrain" / "checkpoint_00000016").mkdir(parents=True)
    (out / "transfer" / "digits" / "scratch").mkdir(parents=True)
    (out / "transfer" / "digits" / "scratch" / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"scratch: holds files a vitpipe fine-tuning task did not"):
        submit_point(settings, str(tmp_path / "run"))
    assert (out / "transfer" / "digits" / "scratch" / "mine.txt").read_text() == "mine"
    assert (storage / "pretrain" / "checkpoint_00000016").is_dir()


def point_settings_for(tmp_path: Path, point: Point, corpus: str, subset: str, **changes) -> PointSettings:
    """The settings a point's task receives, for a smoke study run in `tmp_path/run`."""
    study = study_job(load_plan(SMOKE, str(tmp_path / "run")).job, str(SMOKE))
    settings = {
        "point": point,
        "model": point_model(study, point),
        "pretrain": point_pretrain(study, point) if point.pretrained else None,
        "corpus": corpus,
        "subset": subset if point.pretrained else None,
        "storage": str(tmp_path / "point"),
        "finetune": point_finetune(study, point),
        "evaluate": None,
        "targets": {},
        "out": str(tmp_path / "out" / point.name),
        "clear": False,
    }
    return PointSettings(**(settings | changes))


def test_the_first_stop_signal_asks_every_started_points_control_to_stop_and_a_second_stops_at_once(
    ray_local, capsys
):
    """What the driver of a study holds while its points run (their Ray tasks receive no signal): the first
    SIGTERM (or SIGINT) asks the RunControl of every point started so far, one started after the context
    was entered included, to stop, and says so in one line; the second interrupts at once."""
    controls = {"first": start_control()}
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(controls.values(), "study", "each point checkpoints its step") as received:
        controls["second"] = start_control()
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
        assert ray.get([control.stop_requested.remote() for control in controls.values()]) == [True, True]
        with pytest.raises(KeyboardInterrupt, match="stopped at once by a second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs as the call returns
    assert signal.getsignal(signal.SIGTERM) == before
    said = capsys.readouterr().err
    assert "study: SIGTERM: each point checkpoints its step (SIGTERM again to stop at once" in said


def test_a_point_asked_to_stop_starts_no_more_work_and_says_where_it_stopped(ray_local, tmp_path):
    """A point asked to stop as it waited for its pretraining slot returns before it reads anything (its
    subset here does not exist), releasing the slot; a scratch point before it fine-tunes."""
    control, slots = start_control(), PretrainSlots.remote(1)
    ray.get(control.request_stop.remote())
    missing = str(tmp_path / "missing.json")
    pretrained = point_settings_for(tmp_path, Point(100, "vit", 0), "corpus", missing, control=control)
    assert run_point(pretrained, slots) == {
        "point": "n0000000100-vit-seed0",
        "stopped": "stopped on request before pretraining",
    }
    ray.get(slots.acquire.remote(), timeout=10)  # released
    scratch = point_settings_for(tmp_path, Point(SCRATCH, "bit", 0), "corpus", missing, control=control)
    assert run_point(scratch)["stopped"] == "stopped on request before fine-tuning"
    assert not (tmp_path / "out").exists()


def test_a_failed_point_is_what_its_task_raised_in_one_line_not_rays_coloured_traceback(ray_local):
    refusal = "/runs/s/study/p/pretrain: has trained 32 steps, beyond the budget of 16; raise ..."

    @ray.remote
    def point() -> None:
        raise ValueError(refusal)

    with pytest.raises(ValueError, match="beyond the budget") as caught:
        collect_study_point(point.remote())
    assert str(caught.value) == refusal  # Ray's own: "\x1b[36mray::point()\x1b[39m (pid=...)\n  File ..."
    assert "ray::point()" in str(caught.value.__cause__)  # the traceback, for the stage's log


def test_a_point_trained_beyond_the_studys_budget_is_refused_with_advice_for_that_point(
    fractal_patches, digits_patches, tmp_path
):
    """A point's run resumed on a smaller study budget than it reached (the study's steps raised, then set
    back): the advice is the study's (its budget, or the point redone), not `vitpipe export` of a run."""
    point = Point(100, "vit", 0)
    subset = draw_subsets(fractal_patches, "train", (100,), 0, str(tmp_path / "subsets"))[100]
    without = point_settings_for(tmp_path, point, fractal_patches, subset)
    with pytest.raises(
        ValueError, match=r"pretrain.eval.targets \['digits'\] are not among its targets \[\]"
    ):
        _pretrain(without)  # its probes score a target the point was not given
    settings = point_settings_for(
        tmp_path, point, fractal_patches, subset, targets={"digits": digits_patches}
    )
    plan = plan_pretrain(settings.pretrain, fractal_patches, read_subset(subset).rows)
    checkpoint = tmp_path / "point" / "pretrain" / "checkpoint_00000024"
    checkpoint.mkdir(parents=True)
    meta = {"step": 24, "tag": "step00000024", "vit": plan.architecture.to_dict(), "defines": plan.identity}
    (checkpoint / "vitpipe.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="beyond the budget") as refused:
        _pretrain(settings)
    message = str(refused.value)
    assert "has trained 24 steps, beyond the budget of 16; raise the study's steps (or epochs)" in message
    assert message.endswith("or redo the point with --force study --point n0000000100-vit-seed0")
    assert "vitpipe export" not in message


def test_a_point_whose_best_step_other_probes_scored_is_refused_with_its_redo(
    fractal_patches, digits_patches, tmp_path
):
    """A point relaunched with other probes (here: a best.json under another key) would take the best
    among its remaining steps as the best of its training: refused, naming the way to redo that point."""
    point = Point(100, "vit", 0)
    subset = draw_subsets(fractal_patches, "train", (100,), 0, str(tmp_path / "subsets"))[100]
    settings = point_settings_for(
        tmp_path, point, fractal_patches, subset, targets={"digits": digits_patches}
    )
    best = tmp_path / "point" / "pretrain" / "best" / "raw"
    best.mkdir(parents=True)
    (best / "best.json").write_text(
        json.dumps({"step": 8, "score": 0.5, "folder": "step-00000008", "probe_key": "other"})
    )
    with pytest.raises(ValueError, match="its best raw step \\(8\\) was scored by other probes") as refused:
        _pretrain(settings)
    assert str(refused.value).endswith("redo the point with --force study --point n0000000100-vit-seed0")


def test_a_point_probes_a_target_the_job_names_by_its_folder_under_that_folders_name(tmp_path):
    point = Point(100, "vit", 0)
    settings = point_settings_for(tmp_path, point, "corpus", "subset", targets={"digits16": "/data/digits16"})
    probes = settings.pretrain.eval.model_copy(update={"targets": ["/data/digits16/"]})
    settings = dataclasses.replace(settings, pretrain=settings.pretrain.model_copy(update={"eval": probes}))
    assert _probed_targets(settings) == {"digits16": "/data/digits16"}


def test_the_analyses_read_only_points_whose_record_says_done(tmp_path):
    """A point that fails after an earlier run finished it keeps that run's point.json: its record, not
    the file, says whether this run's analyses take its models."""
    plan = load_plan(SMOKE, str(tmp_path / "run"))
    points = [step for step in plan.steps if step.stage == "study" and step.concurrent]
    for step, status in zip(points[:3], ("done", "failed", "running"), strict=True):
        Path(step.output).mkdir(parents=True)
        (Path(step.output) / "point.json").write_text("{}")
        write_record(plan.layout.stages, step.id, {"key": "k", "status": status, "fingerprint": "f"})
    assert finished_points(plan) == [(points[0].item, points[0].output)]


def assert_hf_bit_export_agrees(vitpipe_folder: Path, hf_folder: Path) -> None:
    ours = load_pretrained(vitpipe_folder).eval()
    theirs, info = BitForImageClassification.from_pretrained(hf_folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    config = ours.config
    images = torch.randint(
        0, 256, (4, config.image_size, config.image_size, config.channels), dtype=torch.uint8
    )
    pixels = (images.float() / 255 - torch.tensor(config.mean)) / torch.tensor(config.std)
    with torch.no_grad():
        logits = ours(patchify(images, config.patch_size))
        torch.testing.assert_close(
            logits, theirs.eval()(pixel_values=pixels.permute(0, 3, 1, 2)).logits, atol=1e-4, rtol=0
        )


def run_smoke(run: Path, job: Path = SMOKE, *options: str) -> subprocess.CompletedProcess[str]:
    address = ray.get_runtime_context().gcs_address
    command = [*VITPIPE, "run", str(job), "--run-dir", str(run), "--address", address, *options]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def statuses(run: Path) -> dict[str, str]:
    return {step["step"]: step["status"] for step in json.loads((run / "run.json").read_text())["steps"]}


def task_results(run: Path) -> dict[str, dict]:
    """Each finished point's (target, mode) result as its transfer wrote it, not as the report read it."""
    found = {}
    for path in sorted((run / "study").glob("*/transfer/digits/*/result.json")):
        found[path.parts[-5]] = json.loads(path.read_text())
    return found


def assert_curves_are_the_points_own(run: Path, results: dict) -> None:
    """results.json's curves and the figure's drawn values are the mean and spread over seeds of what each
    point's own transfer task measured (one seed here: the value, spread 0)."""
    own = task_results(run)
    drawn = json.loads((run / "study" / "transfer_vs_data.json").read_text())
    readers = {"finetune top-1": lambda r: r["top1"], "5-shot linear": lambda r: r["fewshot"]["5"]["mean"]}
    for model in ("vit", "bit"):
        for metric, read in readers.items():
            by_size = {}
            for name, result in own.items():
                size, family = (0 if name.startswith("scratch") else int(name[1:11])), name.split("-")[1]
                if family == model:
                    by_size.setdefault(size, []).append(read(result))
            curve = results["curves"]["digits"][metric][model]
            assert [e["size"] for e in curve] == sorted(by_size)
            for entry in curve:
                values = by_size[entry["size"]]
                assert entry["mean"] == pytest.approx(float(np.mean(values)))
                assert entry["std"] == pytest.approx(
                    float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                )
            panel = drawn[f"digits: {metric}"]
            pretrained = [e for e in curve if e["size"]]
            assert panel[model]["x"] == [e["size"] for e in pretrained]
            assert panel[model]["y"] == pytest.approx([100 * e["mean"] for e in pretrained])
            assert panel[model]["yerr"] == pytest.approx([100 * e["std"] for e in pretrained], abs=1e-9)
            assert panel[f"{model} from scratch"]["y"] == pytest.approx([100 * curve[0]["mean"]])


def assert_fine_tuning_started_from_the_engines_weights_at_its_best_step(point: dict) -> None:
    """The paper's protocol: the pretrained point fine-tuned from its step of best validation few-shot
    accuracy, with the weights its pretraining engine held in memory at that step (the digest rank 0 took
    of the engine's module, recorded on that step's raw probe), which are also DeepSpeed's own
    zero_to_fp32 of that step's checkpoint, tensor by tensor (the export read by vitpipe's loader, adapted
    to the target with a new head)."""
    # DeepSpeed picks its accelerator when first imported: not at collection, before one_rank_group's
    # DS_ACCELERATOR=cpu
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    records = read_records(point["run"])
    probed = {r["step"]: r for r in records if r.get("probe") == "raw" and "score" in r}
    assert sorted(probed) == [8, 16]  # every 8 steps, and the last
    best = max(probed.values(), key=lambda r: (r["score"], -r["step"]))  # the first of the highest
    assert point["start_step"] == point["best"]["step"] == best["step"]
    assert point["start_selection"] == {"select": "best", "weights": "raw"}
    started = point["results"][0]
    assert started["start_backbone"] == best["backbone"]  # the engine's in-memory weights at that step
    other = 8 if best["step"] == 16 else 16
    assert started["start_backbone"] != probed[other]["backbone"]  # not the other step's

    checkpoint = Path(point["run"]) / f"checkpoint_{best['step']:08d}"
    tag = json.loads((checkpoint / "vitpipe.json").read_text())["tag"]
    engine_weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    loaded = load_pretrained(point["weights"], num_classes=10)
    assert started["start_weights"] == state_digest(loaded)
    state = loaded.state_dict()
    compared = [key for key in engine_weights if not key.startswith("head.")]
    assert len(compared) > 10
    for key in compared:
        assert torch.equal(state[key], engine_weights[key].float()), key


def checkpoint_digest(point: dict, step: int) -> str:
    """state_digest of the point's model holding DeepSpeed's own zero_to_fp32 of its checkpoint at `step`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    checkpoint = Path(point["run"]) / f"checkpoint_{step:08d}"
    tag = json.loads((checkpoint / "vitpipe.json").read_text())["tag"]
    model = load_pretrained(point["weights"])
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag))
    return state_digest(model)


def assert_the_sweep_extended_at_its_edge_once(result: dict) -> None:
    """The sweep [0.01, 0.03] with lr_extend 1: a choice at either edge added the next rate beyond it, once,
    and every rate it ran is in its sweep; a choice inside added nothing."""
    ran = [member["lr"] for member in result["lr_sweep"]]
    added = [step["added"] for step in result.get("lr_extended", [])]
    assert sorted(ran) == sorted(result["lr_grid"]) == sorted([0.01, 0.03, *added])
    assert len(added) <= 1
    if added:  # x3 beyond the edge, at 3 significant digits
        assert added[0] == (0.09 if result["lr_extended"][0]["edge"] == "high" else 0.00333)
    scores = {member["lr"]: member["val_top1"] for member in result["lr_sweep"]}
    alone_at_edge = [lr for lr, score in scores.items() if score == max(scores.values())] in (
        [min(ran)],
        [max(ran)],
    )
    if alone_at_edge:
        assert result.get("lr_at_edge")  # still at an edge, and the result says so


def assert_each_rate_rescored_on_the_holdout_gives_its_recorded_score(point: dict, digits: Path) -> None:
    """Each rate of the point's sweep: its saved weights, scored again here on the validation hold-out
    carved from digits' training split, give the validation top-1 its result records (the score the rate
    was chosen by), and the chosen rate is the one of best validation score, whatever the test says."""
    result = point["results"][0]
    reader = SplitReader(str(digits), "train")
    held = holdout(reader.labels(), 0.1, point["seed"], VALIDATION_BYTES // reader.geometry.sample_bytes)
    folder = Path(result["weights"]).parent.parent
    scores = {}
    for member in result["lr_sweep"]:
        model = load_pretrained(str(folder / f"lr-{member['lr']:g}" / "model")).eval()
        correct = total = 0  # counted here, not by vitpipe's evaluator
        with torch.no_grad():
            for patches, labels in reader.take(held, 64):
                predicted = model(torch.as_tensor(patches)).argmax(dim=1)
                correct += int((predicted == torch.as_tensor(labels)).sum())
                total += len(labels)
        assert total == len(held) == result["val_samples"]
        assert correct / total == pytest.approx(member["val_top1"], abs=1e-9), member
        scores[member["lr"]] = correct / total
    assert result["lr"] == min(lr for lr, score in scores.items() if score == max(scores.values()))


def tracked_job(tmp_path: Path) -> Path:
    job = yaml.safe_load(SMOKE.read_text())
    job["tracking"] = {
        "mlflow": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "experiment": "study-smoke",
        "wandb": {"project": "vitpipe-study", "mode": "offline"},
    }
    path = tmp_path / "scaling_smoke.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def assert_point_tracked(uri: str, point: str, grid: list[float]) -> None:
    """The point's MLflow child of the run holds its fine-tuning's (target, mode) run, the chosen rate's
    score, with a run per rate of its sweep's `grid` under it (and a pretrained point's pretraining
    steps)."""
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("study-smoke").experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1  # one vitpipe run across all four launches

    def children(of: object) -> dict[str, object]:
        return {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == of.info.run_id}

    tracked = children(parents[0])[f"study:{point}"]
    assert tracked.info.status == "FINISHED"
    mode = "scratch" if point.startswith("scratch") else "pretrained"
    if mode == "pretrained":
        logged = sorted({m.step for m in client.get_metric_history(tracked.info.run_id, "loss")})
        assert logged[-1] == 16  # its pretraining's steps, on the point's own run
    task = children(tracked)[f"digits/{mode}"]
    assert task.data.metrics["lr"] in grid
    assert "test_top1" in task.data.metrics
    assert set(children(task)) == {f"digits/{mode}/lr={lr:g}" for lr in grid}


@pytest.mark.slow
def test_scaling_smoke_runs_every_point_keeps_a_failed_one_apart_and_reruns_only_what_is_missing(
    ray_local, tmp_path
):
    run, job = tmp_path / "run", tracked_job(tmp_path)
    # A file vitpipe did not write where one point's transfer results go: that point fails, and only it.
    blocked = run / "study" / "n0000000100-vit-seed0" / "transfer" / "digits" / "pretrained"
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("someone else's")

    first = run_smoke(run, job)
    assert first.returncode != 0, first.stdout[-2000:]
    status = statuses(run)
    assert status["study:n0000000100-vit-seed0"] == "failed"
    assert [step for step, state in status.items() if state != "ran"] == ["study:n0000000100-vit-seed0"]
    failed = json.loads((run / "stages" / "study.n0000000100-vit-seed0.json").read_text())
    assert "holds files a vitpipe fine-tuning task did not write (notes.txt)" in failed["error"]
    assert (blocked / "notes.txt").read_text() == "someone else's"

    # The report has every point: five with their numbers, the failed one with why; and the figure.
    results = json.loads((run / "study" / "results.json").read_text())
    by_name = {point["point"]: point for point in results["points"]}
    assert len(by_name) == 6
    assert by_name["n0000000100-vit-seed0"]["status"] == "failed"
    assert [e["size"] for e in results["curves"]["digits"]["finetune top-1"]["bit"]] == [0, 100, 400]
    assert [e["size"] for e in results["curves"]["digits"]["5-shot linear"]["vit"]] == [0, 400]
    assert_curves_are_the_points_own(run, results)
    report = (run / "report.md").read_text()
    assert "| 400 | bit | 0 |" in report
    assert "![transfer against pretraining images](report/transfer_vs_data.png)" in report
    assert (run / "report" / "transfer_vs_data.png").stat().st_size > 20_000
    # The slide's answer, computed from the curves, in results.json and the report.
    assert results["answer_lines"] == sentences(answer(results["curves"]))
    assert "What the curves say" in report
    assert f"- {results['answer_lines'][0]}" in report
    digits = run / "patches" / "digits"
    # Every point records the rate its validation split chose, in its results and the report's table; a
    # choice at an edge of [0.01, 0.03] added the rate beyond it (x3) once, and chose again.
    for point in by_name.values():
        if point["status"] == "done":
            assert_the_sweep_extended_at_its_edge_once(point["results"][0])
            assert_each_rate_rescored_on_the_holdout_gives_its_recorded_score(point, digits)
    assert "digits lr (val)" in (run / "study" / "results.md").read_text()
    # The analyses ran on the points that finished (BiTs have no attention: never submitted).
    analysis = json.loads((run / "analysis" / "analysis.json").read_text())
    assert analysis["by_data"]["vit"]["sizes"] == [0, 400]
    assert analysis["skipped"] == []
    assert analysis["failures"] == []

    # Each point pretrained on its own nested subset with its own Ray Train + DeepSpeed run.
    small = read_subset(str(run / "study" / "subsets" / "n0000000100.json"))
    large = read_subset(str(run / "study" / "subsets" / "n0000000400.json"))
    assert drawn_rows(small) < drawn_rows(large)
    bit = by_name["n0000000100-bit-seed0"]
    assert (bit["steps"], bit["images_seen"]) == (16, 16 * 32)
    assert bit["params"] == sum(p.numel() for p in load_pretrained(bit["weights"]).parameters())
    assert bit["architecture"] == "BiT R26x1, base width 8"
    losses = [r["loss"] for r in read_records(bit["run"]) if "loss" in r]
    assert losses[-1] < losses[0] - 0.2, losses  # BiT learns on the fractals
    assert type(load_pretrained(bit["weights"])).__name__ == "ResNetV2"
    assert_fine_tuning_started_from_the_engines_weights_at_its_best_step(bit)
    assert bit["pretrain_flops"] == train_flops(read_checkpoint(bit["weights"]).config) * 16 * 32
    # The BiT's HF exports, pretrained and fine-tuned, load in HF transformers and give vitpipe's logits.
    finetuned = Path(bit["results"][0]["weights"])
    for vitpipe_folder in (Path(bit["weights"]), finetuned):
        assert_hf_bit_export_agrees(vitpipe_folder, vitpipe_folder.parent / "hf")

    # The run holds as many pretraining slots as the session's 2 CPUs hold 1-CPU points: two, never
    # more at once. Whether two do overlap is Ray's placement (the other points' fine-tuning tasks take
    # CPUs too): one run here had them side by side, the next one after another.
    spans = []
    for name, point in by_name.items():
        if point["size"]:  # the failed point pretrained too: its transfer failed
            times = [r["time"] for r in read_records(str(run / "study" / name / "pretrain")) if "time" in r]
            spans.append((min(times), max(times)))
    assert len(spans) == 4
    most = max(sum(1 for start, end in spans if start <= moment <= end) for moment, _ in spans)
    assert most <= 2, spans
    assert "study: 2 point(s) pretrain at once on this cluster (each 1 CPU)" in first.stderr

    (blocked / "notes.txt").unlink()
    second = run_smoke(run, job)
    assert second.returncode == 0, second.stderr[-3000:]
    status = statuses(run)
    assert status["study:n0000000100-vit-seed0"] == "resumed"  # its record: failed, with this key
    cached = {step for step, state in status.items() if state == "cached"}
    others = [
        "n0000000400-vit-seed0",
        "n0000000400-bit-seed0",
        "n0000000100-bit-seed0",
        "scratch-vit-seed0",
        "scratch-bit-seed0",
        "subsets",
    ]
    assert cached >= {f"study:{name}" for name in others}
    # Its pretraining had finished: the rerun resumed it at its last step, with the weights it had there
    # (the hash of what the engine loaded against DeepSpeed's own consolidation of that checkpoint).
    resumed_point = json.loads((run / "study" / "n0000000100-vit-seed0" / "point.json").read_text())
    resumed = [r for r in read_records(resumed_point["run"]) if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [16]
    assert resumed[0]["weights"] == checkpoint_digest(resumed_point, 16)
    assert_fine_tuning_started_from_the_engines_weights_at_its_best_step(resumed_point)
    # With every point done, the study's report shows how attention distance by depth moves with data.
    analysis = json.loads((run / "analysis" / "analysis.json").read_text())
    assert [model["name"] for model in analysis["models"]] == [
        "n0000000400-vit-seed0/pretrained",
        "n0000000400-vit-seed0/digits-pretrained",
        "n0000000100-vit-seed0/pretrained",
        "n0000000100-vit-seed0/digits-pretrained",
        "scratch-vit-seed0/digits-scratch",
    ]
    assert analysis["by_data"]["vit"]["sizes"] == [0, 100, 400]
    resumed_analysis = json.loads(
        (run / "analysis" / "n0000000100-vit-seed0" / "pretrained" / "analysis.json").read_text()
    )
    assert resumed_analysis["subject"]["weights"] == resumed_point["weights"]
    report = (run / "report.md").read_text()
    assert "![attention distance by pretraining images](report/attention_distance_by_data.png)" in report
    assert (run / "report" / "attention_distance_by_data.png").stat().st_size > 20_000
    assert "**n0000000400-vit-seed0 pretrained**" in report  # the largest size's four pictures

    third = run_smoke(run, job)
    assert third.returncode == 0
    assert set(statuses(run).values()) == {"cached"}

    # One point alone, redone: only it (and the cached steps it reads) runs; the others and the report are
    # left as they were; its tracking child holds this launch. A scratch point, which has no pretraining:
    # what --force does to a pretrained point's run is test_a_forced_point_discards_its_own_pretraining_run.
    alone_name = "scratch-bit-seed0"
    others_files = [run / "report.md", *(run / "study").glob("*/point.json")]
    kept = {path: path.stat().st_mtime_ns for path in others_files if alone_name not in str(path)}
    point_file = run / "study" / alone_name / "point.json"
    before = point_file.stat().st_mtime_ns
    alone = run_smoke(run, job, "--point", alone_name, "--force", "study")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert statuses(run) == {
        "datasets:digits": "cached",
        "preprocess:digits": "cached",
        f"study:{alone_name}": "ran",
    }
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert point_file.stat().st_mtime_ns > before  # done again, not taken from the cache
    alone_point = json.loads(point_file.read_text())
    assert_point_tracked(
        f"sqlite:///{tmp_path / 'mlflow.db'}", alone_name, alone_point["results"][0]["lr_grid"]
    )
    assert list((run / "tracking" / "wandb").glob("offline-run-*"))


def test_the_studys_answer_is_computed_from_its_curves():
    def curve(scratch: float, means: list[float], std: float = 0.01, seeds: int = 3) -> list[dict]:
        sizes = [1000, 10000, 100000]
        return [{"size": 0, "mean": scratch, "std": std, "seeds": seeds}] + [
            {"size": size, "mean": mean, "std": std, "seeds": seeds}
            for size, mean in zip(sizes, means, strict=True)
        ]

    shots_curves = {"vit": curve(0.5, [0.4, 0.6, 0.8]), "bit": curve(0.5, [0.6, 0.65, 0.7])}
    top1_curves = {"vit": curve(0.9, [0.905, 0.9, 0.91]), "bit": curve(0.9, [0.95, 0.96, 0.97])}
    found = answer({"d": {"10-shot linear": shots_curves, "top-1": top1_curves}})
    shots = found["d"]["10-shot linear"]
    assert shots["vit"]["gain_over_scratch"]["gain"] == pytest.approx(0.3)
    assert shots["vit"]["gain_over_scratch"]["above_spread"]
    assert shots["vit"]["slope_per_decade"] == pytest.approx(0.2)
    assert shots["vit_vs_bit"]["crossover_at"] == 100000  # behind at 10,000 (-0.05), ahead at 100,000
    top1 = found["d"]["top-1"]
    assert not top1["vit"]["gain_over_scratch"]["above_spread"]  # +0.01 against a spread of 0.02
    assert top1["vit_vs_bit"]["crossover_at"] is None
    assert "extrapolated_crossover_images" not in top1["vit_vs_bit"]  # the ViT's line is not steeper
    assert "vit catches bit at 100,000 images" in sentences(found)[0]
    # A crossing of the lines inside the sizes measured is no extrapolation: the gaps there say behind.
    inside = answer({"d": {"m": {"vit": curve(0.5, [0.3, 0.59, 0.6]), "bit": curve(0.5, [0.5, 0.6, 0.61])}}})
    assert "extrapolated_crossover_images" not in inside["d"]["m"]["vit_vs_bit"]
    # A tie is not a crossover: the ViT must be ahead.
    tied = answer({"d": {"m": {"vit": curve(0.5, [0.4, 0.6, 0.7]), "bit": curve(0.5, [0.6, 0.6, 0.8])}}})
    assert tied["d"]["m"]["vit_vs_bit"]["crossover_at"] is None
    # Models are paired by family, whatever their names; one seed has no spread to beat.
    named = {
        "vit_b16": curve(0.5, [0.4, 0.6, 0.8], seeds=1),
        "bit_r50": curve(0.5, [0.6, 0.65, 0.7], seeds=1),
    }
    found = answer({"d": {"m": named}}, {"vit_b16": "vit", "bit_r50": "bit"})
    assert found["d"]["m"]["vit_b16_vs_bit_r50"]["crossover_at"] == 100000
    assert found["d"]["m"]["vit_b16"]["gain_over_scratch"]["above_spread"] is None
    [line] = sentences(found)
    assert "vit_b16 80.0 vs scratch 50.0 (one seed: no spread to beat), +20.0 pts/decade" in line
    assert "vit_b16 catches bit_r50 at 100,000 images" in line


@pytest.mark.slow
def _stop_and_check(
    command: list[str], pretraining: Path, run: Path, name: str, stop_signal: int, log: Path
) -> int:
    """Start the point, send `stop_signal` once it has a checkpoint beyond any before, check the clean
    stop; returns the step it stopped at."""
    before = [r["step"] for r in read_records(str(pretraining)) if r.get("event") == "stopped"]
    newest = max(before, default=0)
    with log.open("w+") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not [
            c for c in pretraining.glob("checkpoint_0*/vitpipe.json") if step_of(str(c.parent)) > newest
        ]:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        process.send_signal(stop_signal)
        assert process.wait(timeout=300) == 130, log.read_text()[-3000:]
    said = log.read_text()
    stopped = [r["step"] for r in read_records(str(pretraining)) if r.get("event") == "stopped"][len(before)]
    assert f"[run] study:{name}: stopped: pretraining stopped at step {stopped} and checkpointed it" in said
    assert "vitpipe: study: stopped on request; 1 step(s) stopped where the next run resumes them" in said
    assert f"continue with: vitpipe {' '.join(command[3:])}" in said
    assert "Traceback" not in said
    assert (pretraining / f"checkpoint_{stopped:08d}" / "vitpipe.json").is_file()
    point_record = json.loads((run / "stages" / f"study.{name}.json").read_text())
    assert point_record["status"] == "running"  # not failed: the next run resumes it
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    return stopped


def test_a_signalled_study_point_checkpoints_its_step_says_how_to_go_on_and_resumes_there(
    ray_local, tmp_path
):
    """SIGINT, then SIGTERM to the relaunch, to `vitpipe run JOB --point P` as the point pretrains: its
    workers checkpoint the step they reached and the run exits 130 saying so and how to continue; the
    point's record is not "failed", and the relaunch resumes at that step. Set back to the smoke's 16
    steps, the point (now past them) is refused in one line without colour codes, advising the study's
    ways, not `vitpipe export`."""
    name = "n0000000100-vit-seed0"
    job = yaml.safe_load(SMOKE.read_text())
    job["study"]["steps"] = 5000
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(job))
    run, pretraining = tmp_path / "run", tmp_path / "run" / "study" / name / "pretrain"
    address = ray.get_runtime_context().gcs_address
    command = [*VITPIPE, "run", str(path), "--run-dir", str(run), "--address", address, "--point", name]
    # SIGINT as it pretrains; then SIGTERM to the relaunch, whose steps before the point are cached (Ray
    # is joined just before the point starts, and must not take the SIGTERM handler over)
    stops = [
        _stop_and_check(command, pretraining, run, name, stop_signal, tmp_path / f"stderr{number}.txt")
        for number, stop_signal in enumerate((signal.SIGINT, signal.SIGTERM))
    ]
    stopped = stops[-1]

    job["study"]["steps"] = stopped + 4
    path.write_text(yaml.safe_dump(job))
    again = run_smoke(run, path, "--point", name)
    assert again.returncode == 0, again.stderr[-3000:]
    records = read_records(str(pretraining))
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == stops  # each launch went on where the one before stopped
    after = [r["step"] for r in records[records.index(resumed[-1]) :] if "loss" in r]
    assert after[0] > stopped  # none redone
    assert after[-1] == stopped + 4
    assert json.loads((run / "study" / name / "point.json").read_text())["steps"] == stopped + 4

    refused = run_smoke(run, SMOKE, "--point", name)
    assert refused.returncode == 1
    failed = json.loads((run / "stages" / f"study.{name}.json").read_text())["error"]
    assert failed == (
        f"ValueError: {pretraining}: has trained {stopped + 4} steps, beyond the budget of 16; raise the "
        f"study's steps (or epochs) to go on from there, or redo the point with --force study --point {name}"
    )
    assert f"[run] study:{name}: FAILED after" in refused.stderr
    assert failed in refused.stderr
    for text in (refused.stdout, refused.stderr):
        assert "\x1b" not in text
        assert "Traceback" not in text
        assert "vitpipe export" not in text


def test_the_benchmarks_results_name_the_run_folder_as_run_and_no_other_folder(tmp_path):
    run = tmp_path / "run"
    document = {
        "weights": f"{run}/study/p/export",
        "error": f"{run}: bad",
        "beside": f"{run}2/study",  # another folder whose name starts like the run's
        "points": [{"run": str(run)}],
        "top1": 0.93,
    }
    assert relative_to_run(document, run) == {
        "weights": "RUN/study/p/export",
        "error": "RUN: bad",
        "beside": f"{run}2/study",
        "points": [{"run": "RUN"}],
        "top1": 0.93,
    }
