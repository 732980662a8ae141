"""A sweep's finished rates are kept across commands: each member's result.json holds the key of what
defines that one run, so adding a rate to `lr_sweep` trains only that rate, while a changed recipe or a
forced redo trains every rate again. Tiny: a one-block ViT, two steps a rate on digits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import EvaluateConfig, FinetuneConfig
from pipeline.metrics import read_records
from pipeline.runner.execute import run_job
from pipeline.runner.plan import RunOptions
from pipeline.transfer.launch import transfer
from pipeline.transfer.plan import plan_transfer
from vit.config import ViTConfig
from vit.model import VisionTransformer
from vit.weights import save_pretrained

TINY = ViTConfig(
    image_size=16, patch_size=4, channels=3, num_classes=10, width=32, depth=1, heads=2, mlp_dim=64
)
SECTION = {"targets": ["digits"], "modes": ["pretrained"], "steps": 2, "batch_size": 32, "flip": False}
EVALUATE = {"shots": [1], "seeds": 1}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_pretrained(VisionTransformer(TINY), tmp_path_factory.mktemp("weights") / "tiny")


def fine_tune(weights: Path, digits: str, out: Path, *, reuse: bool = True, **changes: Any) -> dict[str, Any]:
    """One fine-tuning command's results.json (its only result: digits in mode pretrained)."""
    section = FinetuneConfig(**{**SECTION, **changes})
    plan = plan_transfer(
        section, EvaluateConfig(**EVALUATE), {"digits": digits}, out=str(out), weights=str(weights)
    )
    return transfer(plan, reuse=reuse).document["results"][0]


def written(group: Path) -> dict[float, tuple[int, int]]:
    """Each member's result.json modification time and the times its task started, by rate."""
    members = {}
    for path in sorted(group.glob("lr-*/result.json")):
        started = [r for r in read_records(str(path.parent)) if r.get("event") == "started"]
        members[json.loads(path.read_text())["lr"]] = (path.stat().st_mtime_ns, len(started))
    return members


def without_reused(sweep: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in entry.items() if key != "reused"} for entry in sweep]


def test_adding_a_rate_to_the_sweep_trains_only_the_new_rate(ray_local, weights, digits_patches, tmp_path):
    out = tmp_path / "out"
    group = out / "digits" / "pretrained"
    first = fine_tune(weights, digits_patches, out, lr_sweep=[0.01, 0.03])
    before = written(group)
    kept = {lr: (group / f"lr-{lr:g}" / "result.json").read_text() for lr in (0.01, 0.03)}

    second = fine_tune(weights, digits_patches, out, lr_sweep=[0.01, 0.03, 0.1])
    assert [(e["lr"], e["reused"]) for e in second["lr_sweep"]] == [(0.01, True), (0.03, True), (0.1, False)]
    after = written(group)
    assert {lr: after[lr] for lr in (0.01, 0.03)} == before  # not rewritten, not started again
    assert after[0.1][1] == 1
    assert {lr: (group / f"lr-{lr:g}" / "result.json").read_text() for lr in (0.01, 0.03)} == kept
    assert without_reused(second["lr_sweep"][:2]) == without_reused(first["lr_sweep"])
    assert second["fewshot"] == first["fewshot"]  # probed once, by the lowest rate, kept with it
    if second["lr"] != 0.1:
        assert (second["top1"], second["weights"]) == (first["top1"], first["weights"])


def test_a_changed_recipe_or_a_forced_redo_trains_every_rate_again(
    ray_local, weights, digits_patches, tmp_path
):
    out = tmp_path / "out"
    group = out / "digits" / "pretrained"
    fine_tune(weights, digits_patches, out, lr_sweep=[0.01, 0.03])
    first = written(group)

    longer = fine_tune(weights, digits_patches, out, lr_sweep=[0.01, 0.03], steps=3)
    assert [e["reused"] for e in longer["lr_sweep"]] == [False, False]
    assert longer["steps"] == 3
    second = written(group)
    assert all(second[lr][0] > first[lr][0] for lr in (0.01, 0.03))

    forced = fine_tune(weights, digits_patches, out, reuse=False, lr_sweep=[0.01, 0.03], steps=3)
    assert [e["reused"] for e in forced["lr_sweep"]] == [False, False]
    assert all(written(group)[lr][0] > second[lr][0] for lr in (0.01, 0.03))


def test_a_job_whose_sweep_grows_trains_the_new_rate_and_force_trains_all(
    ray_local, weights, digits_patches, tmp_path
):
    """Through `vitpipe run`: the finetune step's key changes with its sweep, and the step is redone
    keeping its finished rates; `--force finetune` keeps none."""
    path = tmp_path / "job.yaml"
    group = tmp_path / "run" / "transfer" / "digits" / "pretrained"

    def run(rates: list[float], *force: str) -> None:
        finetune = {**SECTION, "targets": [digits_patches], "weights": str(weights), "lr_sweep": rates}
        job = {"name": "reuse", "run_dir": str(tmp_path / "run"), "finetune": finetune, "evaluate": EVALUATE}
        path.write_text(yaml.safe_dump(job))
        assert not run_job(path, options=RunOptions(force=force, until="finetune")).failed

    run([0.01, 0.03])
    first = written(group)
    run([0.01, 0.03, 0.1])
    second = written(group)
    assert {lr: second[lr] for lr in (0.01, 0.03)} == first
    assert sorted(second) == [0.01, 0.03, 0.1]
    run([0.01, 0.03, 0.1], "finetune")
    assert all(written(group)[lr][0] > second[lr][0] for lr in second)
