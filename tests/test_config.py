"""The config schema: a bad file fails before any work, naming the file and the key path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import (
    ConfigError,
    FinetuneConfig,
    FractalsConfig,
    ImageFolderConfig,
    ModelConfig,
    PipelineConfig,
    PretrainConfig,
    load_config,
    validate,
)
from pipeline.runner.preflight import validated
from pipeline.transfer.plan import finetune_recipe
from tests.conftest import GOOD_JOB, run_vitpipe
from vit.config import BiTConfig, ViTConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def errors_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return str(caught.value)


def test_valid_config_loads_with_defaults_and_exponent_floats(tmp_path):
    config = load_config(write(tmp_path, GOOD_JOB))
    assert isinstance(config, PipelineConfig)
    assert config.pretrain is not None
    assert config.pretrain.optimizer.lr == pytest.approx(1e-3)
    assert config.datasets["corpus"].kind == "fractals"
    assert config.pretrain.schedule.decay == "cosine"
    assert config.digest() == load_config(write(tmp_path, GOOD_JOB)).digest()


def test_unknown_key_names_file_key_path_and_suggestion(tmp_path):
    message = errors_of(tmp_path, GOOD_JOB.replace("per_class: 100", "per_clas: 100"))
    assert str(tmp_path / "job.yaml") in message
    assert "datasets.corpus.per_clas: unknown key; did you mean 'per_class'?" in message


def test_unknown_nested_key_in_pretrain(tmp_path):
    message = errors_of(tmp_path, GOOD_JOB.replace("weight_decay: 0.05", "wieght_decay: 0.05"))
    assert "pretrain.optimizer.wieght_decay: unknown key; did you mean 'weight_decay'?" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # wrong types
        (
            "classes: 10",
            "classes: ten",
            "datasets.corpus.classes: Input should be a valid integer (got 'ten')",
        ),
        (
            "classes: 10",
            "classes: true",
            "datasets.corpus.classes: Input should be a valid integer (got True)",
        ),
        (
            "num_workers: 2",
            "num_workers: 2.5",
            "pretrain.num_workers: must be a number of workers (1 or more) or [min, max] with "
            "1 <= min <= max (got 2.5)",
        ),
        ("lr: 1e-3", "lr: fast", "pretrain.optimizer.lr: Input should be a valid number (got 'fast')"),
        ("targets: [digits]", "targets: digits", "finetune.targets: Input should be a valid list"),
        # impossible values
        ("size: 32}", "size: 8}", "datasets.corpus.size: Input should be greater than or equal to 16"),
        ("classes: 10", "classes: 0", "datasets.corpus.classes: Input should be greater than 0"),
        (
            "patch_size: 4",
            "patch_size: 5",
            "preprocess.corpus: image_size 32 is not a multiple of patch_size 5",
        ),
        ("variant: Ti/4", "variant: XL/4", "pretrain.model.variant: unknown variant 'XL'"),
        (
            "patch_size: 4}",
            "patch_size: 4, label_key: json label}",
            "preprocess.corpus.label_key: String should",
        ),
        (
            "patch_size: 4}",
            "patch_size: 4, image_keys: [.JPG]}",
            "preprocess.corpus.image_keys[0]: String should",
        ),
        (
            "patch_size: 4}",
            "patch_size: 4, image_keys: []}",
            "preprocess.corpus.image_keys: needs at least 1 value, got 0",
        ),
        (
            "patch_size: 4}",
            "patch_size: 4, compression: gzip}",
            "preprocess.corpus.compression: Input should be",
        ),
        ("micro_batch_size: 32", "micro_batch_size: 48", "global_batch_size 128 is not a multiple of"),
        ("zero_stage: 2", "zero_stage: 4", "pretrain.zero_stage: Input should be 0, 1, 2 or 3"),
        ("kind: digits", "kind: cifar10", "datasets.digits: Input tag 'cifar10' found using 'kind'"),
    ],
)
def test_bad_value_names_key_and_value(tmp_path, old, new, expected):
    assert expected in errors_of(tmp_path, GOOD_JOB.replace(old, new))


def test_every_error_is_reported_at_once(tmp_path):
    message = errors_of(
        tmp_path, GOOD_JOB.replace("classes: 10", "classes: 0").replace("size: 32}", "size: 9}")
    )
    assert "2 config errors" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    message = errors_of(tmp_path, "name: quick\ndatasets: {corpus: [1\n")
    assert "job.yaml: not valid YAML" in message
    assert "line 3" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "expected a mapping of keys to values, got list" in errors_of(tmp_path, "- a\n- b\n")


def test_missing_required_key(tmp_path):
    assert "name: required key is missing" in errors_of(tmp_path, "datasets: {}\n")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_tags_are_not_executed(tmp_path):
    message = errors_of(tmp_path, "name: !!python/object/apply:os.system ['true']\n")
    assert "not valid YAML" in message


def test_cli_style_errors_name_options():
    with pytest.raises(ConfigError) as caught:
        validate(
            {"classes": -1, "min_maps": 5, "max_maps": 3}, FractalsConfig, "vitpipe datasets", key_style="cli"
        )
    assert "--classes: Input should be greater than 0 (got -1)" in str(caught.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="min_maps \\(5\\) is larger than max_maps \\(3\\)"):
        validate({"min_maps": 5, "max_maps": 3}, FractalsConfig, "x")
    with pytest.raises(ConfigError, match="set shard_samples, shard_bytes or both"):
        validate({"src": "x", "shard_samples": None, "shard_bytes": None}, ImageFolderConfig, "x")
    with pytest.raises(ConfigError, match="width 100 is not divisible by heads 3"):
        validate({"data": "d", "model": {"variant": "Ti/16", "width": 100}}, PretrainConfig, "x")


def test_cli_rejects_bad_option_before_starting_ray(tmp_path):
    out = tmp_path / "never"
    result = run_vitpipe("datasets", "fractals", str(out), "--classes", "0", "--size", "4", "--seed", "-1")
    assert result.returncode == 2
    assert "--classes: Input should be greater than 0 (got 0)" in result.stderr
    assert "--size: Input should be greater than or equal to 16 (got 4)" in result.stderr
    assert "--seed: Input should be greater than or equal to 0 (got -1)" in result.stderr
    assert "Ray" not in result.stderr  # validation happens before Ray is started
    assert not out.exists()


def test_model_section_builds_the_vit_it_describes():
    section = ModelConfig(variant="Ti/4", width=96, depth=4, heads=3, mlp_dim=384, pool="gap", drop_path=0.1)
    config = section.architecture(image_size=32, channels=1, num_classes=10)
    assert section.patch_size == 4
    assert (config.width, config.depth, config.heads, config.mlp_dim) == (96, 4, 3, 384)
    assert (config.patch_size, config.image_size, config.channels, config.num_classes) == (4, 32, 1, 10)
    assert (config.pool, config.drop_path, config.mean) == ("gap", 0.1, (0.5,))
    assert (
        ModelConfig(variant="B/16").architecture(image_size=224, channels=3, num_classes=1000).mlp_dim == 3072
    )


def test_a_model_section_names_its_family_and_job_files_without_one_mean_a_vit():
    for job in sorted((Path(__file__).parents[1] / "jobs").glob("*.yaml")):
        config = load_config(job)
        if config.pretrain is not None and config.study is None:
            assert config.pretrain.model.family == "vit", job
    bit = validate({"data": "d", "model": {"family": "bit", "variant": "R101x3"}}, PretrainConfig, "job.yaml")
    built = bit.model.architecture(image_size=64, channels=3, num_classes=5, patch_size=8)
    assert built == BiTConfig(image_size=64, patch_size=8, num_classes=5, depth=101, width_factor=3)
    vit = validate({"data": "d", "model": {"variant": "S/8"}}, PretrainConfig, "job.yaml").model
    assert isinstance(vit.architecture(image_size=32, channels=1, num_classes=2), ViTConfig)
    with pytest.raises(ConfigError, match=r"model: family must be 'vit' or 'bit'"):
        validate({"data": "d", "model": {"family": "cnn"}}, PretrainConfig, "job.yaml")
    with pytest.raises(ConfigError, match=r"model.depht: unknown key; did you mean 'depth'\?"):
        validate({"data": "d", "model": {"family": "bit", "depht": 50}}, PretrainConfig, "job.yaml")
    with pytest.raises(ConfigError, match=r"model.depth: Input should be 26, 50, 101 or 152"):
        validate({"data": "d", "model": {"family": "bit", "depth": 34}}, PretrainConfig, "job.yaml")
    with pytest.raises(ConfigError, match="do not split into 32 GroupNorm groups"):
        validate({"data": "d", "model": {"family": "bit", "base_width": 20}}, PretrainConfig, "job.yaml")


def test_finetune_defaults_are_the_papers_recipe_and_accumulation_splits_the_batch():
    config = FinetuneConfig(targets=["d"], batch_size=512, micro_batch_size=128)
    assert config.lr_sweep == (0.001, 0.003, 0.01, 0.03)  # the paper's sweep, chosen on validation
    recipe = finetune_recipe(config.at_rate(0.01))
    sgd = recipe.optimizer
    assert (sgd.name, sgd.lr, sgd.momentum, sgd.weight_decay, sgd.grad_clip) == (
        "sgd",
        0.01,
        0.9,
        0.0,
        1.0,
    )
    assert (recipe.schedule.decay, recipe.schedule.warmup_steps, recipe.total_steps) == ("cosine", 50, 500)
    assert (recipe.batch.micro_batch, recipe.batch.accumulation, recipe.mixup_alpha) == (128, 4, 0.0)
    assert finetune_recipe(FinetuneConfig(targets=["d"])).batch.accumulation == 1


@pytest.mark.parametrize(
    ("finetune", "expected"),
    [
        ("{targets: [d]}", (0.001, 0.003, 0.01, 0.03)),
        ("{targets: [d], optimizer: {lr: 0.02}}", (0.02,)),  # a job's one rate stays one rate
        ("{targets: [d], lr_sweep: [0.1, 0.01]}", (0.01, 0.1)),
        ("{targets: [d], lr_sweep: [0.1, 0.01], optimizer: {lr: 0.01}}", (0.01, 0.1)),  # a saved config
    ],
)
def test_the_finetune_rates_are_the_sweep_or_the_jobs_one_rate(tmp_path, finetune, expected):
    job = f"name: x\nfinetune: {finetune}\n"
    assert load_config(write(tmp_path, job)).finetune.lr_sweep == expected


@pytest.mark.parametrize(
    ("sweep", "lr"),
    [("[0.01]", 0.01), ("[0.001, 0.003]", 0.003), ("[0.001, 0.003, 0.01, 0.03]", 0.03)],
)
def test_the_job_validate_prints_loads_back_and_runs_the_rates_it_shows(tmp_path, sweep, lr):
    """`lr_sweep` set alone makes optimizer.lr its largest rate (the fine-tuning defaults kept), so the
    resolved job `vitpipe validate` prints is one vitpipe accepts, with the same rates."""
    job = write(tmp_path, GOOD_JOB.replace("targets: [digits]", f"targets: [digits]\n  lr_sweep: {sweep}"))
    printed = json.loads(validated(job, check_inputs=False).split("\n", 1)[1])
    optimizer = printed["finetune"]["optimizer"]
    assert (optimizer["name"], optimizer["lr"], optimizer["weight_decay"]) == ("sgd", lr, 0.0)
    (tmp_path / "again").mkdir()
    again = write(tmp_path / "again", yaml.safe_dump(printed))
    assert load_config(again).finetune == load_config(job).finetune


@pytest.mark.parametrize(
    ("finetune", "message"),
    [
        (
            "{targets: [d], lr_sweep: [0.1, 0.01], optimizer: {lr: 0.3}}",
            "optimizer.lr 0.3 is not in lr_sweep",
        ),
        ("{targets: [d], lr_sweep: [0.1, 0.1]}", r"a rate is listed twice: \[0.1, 0.1\]"),
        ("{targets: [d], lr_sweep: []}", "finetune.lr_sweep: needs at least 1 value, got 0"),
        ("{targets: [d], val_fraction: 0.0}", r"lr_sweep \[0.001, 0.003, 0.01, 0.03\] is chosen from on a "),
    ],
)
def test_a_sweep_that_cannot_be_chosen_from_is_refused(tmp_path, finetune, message):
    assert re.search(message, errors_of(tmp_path, f"name: x\nfinetune: {finetune}\n"))


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (
            {"preprocess": {"corpus": {"image_size": 32}}},
            "preprocess.corpus.patch_size is not set and no model of this job reads 'corpus'",
        ),
        (
            {"preprocess": {"ok": {"image_size": 32}}, "finetune": {"targets": ["ok"], "weights": "/w"}},
            "preprocess.ok.patch_size is not set, and the job has no pretrain model to take it from "
            "(finetune.weights are read only when it runs); set it to the weights' patch size",
        ),
        (
            {"pretrain": {"data": "x", "model": {"variant": "Ti/16", "patch_size": 8}}},
            "variant 'Ti/16' and patch_size 8 disagree: set one",
        ),
        (
            {"pretrain": {"data": "x", "model": {"patch_size": 4, "width": 32}}},
            "a model without a variant needs all of width, depth, mlp_dim, heads; depth, mlp_dim, heads",
        ),
    ],
)
def test_the_patch_size_is_written_once_and_a_model_by_dimensions_is_complete(job, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate({"name": "once", **job}, PipelineConfig, source="job.yaml")


TINY_MODEL = {"patch_size": 4, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64}


def test_a_preprocess_entry_takes_the_patch_size_of_the_model_that_reads_it():
    job = validate(
        {
            "name": "once",
            "preprocess": {"corpus": {"image_size": 32}, "digits": {"image_size": 32}},
            "pretrain": {"data": "corpus", "model": TINY_MODEL},
            "finetune": {"targets": ["digits"]},
        },
        PipelineConfig,
        source="job.yaml",
    )
    assert job.preprocess["corpus"].patch_size == job.preprocess["digits"].patch_size == 4
    assert job.pretrain.model.architecture(image_size=32, channels=3, num_classes=10).width == 32


def test_validate_refuses_a_job_that_run_would_refuse(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\ndatasets:\n  digits: {kind: digits}\nfinetune:\n  targets: [digits]\n")
    assert main(["validate", str(path)]) == 2
    assert "finetune target 'digits' is a dataset, not preprocessed patches" in capsys.readouterr().err


def test_a_binary_config_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ConfigError, match=r"weights\.yaml: not a text file"):
        load_config(path)


def test_a_key_given_twice_is_refused_naming_the_line(tmp_path):
    message = errors_of(tmp_path, GOOD_JOB.replace("zero_stage: 2", "zero_stage: 2\n  zero_stage: 3"))
    assert "key 'zero_stage' is given twice" in message
    assert "job.yaml" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("lr: 1e-3", 'lr: "3e-3"', "pretrain.optimizer.lr: Input should be a valid number"),
        ("lr: 1e-3", "lr: .inf", "pretrain.optimizer.lr: Input should be a finite number"),
        ("lr: 1e-3", "lr: .nan", "pretrain.optimizer.lr: Input should be a finite number"),
        ("zero_stage: 2", 'zero_stage: 2\n  steps: "20"', "pretrain.steps: Input should be a valid integer"),
        ("zero_stage: 2", "zero_stage: 2\n  steps: 1e26", "pretrain.steps: Input should be a valid integer"),
        ("zero_stage: 2", "zero_stage: 2\n  steps: 10000000000000000000000", "steps: Input should be less"),
        ("zero_stage: 2", 'zero_stage: 2\n  use_gpu: "yes"', "use_gpu: Input should be a valid boolean"),
    ],
)
def test_numbers_and_flags_are_strict_finite_and_bounded(tmp_path, old, new, expected):
    assert old in GOOD_JOB
    assert expected in errors_of(tmp_path, GOOD_JOB.replace(old, new))


def test_a_quoted_number_or_flag_that_was_once_accepted_is_told_what_to_write(tmp_path):
    message = errors_of(
        tmp_path,
        GOOD_JOB.replace("lr: 1e-3", 'lr: "3e-3"').replace(
            "zero_stage: 2", 'zero_stage: 2\n  use_gpu: "yes"'
        ),
    )
    assert (
        "pretrain.optimizer.lr: Input should be a valid number (got '3e-3'); write the number without quotes"
        in message
    )
    assert (
        "pretrain.use_gpu: Input should be a valid boolean (got 'yes'); write true or false, without quotes"
        in message
    )


def test_an_unquoted_exponent_is_a_number(tmp_path):
    config = load_config(write(tmp_path, GOOD_JOB.replace("lr: 1e-3", "lr: 3E-4")))
    assert config.pretrain.optimizer.lr == pytest.approx(3e-4)


def test_a_study_refuses_probes_of_a_target_its_points_do_not_transfer_to(tmp_path):
    job = yaml.safe_load(GOOD_JOB)
    job["pretrain"].pop("model")
    job["pretrain"]["eval"] = {"every": 10, "targets": ["corpus"]}
    job["study"] = {
        "sizes": [100],
        "models": {"ti": {"variant": "Ti/4", "width": 32, "depth": 1, "heads": 1}},
    }
    expected = "pretrain.eval.targets ['corpus']: a study's points probe only the finetune targets"
    assert expected in errors_of(tmp_path, yaml.safe_dump(job))
    job["pretrain"]["eval"].pop("targets")  # the finetune targets, which every point has
    assert load_config(write(tmp_path, yaml.safe_dump(job))).probes().targets == job["finetune"]["targets"]
