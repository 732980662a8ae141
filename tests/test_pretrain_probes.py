"""Few-shot probes while pretraining runs (`pretrain.eval`): the plan refuses what cannot be probed before
Ray, naming the target and the key; the Prober actor scores validation rows held out of each target's
training split (never its test split), exactly as `vit.fewshot` does on the same draws, and keeps the
best-scored weights of each kind in RUN/best/KIND across a resumed run."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from pipeline.config import EvaluateConfig
from pipeline.config.pretrain import ProbeSection
from pipeline.preprocess.manifest import MANIFEST_FILE, read_manifest
from pipeline.pretrain.probes import BEST_RESET, ProbePlan, Prober, plan_probes, score_name, start_prober
from pipeline.transfer.data import VALIDATION_BYTES, SplitReader, holdout
from pipeline.transfer.plan import TargetError
from vit.config import ViTConfig
from vit.evaluate import extract_features
from vit.fewshot import fewshot_accuracy, sample_shots
from vit.model import VisionTransformer
from vit.weights import load_pretrained, save_pretrained

# The pretrained model: 16px images in 4px patches; the digits targets are 32px, so every probe resamples
# its position embeddings.
TINY = ViTConfig(
    image_size=16, patch_size=4, channels=3, num_classes=10, width=32, depth=1, heads=2, mlp_dim=64
)
SECTION = ProbeSection(every=10, shots=(1, 5, 10), seeds=2, batch_size=64)


def _rewrite_split(source: str, out: Path, split: str, change: Callable[[pa.Table], pa.Table]) -> str:
    """A copy of a patch directory with every file of one split rewritten by `change`."""
    shutil.copytree(source, out)
    manifest = read_manifest(str(out))
    kept = 0
    for name in manifest["splits"][split]["files"]:
        table = change(pq.read_table(out / name))
        pq.write_table(table, out / name)
        kept += table.num_rows
    manifest["splits"][split]["samples"] = kept
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return str(out)


def _keep_per_class(count: int) -> Callable[[pa.Table], pa.Table]:
    seen: dict[int, int] = {}

    def keep(table: pa.Table) -> pa.Table:
        mask = []
        for label in table.column("label").to_pylist():
            seen[label] = seen.get(label, 0) + 1
            mask.append(seen[label] <= count)
        return table.filter(mask)

    return keep


def _shift_labels(table: pa.Table) -> pa.Table:
    """Every label one class on: a test split that disagrees with the training split everywhere."""
    labels = table.column("label").to_numpy()
    shifted = pa.array((labels + 1) % 10, type=table.schema.field("label").type)
    return table.set_column(table.schema.get_field_index("label"), "label", shifted)


@pytest.fixture(scope="module")
def targets(digits_patches, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("probe-targets")
    return {
        "shifted": _rewrite_split(digits_patches, root / "shifted", "test", _shift_labels),
        "few": _rewrite_split(digits_patches, root / "few", "train", _keep_per_class(6)),
        "one-each": _rewrite_split(digits_patches, root / "one-each", "train", _keep_per_class(1)),
    }


@pytest.fixture(scope="module")
def plan(targets) -> ProbePlan:
    return plan_probes(SECTION, {name: targets[name] for name in ("shifted", "few")}, None, TINY)


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {name: tensor.clone() for name, tensor in VisionTransformer(TINY).state_dict().items()}


# --- the plan: every check before Ray ---------------------------------------------------------------


def test_shot_counts_a_class_lacks_after_the_hold_out_are_skipped_and_the_largest_common_one_selects(plan):
    shifted, few = plan.targets
    assert (shifted.shots, shifted.skipped) == ((1, 5, 10), {})
    assert few.shots == (1, 5)  # 6 images of each class, one held out: 5 left
    assert few.skipped == {
        10: "class '0' has 5 training image(s) left after the validation hold-out, fewer than 10"
    }
    assert (few.validation_images, plan.select_shots, plan.seeds) == (10, 5, (0, 1))


def test_a_select_shots_some_target_cannot_be_probed_at_is_refused_naming_both(targets):
    section = SECTION.model_copy(update={"select_shots": 10})
    with pytest.raises(
        TargetError, match=r"eval.select_shots 10: target 'few' cannot be probed 10-shot: class"
    ):
        plan_probes(section, {"few": targets["few"]}, None, TINY)


def test_a_target_without_a_validation_split_is_refused_naming_it_and_the_fraction(targets):
    with pytest.raises(TargetError) as refused:
        plan_probes(SECTION, {"one-each": targets["one-each"]}, None, TINY)
    assert str(refused.value).startswith(
        "eval.val_fraction 0.1: target 'one-each' keeps no validation image of its 10 training images"
    )


def test_a_target_the_model_does_not_fit_is_refused_naming_it_and_the_key(digits_patches):
    with pytest.raises(TargetError) as refused:
        plan_probes(SECTION, {"digits": digits_patches}, None, TINY.replace(patch_size=8))
    assert str(refused.value).startswith("eval.targets: target 'digits': ")
    assert "does not fit the model of pretrain.model: patch_size 4 in the data, 8 in the model" in str(
        refused.value
    )


def test_unset_shots_seeds_and_l2_come_from_the_evaluate_section(digits_patches):
    evaluate = EvaluateConfig(shots=(2, 3), seeds=1, l2_regularization=0.5)
    plan = plan_probes(ProbeSection(every=5), {"digits": digits_patches}, evaluate, TINY, seed=7)
    assert (plan.shots, plan.seeds, plan.l2, plan.select_shots, plan.holdout_seed) == (
        (2, 3),
        (7,),
        0.5,
        3,
        7,
    )


def test_the_probe_key_changes_with_what_makes_scores_comparable_and_only_with_it(plan, targets):
    chosen = {name: targets[name] for name in ("shifted", "few")}
    assert plan_probes(SECTION, chosen, None, TINY).key == plan.key
    operational = SECTION.model_copy(update={"every": 99, "batch_size": 7, "cpus": 2.0})
    assert plan_probes(operational, chosen, None, TINY).key == plan.key
    for change in ({"shots": (1, 5)}, {"seeds": 3}, {"l2_regularization": 2.0}, {"val_fraction": 0.2}):
        assert plan_probes(SECTION.model_copy(update=change), chosen, None, TINY).key != plan.key, change
    assert plan_probes(SECTION.model_copy(update={"select_shots": 1}), chosen, None, TINY).key != plan.key
    assert plan_probes(SECTION, {"shifted": targets["shifted"]}, None, TINY).key != plan.key


# --- the actor ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_probe(plan, tmp_path_factory):
    """A prober's record of one random-init state: (prober, record, state)."""
    prober = start_prober(plan, str(tmp_path_factory.mktemp("probed-run")))
    state = tiny_state(0)
    record = ray.get(prober.probe.remote(10, 320, "raw", state))
    yield prober, record, state
    ray.kill(prober)


def direct_fewshot(
    directory: str, weights: Path, shots: int, seeds: tuple[int, ...], scored_on: str
) -> float:
    """vit.fewshot's accuracy, averaged over the seeds, of the few-shot draws the probes take (from the
    training rows left after the hold-out), scored on the hold-out ("validation") or the test split."""
    train = SplitReader(directory, "train")
    labels = train.labels()
    held_out = holdout(labels, 0.1, 0, VALIDATION_BYTES // train.geometry.sample_bytes)
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    model = load_pretrained(weights, image_size=32)  # transfer's probe of a folder
    if scored_on == "validation":
        eval_features, eval_labels = extract_features(model, train.take(held_out, 64), torch.device("cpu"))
    else:
        test = SplitReader(directory, "test").batches(64)
        eval_features, eval_labels = extract_features(model, test, torch.device("cpu"))
    accuracies = []
    for seed in seeds:
        drawn = rest[sample_shots(labels[rest], 10, shots, seed)]
        features, drawn_labels = extract_features(model, train.take(drawn, 64), torch.device("cpu"))
        accuracies.append(fewshot_accuracy(features, drawn_labels, eval_features, eval_labels, 10, 1.0))
    return float(np.mean(accuracies))


@pytest.fixture(scope="module")
def saved_state(first_probe, tmp_path_factory) -> Path:
    model = VisionTransformer(TINY)
    model.load_state_dict(first_probe[2])
    return save_pretrained(model, tmp_path_factory.mktemp("weights") / "state")


def test_the_probe_record_is_vit_fewshot_on_the_same_draws_and_validation_rows(
    first_probe, targets, saved_state
):
    _, record, _ = first_probe
    for shots in (1, 5, 10):
        expected = direct_fewshot(targets["shifted"], saved_state, shots, (0, 1), "validation")
        assert record[score_name("shifted", shots)] == pytest.approx(expected, abs=1e-9), shots
    assert record["score"] == pytest.approx(
        (record[score_name("shifted", 5)] + record[score_name("few", 5)]) / 2
    )


def test_probes_are_scored_on_the_validation_split_never_the_test_split(first_probe, targets, saved_state):
    """The target's test labels are all wrong: scored on test, its 10-shot accuracy would be near zero."""
    _, record, _ = first_probe
    on_test = direct_fewshot(targets["shifted"], saved_state, 10, (0, 1), "test")
    on_validation = direct_fewshot(targets["shifted"], saved_state, 10, (0, 1), "validation")
    assert on_validation > on_test + 0.2
    assert record[score_name("shifted", 10)] == pytest.approx(on_validation, abs=1e-9)


def test_a_record_is_flat_and_names_the_shot_counts_it_skipped(first_probe):
    _, record, _ = first_probe
    assert (record["probe"], record["step"], record["images_seen"]) == ("raw", 10, 320)
    assert score_name("few", 10) not in record
    assert score_name("few", 10) + "_std" not in record
    assert {score_name("few", 5), score_name("few", 5) + "_std", score_name("shifted", 10)} <= set(record)
    assert record["skipped"] == ["few/10shot"]
    assert (record["best_step"], record["best_score"]) == (10, record["score"])  # the first is the best
    assert all(not isinstance(value, dict) for value in record.values())


def test_a_cpu_prober_takes_its_cpus_threads_at_a_lower_priority_than_other_ray_work(plan, tmp_path):
    """Even where the environment asks OpenMP for more threads (Ray leaves a set OMP_NUM_THREADS as it is)."""
    env = {"env_vars": {"OMP_NUM_THREADS": "4"}}
    prober = ray.remote(Prober).options(num_cpus=plan.cpus, runtime_env=env).remote(plan, str(tmp_path))
    pid, threads = ray.get(prober.__ray_call__.remote(lambda _: (os.getpid(), torch.get_num_threads())))
    other = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).options(num_cpus=0).remote())
    assert threads == 1  # SECTION.cpus
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, other + 10)
    ray.kill(prober)


def probe(prober, step: int, state: dict[str, torch.Tensor], kind: str = "raw") -> dict:
    return ray.get(prober.probe.remote(step, step * 32, kind, state))


def assert_best_weights(run: Path, state: dict[str, torch.Tensor], step: int) -> None:
    """best.json names the step and the folder of its weights, the only step folder left."""
    record = json.loads((run / "best" / "raw" / "best.json").read_text())
    assert (record["step"], record["folder"]) == (step, f"step-{step:08d}")
    assert sorted(p.name for p in (run / "best" / "raw").glob("step-*")) == [record["folder"]]
    loaded = load_pretrained(run / "best" / "raw" / record["folder"]).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], state[name]) for name in state)


def test_the_best_step_s_weights_are_kept_and_a_resumed_run_keeps_them(plan, targets, tmp_path):
    run = tmp_path / "run"
    good, zero = tiny_state(0), {name: torch.zeros_like(t) for name, t in tiny_state(0).items()}
    prober = start_prober(plan, str(run))
    first = probe(prober, 10, zero)  # constant features: about chance
    better = probe(prober, 20, good)
    assert better["score"] > first["score"]
    assert (better["best_step"], better["best_score"]) == (20, better["score"])
    assert_best_weights(run, good, 20)
    worse = probe(prober, 30, zero)
    assert (worse["best_step"], worse["best_score"]) == (20, better["score"])
    assert_best_weights(run, good, 20)
    assert ray.get(prober.history.remote()) == [first, better, worse]
    ray.kill(prober)

    resumed = start_prober(plan, str(run))
    assert ray.get(resumed.best.remote("raw"))["step"] == 20
    again = probe(resumed, 40, zero)
    assert (again["best_step"], "note" in again) == (20, False)
    assert ray.get(resumed.best.remote("ema")) is None  # each kind its own best
    ray.kill(resumed)

    changed = plan_probes(SECTION.model_copy(update={"seeds": 1}), {"few": targets["few"]}, None, TINY)
    reset = start_prober(changed, str(run))
    fresh = probe(reset, 50, zero)
    assert fresh["note"].startswith(
        f"{BEST_RESET} (the best of step 20 was scored under probe key {plan.key}"
    )
    assert fresh["best_step"] == 50  # a worse state than step 20's, but those scores are not comparable
    assert json.loads((run / "best" / "raw" / "best.json").read_text())["probe_key"] == changed.key
    assert "note" not in probe(reset, 60, zero)  # said once
    ray.kill(reset)


@pytest.mark.parametrize(
    ("stage", "bf16", "traced"),
    [(2, False, True), (0, True, True), (2, True, False), (3, False, False)],
)
def test_a_probe_step_is_traced_to_the_engines_own_weights_only_where_its_module_holds_them(
    stage, bf16, traced, one_rank_group
):
    """The digest a raw probe record carries is the engine module's backbone where that module holds the
    fp32 weights an export holds (fp32 training, or ZeRO-0's fp32 weights under autocast); under bf16
    ZeRO >= 1 it holds bf16 copies, under ZeRO-3 a shard: no digest, rather than one no export matches."""
    from pipeline.pretrain.worker import _engine_backbone  # noqa: PLC0415  (DeepSpeed on import)
    from vit.engine import build_engine  # noqa: PLC0415
    from vit.recipe import BatchSplit, Optimizer, Recipe, Schedule, Zero  # noqa: PLC0415
    from vit.weights import adapted_model, backbone_digest  # noqa: PLC0415

    torch.manual_seed(0)
    tiny = ViTConfig(image_size=16, patch_size=4, num_classes=5, width=32, depth=1, heads=2, mlp_dim=64)
    recipe = Recipe(
        Optimizer(lr=1e-3), Schedule(warmup_steps=0), total_steps=1, batch=BatchSplit(4, 4), bf16=bf16
    )
    model = VisionTransformer(tiny)
    expected, state = backbone_digest(model), {k: v.clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, recipe, Zero(stage), world_size=1)
    assert _engine_backbone(engine) == (expected if traced else None)
    # A target's model adapted from those weights (a new head, 3 classes) has the same backbone digest.
    adapted = adapted_model(state, tiny, "test", num_classes=3)
    assert backbone_digest(adapted) == expected
