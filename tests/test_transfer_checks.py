"""Bad transfer inputs: each bad target is reported by name with its reason and the others still run;
a bad config, option or weights folder fails before Ray starts. A task computes on a GPU only when Ray
gave it one, and says so when it cannot use the one it was given."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
import transformers
import yaml

from pipeline.config import FinetuneConfig
from pipeline.preprocess.manifest import MANIFEST_FILE, read_manifest
from pipeline.ray_session import ray_task_device, task_device
from pipeline.runner.plan import Overrides, StageOptions, load_plan
from pipeline.runner.stages import pretrained_weights
from pipeline.transfer.launch import _refuse_foreign
from pipeline.transfer.plan import TargetError, check_fits, plan_target, plan_transfer
from pipeline.transfer.report import markdown_table, results_document
from pipeline.transfer.sweep import choose
from pipeline.transfer.task import _head_mismatch
from tests.conftest import REPO, preprocess_to, run_vitpipe
from vit.config import BiTConfig, ViTConfig
from vit.hf import export_hf
from vit.hf_bit import hf_bit_config_dict
from vit.model import VisionTransformer
from vit.weights import load_pretrained, save_pretrained, state_digest

TINY = ViTConfig(
    image_size=16, patch_size=4, channels=3, num_classes=10, width=32, depth=1, heads=2, mlp_dim=64
)
JOB = {
    "name": "checks",
    "finetune": {
        "targets": ["digits"],
        "modes": ["pretrained"],
        "steps": 4,
        "batch_size": 32,
        "val_fraction": 0.0,
        "flip": False,
        "optimizer": {"name": "sgd", "lr": 0.03},  # one rate: no hold-out
    },
    "evaluate": {"shots": [1, 5], "seeds": 1},
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_pretrained(VisionTransformer(TINY), tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="module")
def hf_weights(tmp_path_factory) -> Path:
    """The same kind of model as an HF transformers folder: what fine-tuning from a Hub checkpoint reads."""
    return export_hf(VisionTransformer(TINY), tmp_path_factory.mktemp("weights") / "hf")


@pytest.fixture(scope="module")
def bad_targets(digits_dir, digits_patches, tmp_path_factory) -> dict[str, str]:
    """Digits made unusable in one way each."""
    root = tmp_path_factory.mktemp("bad-targets")
    targets = {
        "unlabelled": preprocess_to(
            digits_dir, root / "unlabelled", image_size=32, patch_size=4, label_key=None
        ),
        "no-test": preprocess_to(digits_dir / "train", root / "no-test", image_size=32, patch_size=4),
        "patch8": preprocess_to(digits_dir, root / "patch8", image_size=32, patch_size=8),
        "gray": preprocess_to(digits_dir, root / "gray", image_size=32, patch_size=4, channels=1),
    }
    targets["no-nines"] = _drop_class_from_test(digits_patches, root / "no-nines", label=9)
    return targets


def _drop_class_from_test(source: str, out: Path, label: int) -> str:
    """A copy of a patch directory whose test split has no example of `label`."""
    shutil.copytree(source, out)
    manifest = read_manifest(str(out))
    kept = 0
    for name in manifest["splits"]["test"]["files"]:
        table = pq.read_table(out / name)
        table = table.filter(
            pq.ParquetFile(out / name).read(columns=["label"]).column("label").to_numpy() != label
        )
        pq.write_table(table, out / name)
        kept += table.num_rows
    manifest["splits"]["test"]["samples"] = kept
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return str(out)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("unlabelled", "was preprocessed without labels (label_key: none)"),
        ("no-test", "has no samples in split(s) ['train', 'test']; it holds '.' (1437)"),
        ("no-nines", "1 of 10 classes have no example in the test split"),
    ],
)
def test_a_target_that_cannot_be_evaluated_is_refused_by_name(bad_targets, name, message):
    with pytest.raises(TargetError) as refused:
        plan_target(name, bad_targets[name])
    assert str(refused.value).startswith(f"target {name!r}: ")
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("patch8", "patch_size 8 in the data, 4 in the model"),
        ("gray", "channels 1 in the data, 3 in the model"),
    ],
)
def test_a_target_the_checkpoint_cannot_take_is_refused_by_name(bad_targets, name, message):
    target = plan_target(name, bad_targets[name])
    with pytest.raises(TargetError, match=rf"target '{name}': .* does not fit the model of w: {message}"):
        check_fits(target, TINY, "w")


def write_job(tmp_path: Path, **finetune) -> Path:
    job = {**JOB, "run_dir": str(tmp_path / "run"), "finetune": {**JOB["finetune"], **finetune}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_bad_targets_are_reported_and_the_good_one_still_finishes(
    ray_local, hf_weights, digits_patches, bad_targets, tmp_path
):
    options = [f"--target={name}={directory}" for name, directory in bad_targets.items()]
    address = ray.get_runtime_context().gcs_address
    job = str(write_job(tmp_path))
    stale = tmp_path / "out" / "digits" / "pretrained" / "stale.txt"  # left by an earlier command's task,
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    (stale.parent / "metrics.jsonl").write_text("")  # which writes its metrics first
    digits_patches = os.path.relpath(digits_patches, REPO)  # tasks get it absolute
    result = run_vitpipe(
        "finetune",
        job,
        "--weights",
        str(hf_weights),
        f"--target=digits={digits_patches}",
        *options,
        "--out",
        str(tmp_path / "out"),
        "--address",
        address,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["target"], r["mode"]) for r in document["results"]] == [("digits", "pretrained")]
    assert document["results"][0]["top1"] > 0
    assert document["targets"]["digits"] == str(REPO / digits_patches)
    assert not stale.exists()  # a new command starts its (target, mode) folder afresh
    failed = {f["target"]: f["error"] for f in document["failures"]}
    assert set(failed) == set(bad_targets)
    assert "without labels" in failed["unlabelled"]
    assert "patch_size 8 in the data" in failed["patch8"]
    assert "channels 1 in the data" in failed["gray"]
    for name in bad_targets:
        assert f"vitpipe: {name}/pretrained failed: target {name!r}" in result.stderr
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| digits | pretrained |" in markdown
    assert "Failed:" in markdown
    assert (tmp_path / "out" / "results.png").is_file()


@pytest.fixture
def refused(cli_before_ray, tmp_path: Path):
    """refused(*args): `vitpipe ARGS` (in this process) fails before Ray is started or joined, writing no
    output folder; its message."""

    def run(*args: str) -> str:
        code, stderr = cli_before_ray(*args)
        assert code != 0, stderr
        assert not (tmp_path / "out").exists()
        return stderr

    return run


def test_malformed_target_option_is_refused(tmp_path, weights, refused):
    job = str(write_job(tmp_path))
    message = refused("finetune", job, "--weights", str(weights), "--target", "digits")
    assert "--target expects NAME=DIR, got 'digits'" in message
    message = refused("finetune", job, "--weights", str(weights), "--target", "a=x", "--target", "a=y")
    assert "--target a is given twice (x, y)" in message  # not the last one silently
    message = refused("finetune", job, "--weights", str(weights), "--target", "../up=x")
    assert "'../up' is not a name" in message  # a target's name becomes a folder of the results


def test_two_target_folders_of_one_name_are_refused_not_one_dropped(
    tmp_path, weights, digits_patches, refused
):
    for copy in ("a", "b"):
        shutil.copytree(digits_patches, tmp_path / copy / "digits")
    path = write_job(tmp_path, targets=[str(tmp_path / "a" / "digits"), str(tmp_path / "b" / "digits")])
    message = refused("finetune", str(path), "--weights", str(weights))
    assert "both go by the name 'digits' (a folder's last component)" in message


def test_scratch_mode_with_nothing_to_build_is_refused_before_ray(tmp_path, digits_patches, refused):
    message = refused(
        "finetune", str(write_job(tmp_path, modes=["scratch"])), f"--target=digits={digits_patches}"
    )
    assert "finetune mode 'scratch' has no model to build: add a pretrain section" in message


def test_a_target_naming_a_preprocess_entry_that_has_not_run_says_how_to_make_it(tmp_path, weights, refused):
    job = {
        **JOB,
        "run_dir": str(tmp_path / "run"),
        "preprocess": {"digits": {"input": str(tmp_path / "shards"), "image_size": 32, "patch_size": 4}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    message = refused("finetune", str(path), "--weights", str(weights))
    assert f"preprocess:digits has not run in {tmp_path / 'run'}" in message
    assert f"run `vitpipe run {path} --until preprocess` first" in message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 30, "micro_batch_size": 8}, "batch_size 30 is not a multiple of micro_batch_size 8"),
        ({"targets": ["a", "a"]}, "targets listed twice: ['a']"),
        ({"modes": ["scratch", "scratch"]}, "a mode is listed twice"),
        ({"val_fraction": 1.0}, "finetune.val_fraction: Input should be less than 1"),
    ],
)
def test_a_bad_finetune_section_fails_before_ray(tmp_path, weights, refused, changes, message):
    assert message in refused("finetune", str(write_job(tmp_path, **changes)), "--weights", str(weights))


def test_pretrained_mode_without_weights_is_refused(tmp_path, digits_patches, refused):
    job = str(write_job(tmp_path))
    message = refused("finetune", job, f"--target=digits={digits_patches}")
    assert "finetune mode 'pretrained' needs weights: add a pretrain section or set" in message


def test_unreadable_weights_fail_naming_the_file_before_any_task(tmp_path, weights, digits_patches, refused):
    broken = tmp_path / "broken"
    shutil.copytree(weights, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    job = str(write_job(tmp_path))
    message = refused("finetune", job, "--weights", str(broken), f"--target=digits={digits_patches}")
    assert f"{broken / 'model.safetensors'}: not a readable safetensors file" in message


def test_an_output_folder_holding_the_weights_is_refused(tmp_path, digits_patches):
    weights = save_pretrained(VisionTransformer(TINY), tmp_path / "out" / "digits" / "pretrained" / "model")
    job = str(write_job(tmp_path))
    result = run_vitpipe(
        "evaluate",
        job,
        "--weights",
        str(weights),
        f"--target=digits={digits_patches}",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 1
    assert "lie inside the output folder" in result.stderr
    assert (weights / "model.safetensors").is_file()


def test_a_job_whose_pretraining_has_not_run_says_so(tmp_path, digits_patches, refused):
    job = {**JOB, "pretrain": {"data": "x", "storage_path": str(tmp_path / "runs")}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    message = refused("finetune", str(path), f"--target=digits={digits_patches}")
    assert "pretrain has not run in" in message
    assert f"run `vitpipe run {path} --until pretrain` first" in message


def test_targets_weights_and_output_resolve_from_the_job_and_options(tmp_path, weights):
    """A single-stage command's options become its step: targets given as NAME=DIR join the section's,
    the job's pretraining export is the default weights, the run folder the default output."""
    job = {
        **JOB,
        "pretrain": {"data": "x", "storage_path": str(tmp_path / "runs")},
        "run_dir": str(tmp_path / "run"),
    }
    job["finetune"] = {**JOB["finetune"], "targets": [str(tmp_path / "data" / "cifar-384/")]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    plan = load_plan(path, stage=StageOptions(overrides=Overrides(targets={"extra": "/x"})))
    step = next(s for s in plan.steps if s.stage == "finetune")
    assert step.settings["targets"] == {"cifar-384": str(tmp_path / "data" / "cifar-384/"), "extra": "/x"}
    assert step.depends == ("pretrain",)
    assert pretrained_weights(plan) == str(tmp_path / "runs" / "checks" / "export" / "vitpipe")
    # in the run folder (only checkpoints go to storage), beside the run's own results: another target
    assert step.output.startswith(str(tmp_path / "run" / "transfer-"))

    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"name": "bare"}))
    options = StageOptions(weights=str(weights), overrides=Overrides(targets={"d": "/d"}))
    plan = load_plan(bare, stage=options, evaluate=True)
    step = next(s for s in plan.steps if s.stage == "evaluate")
    assert step.settings["targets"] == {"d": "/d"}
    assert step.external == (("patches", "/d"), ("tree", str(weights)))
    assert pretrained_weights(plan) == str(weights)
    assert step.output.startswith(str(Path("runs/bare/evaluate-").absolute()))  # in the default run folder
    given = dataclasses.replace(options, overrides=Overrides({"d": "/d"}, "/out"))
    elsewhere = next(s for s in load_plan(bare, stage=given, evaluate=True).steps if s.stage == "evaluate")
    assert elsewhere.output == "/out"
    assert elsewhere.settings["out"] == "/out"  # results elsewhere are another step's, not the run's


def test_a_head_is_scored_on_a_target_only_with_the_same_classes(tmp_path):
    digits = [str(d) for d in range(10)]
    named = save_pretrained(VisionTransformer(TINY), tmp_path / "named", labels=digits)
    unnamed = save_pretrained(VisionTransformer(TINY), tmp_path / "unnamed")
    assert _head_mismatch(str(named), digits) is None
    assert _head_mismatch(str(unnamed), digits) is None  # no names: as many classes is taken as the same
    assert "are not the target's" in _head_mismatch(str(named), digits[::-1])
    assert "a 10-class head, the target 5 classes" in _head_mismatch(str(unnamed), digits[:5])


def test_a_results_folder_holding_others_files_is_refused_and_a_task_s_is_replaced(tmp_path):
    _refuse_foreign(str(tmp_path / "absent"))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "metrics.jsonl").write_text("")  # what a task writes first
    _refuse_foreign(str(tmp_path / "ours"))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.pdf").write_text("")
    with pytest.raises(
        FileExistsError, match=r"theirs: holds files a vitpipe fine-tuning task did not write \(thesis.pdf\)"
    ):
        _refuse_foreign(str(tmp_path / "theirs"))


def test_a_finetune_resolution_beyond_the_stored_images_is_refused_by_name(digits_patches):
    with pytest.raises(
        TargetError, match=r"target 'digits': finetune.image_size 48 must be .* at most the stored"
    ):
        plan_target("digits", digits_patches, image_size=48)
    target = plan_target("digits", digits_patches, image_size=8)
    assert target.model_geometry.image_size == 8
    assert target.geometry.image_size > 8  # read as stored, cropped on the device


def test_an_hf_bit_folder_fine_tunes_as_pretrained_weights_and_exports_back_to_hf(
    ray_local, digits_patches, tmp_path
):
    """A `BitForImageClassification` folder as transformers saves it is `--weights` like a vitpipe one:
    fine-tuning starts from its backbone (adapted to 32 px and a 10-class head) and exports HF BiT."""
    config = BiTConfig(image_size=32, patch_size=4, num_classes=5, depth=26, base_width=8, groups=8)
    fields = {k: v for k, v in hf_bit_config_dict(config).items() if k != "architectures"}
    transformers.BitForImageClassification(transformers.BitConfig(**fields)).save_pretrained(
        tmp_path / "hf-bit"
    )
    address = ray.get_runtime_context().gcs_address
    result = run_vitpipe(
        "finetune",
        str(write_job(tmp_path)),
        "--weights",
        str(tmp_path / "hf-bit"),
        f"--target=digits={digits_patches}",
        "--out",
        str(tmp_path / "out"),
        "--address",
        address,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fine_tuned = json.loads((tmp_path / "out" / "results.json").read_text())["results"][0]
    started = load_pretrained(tmp_path / "hf-bit", image_size=32, patch_size=4, num_classes=10)
    assert fine_tuned["start_weights"] == state_digest(started)
    exported, info = transformers.BitForImageClassification.from_pretrained(
        Path(fine_tuned["weights"]).parent / "hf", output_loading_info=True
    )
    assert not any(info.values()), info
    assert exported.config.num_labels == 10


def test_a_file_of_someone_elses_in_a_rates_folder_is_kept_and_named(
    ray_local, weights, digits_patches, tmp_path
):
    """A (target, mode) folder of an earlier command is replaced, but not when one of its rate folders
    holds a file no task wrote: the command refuses, naming it, and the file stays."""
    group = tmp_path / "out" / "digits" / "pretrained"
    (group / "lr-0.03").mkdir(parents=True)
    (group / "result.json").write_text("{}")  # the earlier command's, so the group itself is vitpipe's
    notes = group / "lr-0.03" / "notes.txt"
    notes.write_text("mine")
    address = ray.get_runtime_context().gcs_address
    result = run_vitpipe(
        "finetune",
        str(write_job(tmp_path)),
        "--weights",
        str(weights),
        f"--target=digits={digits_patches}",
        "--out",
        str(tmp_path / "out"),
        "--address",
        address,
    )
    assert result.returncode != 0
    assert "lr-0.03: holds files a vitpipe fine-tuning task did not write (notes.txt)" in result.stderr
    assert notes.read_text() == "mine"


def test_a_task_computes_on_a_gpu_only_when_ray_assigned_it_one():
    # Ray 2.60 leaves the node's GPUs visible to a task that asked for none: CUDA being there is not enough.
    assert task_device([], cuda_available=True) == torch.device("cpu")
    assert task_device([], cuda_available=False) == torch.device("cpu")
    assert task_device([0], cuda_available=True) == torch.device("cuda")
    assert task_device(["3"], cuda_available=True, ray_sets_visible_devices=False) == torch.device("cuda", 3)
    with pytest.raises(RuntimeError, match="Ray assigned this task GPU 0 but torch cannot use CUDA here"):
        task_device([0], cuda_available=False)


def test_a_ray_task_without_a_gpu_is_assigned_none_and_computes_on_the_cpu(ray_local):
    def device_of_task() -> tuple[list, str]:
        return ray.get_gpu_ids(), str(ray_task_device())

    gpu_ids, device = ray.get(ray.remote(device_of_task).options(num_cpus=1, num_gpus=0).remote())
    assert gpu_ids == []
    assert device == "cpu"


def _keep_train(source: str, out: Path, count: Callable[[int], int]) -> str:
    """A copy of a patch directory whose train split keeps the first `count(label)` images of each class."""
    shutil.copytree(source, out)
    manifest = read_manifest(str(out))
    seen: dict[int, int] = {}
    kept = 0
    for name in manifest["splits"]["train"]["files"]:
        table = pq.read_table(out / name)
        keep = []
        for label in table.column("label").to_pylist():
            seen[label] = seen.get(label, 0) + 1
            keep.append(seen[label] <= count(label))
        table = table.filter(keep)
        pq.write_table(table, out / name)
        kept += table.num_rows
    manifest["splits"]["train"]["samples"] = kept
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return str(out)


SWEEP = FinetuneConfig(targets=["t"], modes=("pretrained",), lr_sweep=(0.01, 0.03))


def test_a_sweep_without_a_validation_split_is_refused_before_any_task(digits_patches, weights, tmp_path):
    one_each = _keep_train(digits_patches, tmp_path / "one-each", lambda label: 1)
    plan = plan_transfer(SWEEP, None, {"one-each": one_each}, out=str(tmp_path / "out"), weights=str(weights))
    assert plan.tasks == []
    [failure] = plan.failures
    assert failure["error"].startswith(
        "target 'one-each': lr_sweep [0.01, 0.03] is chosen on a validation split held out of train, and its "
        "10 training images (at most 1 of a class) leave none at val_fraction 0.1"
    )
    assert "Give each class two or more training images, or fine-tune at one rate" in failure["error"]
    one_rate = FinetuneConfig(targets=["t"], modes=("pretrained",), optimizer={"name": "sgd", "lr": 0.01})
    plan = plan_transfer(
        one_rate, None, {"one-each": one_each}, out=str(tmp_path / "out"), weights=str(weights)
    )
    assert ([task.lr for task in plan.tasks], plan.failures) == ([0.01], [])  # one rate needs no choosing


def test_a_validation_split_of_one_class_is_warned_of_before_any_task(
    digits_patches, weights, tmp_path, capsys
):
    lopsided = _keep_train(digits_patches, tmp_path / "lopsided", lambda label: 3 if label == 0 else 1)
    plan = plan_transfer(SWEEP, None, {"lopsided": lopsided}, out=str(tmp_path / "out"), weights=str(weights))
    assert [task.lr for task in plan.tasks] == [0.01, 0.03]
    assert (
        "transfer: warning: target 'lopsided': the validation split lr_sweep [0.01, 0.03] is chosen on holds "
        "1 image(s) of 1 class(es) (val_fraction 0.1 of 12 training images (at most 3 of a class)), too few "
        "to tell the rates apart"
    ) in capsys.readouterr().err


def _member(lr: float, val_top1: float | None, images: int = 20, classes: int = 10) -> dict:
    """A sweep member's result, as a task returns it (the fields the choice reads)."""
    return {
        "target": "t",
        "mode": "pretrained",
        "lr": lr,
        "val_top1": val_top1,
        "val_samples": images,
        "val_classes": classes,
        "per_class": {str(label): 0.5 for label in range(10)},
        "top1": 0.5,
        "best_step": 4,
        "steps": 4,
        "seconds": 1.0,
        "fewshot": None,
    }


@pytest.mark.parametrize(
    ("members", "lr", "chosen_by", "warning"),
    [
        ([_member(0.01, 0.5), _member(0.03, 0.7)], 0.03, "val_top1", None),
        (
            [_member(0.001, 0.4), _member(0.01, 0.7), _member(0.03, 0.7)],
            0.01,
            "tie: val_top1 70.0% at lr 0.01, 0.03; the lowest of them",
            None,
        ),
        (
            [_member(0.01, 0.5), _member(0.03, 0.5)],
            0.01,
            "tie: val_top1 50.0% at every rate; the lowest rate",
            "every rate scored the same on the validation split (20 image(s) of 10 class(es))",
        ),
        (
            [_member(0.01, 1.0, 1, 1), _member(0.03, 1.0, 1, 1)],
            0.01,
            "tie: val_top1 100.0% at every rate; the lowest rate",
            "the validation split holds 1 image(s) of 1 class(es), too few to tell the rates apart",
        ),
        (
            [_member(0.01, None, 0, 0), _member(0.03, None, 0, 0)],
            0.01,
            "no validation score: the lowest rate",
            "the validation split holds 0 image(s) of 0 class(es), too few to tell the rates apart",
        ),
    ],
)
def test_the_chosen_rate_says_how_it_was_chosen_and_warns_when_validation_could_not_tell(
    members, lr, chosen_by, warning
):
    result = choose(members)
    assert (result["lr"], result["lr_chosen_by"]) == (lr, chosen_by)
    assert (warning is None) == (result["lr_choice_warning"] is None)
    if warning is not None:
        assert warning in result["lr_choice_warning"]
        table = markdown_table(results_document([result], [], {"name": "x", "evaluate": None}))
        assert "**—**" not in table  # no score is never shown as the best one
        assert f"- t / pretrained: warning: {warning}" in table
