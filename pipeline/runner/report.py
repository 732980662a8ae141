"""RUN/report.md: what a person reads after a run. The transfer table first (pretrained vs scratch),
then pretraining (loss curve), the data (sample grids) and every step's status and time; the pictures
go to RUN/report/ and the markdown links them relatively, so the folder can be copied anywhere."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from pipeline.analysis.figures import PICTURES as MODEL_PICTURES
from pipeline.analysis.subjects import ANALYSIS_FILE, PRETRAINED
from pipeline.config import PretrainConfig
from pipeline.datasets.card import read_card
from pipeline.metrics import PROBES_PLOT, plot_loss, plot_probes, probe_records, read_records, resizes
from pipeline.preprocess.manifest import read_manifest
from pipeline.pretrain.plan import worker_group
from pipeline.runner.plan import JobPlan
from pipeline.runner.provenance import git_revision
from pipeline.runner.records import read_record
from pipeline.storage import write_atomic
from pipeline.study.plan import POINT_FILE
from pipeline.study.report import FIGURE, write_study_results
from pipeline.study.report import markdown_table as study_table
from pipeline.transfer.report import RESULTS_JSON, plot_results
from pipeline.transfer.report import markdown_table as transfer_table
from vit.jsonfile import read_json

PICTURES = "report"
CAPTIONS = {  # a model's analysis pictures (pipeline.analysis.figures.PICTURES) as the report names them
    "rollout": "attention rollout",
    "distance": "attention distance by depth",
    "position_embedding": "position embedding similarity",
    "filters": "embedding filters",
}


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
    if any(step.stage == "analyze" for step in plan.steps):
        sections.append(_analysis_section(plan, pictures))
    if job.pretrain is not None and job.study is None:
        sections.append(_pretrain_section(plan, job.pretrain, pictures))
    if job.datasets or job.preprocess:
        sections.append(_data_section(plan, pictures))
    sections.append(_steps_section(plan))
    write_atomic(plan.layout.report, "\n\n".join(sections) + "\n")
    return plan.layout.report


def _transfer_section(plan: JobPlan, pictures: Path) -> str:
    path = Path(plan.layout.transfer) / RESULTS_JSON
    if not path.is_file():
        return "## Transfer\n\nNo results: the finetune step has not finished."
    document = read_json(path)  # a damaged file: a ValueError naming it
    text = "## Transfer to the target datasets\n\n" + transfer_table(document).strip()
    if document["results"]:
        plot_results(document, pictures / "transfer.png")
        text += f"\n\n![transfer results]({PICTURES}/transfer.png)"
    return text + f"\n\nPer-run metrics, confusion matrices and weights: `{plan.layout.transfer}`."


def study_points_status(plan: JobPlan) -> list[dict[str, Any]]:
    """Every study point: its summary (point.json) when done, else its state and error from its record."""

    points = []
    for step in plan.steps:
        if step.stage != "study" or not step.concurrent:
            continue
        record = read_record(plan.layout.stages, step.id) or {}
        summary_file = Path(step.output) / POINT_FILE
        point = {**step.settings["point"], "point": step.item, "status": record.get("status", "not run")}
        if point["status"] == "done" and summary_file.is_file():
            point |= read_json(summary_file)
        else:
            point["error"] = record.get("error")
        points.append(point)
    return points


def _study_section(plan: JobPlan, pictures: Path) -> str:
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
        study_table(points),
    ]
    figure = Path(plan.layout.study) / FIGURE
    if document["curves"] and figure.is_file():
        shutil.copyfile(figure, pictures / FIGURE)
        text += ["", f"![transfer against pretraining images]({PICTURES}/{FIGURE})"]
    if document["answer_lines"]:
        text += [
            "",
            f"What the curves say (`answer` in study/results.json; spreads: {document['spread']}):",
            "",
            *(f"- {line}" for line in document["answer_lines"]),
        ]
    text += [
        "",
        f"Per point: pretraining run, transfer results and point.json under `{plan.layout.study}`; "
        "every point and curve in `study/results.json`.",
    ]
    return "\n".join(text)


def _analysis_section(plan: JobPlan, pictures: Path) -> str:
    """The paper's looks inside the models: one model's four pictures (the pretrained one, a study's
    largest), a table of every model's numbers, and the figures that compare them."""
    folder = Path(plan.layout.analysis)
    if not (folder / ANALYSIS_FILE).is_file():
        return "## What the model sees\n\nNo analyses: the analyze step has not finished."
    index = read_json(folder / ANALYSIS_FILE)
    models = index["models"]
    images = index["images"]
    text = [
        "## What the model sees",
        "",
        f"The paper's analyses (section 4.5) of every ViT the run trained, from its stored weights, on "
        f"up to {index['settings']['distance_images']} `{images['split']}` images of `{images['name']}`; "
        f"numbers in `{folder / ANALYSIS_FILE}`.",
    ]
    shown = next((m for m in models if m["role"] == PRETRAINED), models[0] if models else None)
    if shown is not None:
        text += ["", f"**{shown['label']}** ({shown['architecture']}):", ""]
        for key, caption in CAPTIONS.items():
            name = f"analysis-{key}.png"
            shutil.copyfile(folder / shown["folder"] / MODEL_PICTURES[key], pictures / name)
            text.append(f"![{caption}]({PICTURES}/{name})")
    for key, caption in (
        ("by_data", "attention distance by pretraining images"),
        ("by_model", "attention distance, every model"),
    ):
        if key in index["figures"]:
            shutil.copyfile(folder / index["figures"][key], pictures / index["figures"][key])
            text += ["", f"![{caption}]({PICTURES}/{index['figures'][key]})"]
    text += ["", *_analysis_table(models)]
    for entry in index["skipped"]:
        text.append(f"- {entry['model']}: not analysed ({entry['reason']})")
    for entry in index["failures"]:
        text.append(f"- {entry['model']}: FAILED: {entry['error']}")
    return "\n".join(text)


def _analysis_table(models: list[dict[str, Any]]) -> list[str]:
    """One row per model: mean attention distance of each layer (heads averaged), the distance of uniform
    attention, how alike neighbouring and far-apart position embeddings are, and its pictures."""
    rows = [
        "| model | attention distance by layer (px) | uniform (px) | posemb similarity: neighbours / far | "
        "top-3 filter PCs (variance) | pictures |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model in models:
        distance = model["attention_distance"]
        layers = ", ".join(f"{value:.1f}" for value in distance["mean_by_layer"])
        posemb = model["position_embedding"]
        similarity = (
            f"{posemb['neighbours']:.2f} / {posemb['far_apart']:.2f}" if "neighbours" in posemb else "—"
        )
        explained = ", ".join(f"{value:.0%}" for value in model["explained_variance"])
        links = " ".join(
            f"[{key}](analysis/{model['folder']}/{name})" for key, name in model["pictures"].items()
        )
        uniform = f"{distance['uniform']:.1f}"
        rows.append(f"| {model['label']} | {layers} | {uniform} | {similarity} | {explained} | {links} |")
    return rows


def _pretrain_section(plan: JobPlan, config: PretrainConfig, pictures: Path) -> str:
    records = read_records(plan.layout.pretrain)
    steps = [r for r in records if "loss" in r]
    if not steps:
        return "## Pretraining\n\nNo logged steps yet."
    last = steps[-1]
    resumes = [r["step"] for r in records if r.get("event") == "resumed"]
    rates = [r["images_per_s"] for r in steps[len(steps) // 2 :] if r.get("images_per_s")]
    started = next((r for r in records if r.get("event") == "started"), {})
    workers = f"{started['workers']} worker(s)" if "workers" in started else worker_group(config).describe()
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
    lines += ["", f"![pretraining loss]({PICTURES}/loss.png)", *_probes_lines(records, pictures)]
    lines += ["", f"Run folder: `{plan.layout.pretrain}`."]
    return "\n".join(lines)


def _probes_lines(records: list[dict[str, Any]], pictures: Path) -> list[str]:
    """The transfer measured while pretraining ran: each kind's best step and the figure against step."""
    if plot_probes(records, pictures / PROBES_PLOT) is None:
        return []
    lines = [
        "",
        "### Transfer while pretraining (few-shot probes on validation splits)",
        "",
        "| weights | probes | last step probed | last score | best step | best score |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in ("raw", "ema"):
        mine = [r for r in probe_records(records) if r["probe"] == kind]
        if mine:
            last = mine[-1]
            lines.append(
                f"| {kind} | {len(mine)} | {last['step']:,} | {last.get('score', float('nan')):.3f} | "
                f"{last.get('best_step') or 0:,} | {last.get('best_score') or float('nan'):.3f} |"
            )
    metric = next((r.get("metric") for r in reversed(records) if r.get("metric")), None)
    if metric:
        lines += ["", f"Score: {metric}."]
    return [*lines, "", f"![few-shot probes against step]({PICTURES}/{PROBES_PLOT})"]


def _data_section(plan: JobPlan, pictures: Path) -> str:
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
