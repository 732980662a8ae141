"""The study of transfer against pretraining data: nested subsets, the plan of its points, and
`jobs/scaling_smoke.yaml` end to end through the real CLI on the session's Ray (a point's failure kept
apart from the others, a rerun redoing only what is missing, then fully cached)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml

from pipeline.config import ConfigError
from pipeline.metrics import read_records
from pipeline.preprocess.manifest import patch_files
from pipeline.runner.plan import load_plan
from pipeline.study.plan import SCRATCH, Point
from pipeline.study.subsets import draw_subsets, read_subset
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
    assert ids[:5] == ["datasets:fractals", "datasets:digits", "preprocess:fractals", "preprocess:digits",
                       "study:subsets"]  # fmt: skip
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


def assert_hf_bit_export_agrees(vitpipe_folder: Path, hf_folder: Path) -> None:
    from transformers import BitForImageClassification

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
        torch.testing.assert_close(logits, theirs.eval()(pixel_values=pixels.permute(0, 3, 1, 2)).logits,
                                   atol=1e-4, rtol=0)  # fmt: skip


def run_smoke(run: Path) -> subprocess.CompletedProcess[str]:
    address = ray.get_runtime_context().gcs_address
    command = [*VITPIPE, "run", str(SMOKE), "--run-dir", str(run), "--address", address]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def statuses(run: Path) -> dict[str, str]:
    return {step["step"]: step["status"] for step in json.loads((run / "run.json").read_text())["steps"]}


@pytest.mark.slow
def test_scaling_smoke_runs_every_point_keeps_a_failed_one_apart_and_reruns_only_what_is_missing(
    ray_local, tmp_path
):
    run = tmp_path / "run"
    # A file vitpipe did not write where one point's transfer results go: that point fails, and only it.
    blocked = run / "study" / "n0000000100-vit-seed0" / "transfer" / "digits" / "pretrained"
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("someone else's")

    first = run_smoke(run)
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
    assert results["curves"]["digits"]["finetune top-1"]["bit"][0]["size"] == 0  # the scratch row
    assert [e["size"] for e in results["curves"]["digits"]["finetune top-1"]["bit"]] == [0, 100, 400]
    assert [e["size"] for e in results["curves"]["digits"]["5-shot linear"]["vit"]] == [0, 400]
    report = (run / "report.md").read_text()
    assert "| 400 | bit | 0 |" in report
    assert "![transfer against pretraining images](report/transfer_vs_data.png)" in report
    assert (run / "report" / "transfer_vs_data.png").stat().st_size > 20_000

    # Each point pretrained on its own nested subset with its own Ray Train + DeepSpeed run.
    small = read_subset(str(run / "study" / "subsets" / "n0000000100.json"))
    large = read_subset(str(run / "study" / "subsets" / "n0000000400.json"))
    assert drawn_rows(small) < drawn_rows(large)
    bit = by_name["n0000000100-bit-seed0"]
    assert (bit["steps"], bit["images_seen"], bit["params"]) == (16, 16 * 32, bit["params"])
    assert bit["architecture"] == "BiT R26x1, base width 8"
    losses = [r["loss"] for r in read_records(bit["run"]) if "loss" in r]
    assert losses[-1] < losses[0] - 0.2, losses  # BiT learns on the fractals
    # Its fine-tuning started from the exported BiT weights, given a new 10-class head.
    exported = load_pretrained(bit["weights"], num_classes=10)
    assert type(exported).__name__ == "ResNetV2"
    assert bit["results"][0]["start_weights"] == state_digest(exported)
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
    second = run_smoke(run)
    assert second.returncode == 0, second.stderr[-3000:]
    status = statuses(run)
    assert status["study:n0000000100-vit-seed0"] == "resumed"  # its record: failed, with this key
    cached = {step for step, state in status.items() if state == "cached"}
    others = ["n0000000400-vit-seed0", "n0000000400-bit-seed0", "n0000000100-bit-seed0", "scratch-vit-seed0",
              "scratch-bit-seed0", "subsets"]  # fmt: skip
    assert cached >= {f"study:{name}" for name in others}
    # Its pretraining had finished: the rerun resumed it at its last step instead of training again.
    resumed = [r for r in read_records(str(run / "study" / "n0000000100-vit-seed0" / "pretrain"))
               if r.get("event") == "resumed"]  # fmt: skip
    assert [r["step"] for r in resumed] == [16]

    third = run_smoke(run)
    assert third.returncode == 0
    assert set(statuses(run).values()) == {"cached"}
