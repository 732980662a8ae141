"""`vitpipe pretrain` refuses what cannot train, naming the file or key, before Ray or any worker starts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, PreprocessConfig, PretrainConfig, load_config
from pipeline.preprocess.run import preprocess
from pipeline.pretrain.plan import (
    check_pretrain,
    plan_pretrain,
    pretrain_recipe,
    run_identity,
    training_split,
)
from pipeline.study.subsets import draw_subsets, read_subset
from tests.conftest import REPO
from vit.objective import use_bf16
from vit.recipe import BatchSplit, Speed

RUN = {
    "model": {"patch_size": 4, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
    "num_workers": 2,
    "cpus_per_worker": 0.5,
    "global_batch_size": 32,
    "micro_batch_size": 8,
    "steps": 4,
}


@pytest.fixture(scope="module")
def patch_sets(fractals_dir, tmp_path_factory) -> dict[str, Path]:
    """The fractal corpus preprocessed with labels and without."""
    root = tmp_path_factory.mktemp("patch-sets")
    sets = {"labelled": PreprocessConfig(image_size=16, patch_size=4), "unlabelled": None}
    sets["unlabelled"] = sets["labelled"].model_copy(update={"label_key": None})
    for name, config in sets.items():
        preprocess(str(fractals_dir), str(root / name), config)
    (root / "empty").mkdir()
    (root / "a-file").write_text("not patches")
    return {name: root / name for name in [*sets, "empty", "a-file"]} | {"missing": root / "missing"}


def refusal(cli_before_ray, tmp_path: Path, data: Path, **changes) -> str:
    """`vitpipe pretrain` of a config (in this process): it fails before Ray is started or joined, having
    written no checkpoint; its message. (That every check also comes before the heavy imports is
    test_a_refused_run_imports_neither_torch_nor_ray_train's, in a fresh process.)"""
    config = {**RUN, "data": str(data), **changes}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    code, stderr = cli_before_ray("pretrain", str(path), "--storage", str(tmp_path / "runs"))
    assert code != 0, stderr
    assert not list(tmp_path.rglob("checkpoint_*"))
    return stderr


@pytest.mark.parametrize(
    ("data", "changes", "message"),
    [
        ("missing", {}, "no such directory"),
        ("a-file", {}, "a-file: is a file, not a patch directory"),
        ("empty", {}, "no _manifest.json; not a finished `vitpipe preprocess` output"),
        ("unlabelled", {}, "preprocessed without labels (label_key: none)"),
        ("labelled", {"split": "val"}, "no split 'val' to pretrain on"),
        ("labelled", {"model": {"variant": "Ti/8"}},
         "does not fit the model (Ti/8 at pretrain.image_size 16): patch_size 4 in the data, 8 in the model"),
        ("labelled", {"model": {**RUN["model"], "channels": 1}}, "channels 3 in the data, 1 in the model"),
        ("labelled", {"global_batch_size": 512}, "has 300 samples, fewer than one global batch of 512"),
    ],
)  # fmt: skip
def test_data_the_model_cannot_train_on_is_refused_naming_the_directory(
    patch_sets, tmp_path, cli_before_ray, data, changes, message
):
    stderr = refusal(cli_before_ray, tmp_path, patch_sets[data], **changes)
    assert str(patch_sets[data]) in stderr
    assert message in stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"global_batch_size": 40}, "global_batch_size 40 is not a multiple of micro_batch_size x"),
        ({"zero_stage": 4}, "zero_stage: Input should be 0, 1, 2 or 3 (got 4)"),
        ({"steps": 10, "epochs": 2}, "set either steps or epochs, not both"),
        ({"deepspeed": {"train_batch_size": 8}}, "deepspeed: ['train_batch_size'] are derived from vitpipe"),
        ({"placement": "EVERYWHERE"}, "placement: Input should be 'PACK', 'SPREAD' or 'STRICT_SPREAD'"),
        ({"num_workers": [1, 3]}, "global_batch_size 32 does not split into micro-batches of 8 over 3 "
                                  "worker(s); an elastic run (num_workers [1, 3]) may train on any number"),
        ({"num_workers": [3, 2]}, "num_workers: must be a number of workers (1 or more) or [min, max] with "
                                  "1 <= min <= max (got [3, 2])"),
        ({"num_workers": [0, 2]}, "(got [0, 2])"),
        ({"num_workers": "2"}, "(got '2')"),
        ({"elastic_wait_s": 0}, "elastic_wait_s: Input should be greater than 0"),
    ],
)  # fmt: skip
def test_settings_that_cannot_work_are_refused_naming_the_key(
    patch_sets, tmp_path, cli_before_ray, changes, message
):
    assert message in refusal(cli_before_ray, tmp_path, patch_sets["labelled"], **changes)


def test_a_run_name_or_storage_that_is_no_folder_is_refused(patch_sets, tmp_path, cli_before_ray):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**RUN, "data": str(patch_sets["labelled"])}))
    (tmp_path / "afile").write_text("mine")
    code, stderr = cli_before_ray("pretrain", str(path), "--storage", str(tmp_path / "afile"))
    assert code == 2
    assert (
        f"pretrain storage: {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file; a folder is needed"
        in stderr
    )
    code, stderr = cli_before_ray(
        "pretrain", str(path), "--storage", str(tmp_path / "runs"), "--name", "../../x"
    )
    assert code == 2
    assert "--name: '../../x' is not a name" in stderr  # it would be a run folder two levels up
    assert (tmp_path / "afile").read_text() == "mine"
    assert not (tmp_path / "runs").exists()


def test_a_refused_run_imports_neither_torch_nor_ray_train(patch_sets, tmp_path):
    """Every check above runs before the stage imports Ray Train, Ray Data or torch (~6 s of imports): a
    bad job is refused at once. The refusal here comes from the data plan, the last of them."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**RUN, "data": str(patch_sets["labelled"]), "global_batch_size": 512}))
    probe = (
        "import sys; from pipeline.cli import main; "
        f"code = main(['pretrain', {str(config)!r}, '--storage', {str(tmp_path / 'runs')!r}]); "
        "heavy = ('torch', 'ray.train', 'ray.data', 'deepspeed'); "
        "print('exit', code, *sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "fewer than one global batch of 512" in result.stderr
    assert result.stdout.splitlines()[-1] == "exit 2"  # refused as a config error; nothing heavy imported


def test_a_job_file_with_a_retired_data_key_is_refused_naming_what_replaced_it(tmp_path):
    for key, value, replaced in [("cache_data", "true", "streaming"), ("data_cpus", "1", "data_threads")]:
        job = tmp_path / f"{key}.yaml"
        job.write_text(f"name: old\npretrain:\n  data: x\n  {key}: {value}\n")
        message = rf"{key}.yaml: (.|\n)*pretrain: {key} is retired: replaced by {replaced}"
        with pytest.raises(ConfigError, match=message):
            load_config(job)


def test_plan_splits_the_global_batch_and_counts_steps_per_epoch(patch_sets):
    settings = {key: value for key, value in RUN.items() if key != "steps"}
    plan = plan_pretrain(PretrainConfig(data="x", epochs=3, **settings), str(patch_sets["labelled"]))
    # 300 samples, 2 workers: 150 each; global 32 = micro 8 x accumulation 2 x 2 workers: 9 whole steps
    assert (plan.batch.accumulation, plan.steps_per_epoch, plan.total_steps) == (2, 9, 27)
    assert plan.recipe.batch == plan.feed.batch == plan.batch  # one split, carried by the recipe and the feed
    model = plan.architecture
    assert (model.image_size, model.channels, model.num_classes) == (16, 3, 10)
    assert "300 images" in plan.describe()
    assert "27 steps (9 per epoch, 3.0 epochs)" in plan.describe()


def test_an_elastic_group_keeps_the_global_batch_at_every_size(patch_sets):
    """`num_workers: [min, max]`: the plan names both ends, and the one split function gives each size the
    accumulation that keeps the global batch (the workers re-split it for the size they find)."""
    config = PretrainConfig(data="x", **{**RUN, "num_workers": [1, 4], "global_batch_size": 96})
    assert (config.elastic, config.min_workers, config.max_workers) == (True, 1, 4)
    plan = plan_pretrain(config, str(patch_sets["labelled"]))
    assert plan.group.needs() == {"CPU": 2.0}
    assert plan.group.needs(1) == {"CPU": 0.5}
    assert "1-4 worker(s), elastic, x accumulation 12-3 (global batch 96 at every size)" in plan.describe()
    assert [plan.batch.on(world).accumulation * 8 * world for world in (1, 2, 3, 4)] == [96] * 4
    with pytest.raises(ValueError, match="a global batch of 32 does not split into micro-batches of 8 on 3"):
        BatchSplit(32, 8, 3)
    assert not PretrainConfig(data="x", **RUN).elastic  # a number stays a fixed group


def test_bf16_auto_is_decided_on_the_worker_by_its_device(monkeypatch):
    batch = BatchSplit(4096, 64, 2)
    assert pretrain_recipe(PretrainConfig(data="x"), 10, batch, 16).bf16 is False  # "auto": not on the driver
    assert pretrain_recipe(PretrainConfig(data="x", bf16=True), 10, batch, 16).bf16 is True
    assert use_bf16("auto", torch.device("cpu")) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert use_bf16("auto", torch.device("cuda")) is True
    assert use_bf16(False, torch.device("cuda")) is False


def test_gpu_speed_options_have_a_gpu_users_defaults_and_refuse_bad_values():
    config = PretrainConfig(data="x")
    assert config.speed() == Speed(compile="auto", activation_checkpointing=False, tf32=True)
    assert config.speed().compiles("cuda")
    assert not config.speed().compiles("cpu")
    zero = config.zero()
    assert (zero.grad_reduce_dtype, zero.overlap_comm) == ("fp32", True)
    for key, value in (
        ("reduce_bucket_size", 3),
        ("allgather_bucket_size", 0),
        ("grad_reduce_dtype", "fp16"),
        ("compile", "yes"),
    ):
        with pytest.raises(ValueError, match=key):
            PretrainConfig(data="x", **{key: value})


# ---------------------------------------------------------------- relaunching a run that has checkpoints

OPERATIONAL = [
    {"num_workers": 1}, {"num_workers": 4, "micro_batch_size": 4}, {"micro_batch_size": 4},
    {"cpus_per_worker": 2.0}, {"data_threads": 4}, {"placement": "SPREAD"},
    {"checkpoint_every": 7}, {"keep_checkpoints": 1}, {"max_failures": 0}, {"log_every": 1},
    {"steps": 400}, {"use_gpu": True}, {"compile": True}, {"activation_checkpointing": True}, {"tf32": False},
    {"grad_reduce_dtype": "bf16"}, {"overlap_comm": False}, {"reduce_bucket_size": 2**24},
    {"allgather_bucket_size": 2**24},
]  # fmt: skip
DEFINING = [
    ({"optimizer": {"lr": 0.01}}, "optimizer.lr 0.001 -> 0.01"),
    ({"optimizer": {"name": "sgd"}}, "optimizer.name adamw -> sgd"),
    ({"schedule": {"warmup_steps": 3}}, "schedule.warmup_steps 10000 -> 3"),
    ({"global_batch_size": 64}, "global_batch_size 32 -> 64"),
    ({"seed": 1}, "seed 0 -> 1"),
    ({"zero_stage": 3}, "zero_stage 2 -> 3"),
    ({"label_smoothing": 0.1}, "label_smoothing 0.0 -> 0.1"),
    ({"mixup_alpha": 0.2}, "mixup_alpha 0.0 -> 0.2"),
    ({"shuffle_buffer": 0}, "shuffle_buffer 2048 -> 0"),
    ({"bf16": True}, "bf16 auto -> True"),
    ({"model": {**RUN["model"], "width": 64, "heads": 2}}, "model width 32 -> 64"),
]


@pytest.fixture
def run_with_checkpoint(patch_sets, tmp_path) -> Path:
    """A run folder whose newest checkpoint (step 40) records RUN's model and defining settings, as the
    workers write them."""
    config = PretrainConfig.model_validate({**RUN, "steps": 100, "data": str(patch_sets["labelled"])})
    plan = plan_pretrain(config, config.data)
    checkpoint = tmp_path / "run" / "checkpoint_00000040"
    checkpoint.mkdir(parents=True)
    meta = {
        "step": 40,
        "tag": "step00000040",
        "world_size": 2,
        "zero_stage": 2,
        "vit": plan.architecture.to_dict(),
        "classes": plan.data.classes,
        "defines": run_identity(config, plan.data),
    }
    (checkpoint / "vitpipe.json").write_text(json.dumps(meta))
    return tmp_path / "run"


@pytest.mark.parametrize("changes", OPERATIONAL, ids=lambda c: ",".join(c))
def test_a_relaunch_that_changes_operational_settings_is_planned_to_resume(
    run_with_checkpoint, patch_sets, changes
):
    config = PretrainConfig.model_validate(
        {**RUN, "steps": 100, "data": str(patch_sets["labelled"]), **changes}
    )
    assert check_pretrain(config, config.data, str(run_with_checkpoint)).total_steps >= 40


@pytest.mark.parametrize(
    ("changes", "named"), DEFINING, ids=lambda c: ",".join(c) if isinstance(c, dict) else ""
)
def test_a_relaunch_that_changes_what_defines_the_run_is_refused_naming_it_and_deletes_nothing(
    run_with_checkpoint, patch_sets, tmp_path, capsys, changes, named
):
    before = sorted(p.relative_to(tmp_path) for p in run_with_checkpoint.rglob("*"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**RUN, "steps": 100, "data": str(patch_sets["labelled"]), **changes}))
    assert main(["pretrain", str(config), "--storage", str(tmp_path)]) == 2
    stderr = capsys.readouterr().err
    assert f"{run_with_checkpoint}: holds a run trained with other settings that define it" in stderr
    assert named in stderr
    assert "--force pretrain, which discards its 40 steps" in stderr
    assert "another name" in stderr
    assert "Ray " not in stderr  # refused before Ray started
    assert sorted(p.relative_to(tmp_path) for p in run_with_checkpoint.rglob("*")) == before


def test_a_budget_below_the_step_reached_is_refused(run_with_checkpoint, patch_sets):
    config = PretrainConfig.model_validate({**RUN, "steps": 30, "data": str(patch_sets["labelled"])})
    with pytest.raises(ValueError, match="has trained 40 steps, beyond the budget of 30"):
        check_pretrain(config, config.data, str(run_with_checkpoint))


def test_validate_refuses_what_a_relaunch_would_refuse(run_with_checkpoint, patch_sets, tmp_path, capsys):
    config = tmp_path / "run.yaml"  # the one-stage job `run` in STORAGE/run: the folder above
    config.write_text(
        yaml.safe_dump(
            {
                **RUN,
                "steps": 100,
                "data": str(patch_sets["labelled"]),
                "storage_path": str(tmp_path),
                "seed": 5,
            }
        )
    )
    assert main(["validate", str(config)]) == 2
    assert "seed 0 -> 5" in capsys.readouterr().err
    config.write_text(
        yaml.safe_dump(
            {**RUN, "steps": 100, "data": str(patch_sets["labelled"]), "storage_path": str(tmp_path)}
        )
    )
    assert main(["validate", str(config)]) == 0


def test_force_starts_afresh_saying_what_it_discards_and_keeps_others_files(
    run_with_checkpoint, patch_sets, tmp_path, capsys, ray_local
):
    (run_with_checkpoint / "notes.txt").write_text("mine")
    config = tmp_path / "run.yaml"  # another seed: refused without --force
    config.write_text(
        yaml.safe_dump(
            {
                **RUN,
                "steps": 100,
                "data": str(patch_sets["labelled"]),
                "seed": 5,
                "num_workers": 8,
                "micro_batch_size": 4,
            }
        )
    )
    assert main(["pretrain", str(config), "--storage", str(tmp_path)]) == 2
    assert (run_with_checkpoint / "checkpoint_00000040").is_dir()
    # 8 workers cannot be placed on the session's Ray: the forced launch stops there, after the clearing
    assert main(["pretrain", str(config), "--storage", str(tmp_path), "--force"]) == 1
    out = capsys.readouterr()
    assert f"discarding the 40 steps trained in {run_with_checkpoint}" in out.out
    assert "8 worker(s) cannot be placed" in out.err
    assert not (run_with_checkpoint / "checkpoint_00000040").exists()
    assert (run_with_checkpoint / "notes.txt").read_text() == "mine"


def test_a_study_point_resumed_on_other_rows_of_the_corpus_is_refused(patch_sets, tmp_path):
    """A point's checkpoints record which rows it trained on: another subset of the same size (another
    subset_seed) is another run, refused with the study's way on; the same rows in a moved corpus resume."""
    corpus = str(patch_sets["labelled"])
    split = training_split(corpus, "train")
    config = PretrainConfig.model_validate({**RUN, "steps": 100, "data": corpus})
    drawn = {
        seed: read_subset(draw_subsets(corpus, split, (64,), seed, str(tmp_path / f"s{seed}"))[64])
        for seed in (0, 1)
    }
    plan = plan_pretrain(config, corpus, drawn[0].rows)
    checkpoint = tmp_path / "point" / "checkpoint_00000040"
    checkpoint.mkdir(parents=True)
    meta = {
        "step": 40,
        "tag": "step00000040",
        "world_size": 2,
        "zero_stage": 2,
        "vit": plan.architecture.to_dict(),
        "defines": run_identity(config, plan.data),
    }
    (checkpoint / "vitpipe.json").write_text(json.dumps(meta))
    run = str(tmp_path / "point")

    assert check_pretrain(config, corpus, run, drawn[0].rows).data.samples == 64
    with pytest.raises(ValueError, match=r"data.rows [0-9a-f]+ -> [0-9a-f]+.*--force study"):
        check_pretrain(config, corpus, run, drawn[1].rows, redo="--force study")
    moved = Path(tmp_path / "moved")
    shutil.copytree(corpus, moved)
    rows = {str(moved / Path(file).relative_to(corpus)): taken for file, taken in drawn[0].rows.items()}
    assert check_pretrain(config.model_copy(update={"data": str(moved)}), str(moved), run, rows).total_steps


@pytest.mark.parametrize(
    ("image_size", "message"),
    [
        (20, r"image_size 20 must be a multiple of the patch size 4 and at most the stored 16 px"),
        (14, r"a multiple of the patch size 4"),
    ],
)
def test_a_model_resolution_the_stored_images_cannot_give_is_refused_before_ray(
    tmp_path, patch_sets, cli_before_ray, image_size, message
):
    assert re.search(
        message, refusal(cli_before_ray, tmp_path, patch_sets["labelled"], image_size=image_size)
    )

    settings = {key: value for key, value in RUN.items() if key != "steps"}
    plan = plan_pretrain(PretrainConfig(data="x", image_size=12, **settings), str(patch_sets["labelled"]))
    assert (plan.architecture.image_size, plan.data.geometry.image_size) == (12, 16)  # a crop of 16 px
