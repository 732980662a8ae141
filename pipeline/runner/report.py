"""RUN/report.md: what a person reads after a run. The transfer table first (pretrained vs scratch),
then pretraining (loss curve), the data (sample grids) and every step's status and time; the pictures
go to RUN/report/ and the markdown links them relatively, so the folder can be copied anywhere."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from pipeline.config import PretrainConfig
from pipeline.runner.plan import JobPlan
from pipeline.runner.provenance import git_revision
from pipeline.runner.records import read_record
from pipeline.storage import write_atomic

PICTURES = "report"


def write_report(plan: JobPlan) -> str:
    """Write RUN/report.md and its pictures from what the run's steps left; returns the report's path."""
    root = Path(plan.layout.root)
    pictures = root / PICTURES
    pictures.mkdir(parents=True, exist_ok=True)
    job = plan.job
    git = git_revision()
    revision = f"{git['rev'][:12]}{' (uncommitted changes)' if git['dirty'] else ''}" if git else "unknown"
    written = time.strftime("%Y-%m-%d %H:%M %Z")
    sections = [
        f"# {job.name}\n\nJob `{plan.source}` (config hash `{job.digest()}`), code {revision}, "
        f"written {written}."
    ]
    if job.study is not None:
        sections.append(_study_section(plan, pictures))
    elif job.finetune is not None:
        sections.append(_transfer_section(plan, pictures))
    if job.pretrain is not None and job.study is None:
        sections.append(_pretrain_section(plan, job.pretrain, pictures))
    if job.datasets or job.preprocess:
        sections.append(_data_section(plan, pictures))
    sections.append(_steps_section(plan))
    write_atomic(plan.layout.report, "\n\n".join(sections) + "\n")
    return plan.layout.report


def _transfer_section(plan: JobPlan, pictures: Path) -> str:
    import json

    from pipeline.transfer.report import RESULTS_JSON, markdown_table, plot_results

    path = Path(plan.layout.transfer) / RESULTS_JSON
    if not path.is_file():
        return "## Transfer\n\nNo results: the finetune step has not finished."
    document = json.loads(path.read_text())
    text = "## Transfer to the target datasets\n\n" + markdown_table(document).strip()
    if document["results"]:
        plot_results(document, pictures / "transfer.png")
        text += f"\n\n![transfer results]({PICTURES}/transfer.png)"
    return text + f"\n\nPer-run metrics, confusion matrices and weights: `{plan.layout.transfer}`."


def study_points_status(plan: JobPlan) -> list[dict[str, Any]]:
    """Every study point: its summary (point.json) when done, else its state and error from its record."""
    import json

    from pipeline.study.launch import POINT_FILE

    points = []
    for step in plan.steps:
        if step.stage != "study" or not step.concurrent:
            continue
        record = read_record(plan.layout.stages, step.id) or {}
        summary_file = Path(step.output) / POINT_FILE
        point = {**step.settings["point"], "point": step.item, "status": record.get("status", "not run")}
        if point["status"] == "done" and summary_file.is_file():
            point |= json.loads(summary_file.read_text())
        else:
            point["error"] = record.get("error")
        points.append(point)
    return points


def _study_section(plan: JobPlan, pictures: Path) -> str:
    from pipeline.study.report import FIGURE, markdown_table, write_study_results

    study = plan.job.study
    points = study_points_status(plan)
    settings = study.model_dump(mode="json") if study is not None else {}
    document = write_study_results(points, Path(plan.layout.study), settings)
    done = sum(1 for point in points if point["status"] == "done")
    text = [
        "## Transfer against pretraining data",
        "",
        f"{done} of {len(points)} points finished. Accuracy (%) of each, fine-tuned and few-shot linear:",
        "",
        markdown_table(points),
    ]
    figure = Path(plan.layout.study) / FIGURE
    if document["curves"] and figure.is_file():
        shutil.copyfile(figure, pictures / FIGURE)
        text += ["", f"![transfer against pretraining images]({PICTURES}/{FIGURE})"]
    text += ["", f"Per point: pretraining run, transfer results and point.json under `{plan.layout.study}`; "
             "every point and curve in `study/results.json`."]  # fmt: skip
    return "\n".join(text)


def _pretrain_section(plan: JobPlan, config: PretrainConfig, pictures: Path) -> str:
    from pipeline.metrics import plot_loss, read_records, resizes

    records = read_records(plan.layout.pretrain)
    steps = [r for r in records if "loss" in r]
    if not steps:
        return "## Pretraining\n\nNo logged steps yet."
    last = steps[-1]
    resumes = [r["step"] for r in records if r.get("event") == "resumed"]
    rates = [r["images_per_s"] for r in steps[len(steps) // 2 :] if r.get("images_per_s")]
    started = next((r for r in records if r.get("event") == "started"), {})
    workers = f"{started['workers']} worker(s)" if "workers" in started else config.describe_workers()
    resized = resizes(records)
    lines = [
        "## Pretraining",
        "",
        f"{config.model.label} {config.model.describe()} on `{config.data}`, "
        f"{workers} on {started.get('nodes', '?')} node(s), DeepSpeed ZeRO-{config.zero_stage}, "
        f"global batch {config.global_batch_size}." + (f" Elastic: {resized}." if resized else ""),
        "",
        "| step | loss | accuracy | images/s (median, second half) | resumed at |",
        "| --- | --- | --- | --- | --- |",
        f"| {last['step']:,} | {last['loss']:.3f} | {last.get('accuracy', float('nan')):.3f} | "
        f"{statistics.median(rates) if rates else float('nan'):,.0f} | "
        f"{', '.join(f'{s:,}' for s in resumes) or '—'} |",
    ]
    plot_loss(records, pictures / "loss.png")
    lines += ["", f"![pretraining loss]({PICTURES}/loss.png)", "", f"Run folder: `{plan.layout.pretrain}`."]
    return "\n".join(lines)


def _data_section(plan: JobPlan, pictures: Path) -> str:
    from pipeline.datasets.card import read_card
    from pipeline.preprocess.manifest import read_manifest

    lines = ["## Data", ""]
    rows = ["| dataset | classes | samples per split |", "| --- | --- | --- |"]
    for name in plan.job.datasets:
        try:
            card = read_card(plan.layout.dataset(name))
        except (FileNotFoundError, ValueError):
            continue
        splits = ", ".join(f"{split} {entry['samples']:,}" for split, entry in card["splits"].items())
        rows.append(f"| {name} | {len(card.get('classes') or [])} | {splits} |")
    lines += [*rows, ""]
    rows = [
        "| patches | image | patch | samples | failed |",
        "| --- | --- | --- | --- | --- |",
    ]
    grids = []
    for name in plan.job.preprocess:
        folder = Path(plan.layout.patches(name))
        try:
            manifest = read_manifest(str(folder))
        except (FileNotFoundError, ValueError):
            continue
        geometry, totals = manifest["patches"], manifest["totals"]
        rows.append(
            f"| {name} | {geometry['image_size']} px, {geometry['channels']} ch | "
            f"{geometry['patch_size']} px | {totals['samples']:,} | {totals['failed']:,} |"
        )
        if (folder / "samples.png").is_file():
            shutil.copyfile(folder / "samples.png", pictures / f"samples-{name}.png")
            grids.append(f"![{name} samples]({PICTURES}/samples-{name}.png)")
    lines += rows
    if grids:
        lines += ["", "Samples as the model sees them (rebuilt from the patch tensors):", "", *grids]
    return "\n".join(lines)


def _steps_section(plan: JobPlan) -> str:
    lines = ["## Steps", "", "| step | status | finished | time | key |", "| --- | --- | --- | --- | --- |"]
    for step in plan.steps:
        if step.stage == "report":
            continue
        record: dict[str, Any] = read_record(plan.layout.stages, step.id) or {}
        seconds = record.get("seconds")
        lines.append(
            f"| {step.id} | {record.get('status', 'not run')} | {record.get('finished', '—')} | "
            f"{f'{seconds:.1f} s' if seconds is not None else '—'} | `{record.get('key', '—')}` |"
        )
    lines += ["", f"Logs: `{plan.layout.logs}`; step records: `{plan.layout.stages}`."]
    return "\n".join(lines)
