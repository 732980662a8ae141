"""The analysis step: every model a run trained, analysed by its own Ray task (all submitted at once), then
RUN/analysis/analysis.json (every model's numbers, and any that failed) and the figures that compare
them: a run's models side by side, and for a study the attention distance by depth per pretraining size.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from pipeline.analysis.figures import plot_distance_by_data, plot_distance_comparison
from pipeline.analysis.subjects import ANALYSIS_FILE, FINETUNED, PRETRAINED, Subject
from pipeline.analysis.task import ImageSource, analysis_task
from pipeline.console import detail, say
from pipeline.ray_session import check_resources, connect_ray, task_error
from pipeline.storage import join, publish_folder, write_atomic

if TYPE_CHECKING:  # the analysis settings arrive as a value; nothing here loads or checks a config
    from pipeline.config import AnalyzeConfig

INDEX_FORMAT = "vitpipe.analysis-index/1"
BY_MODEL = "attention_distance_by_model.png"
BY_DATA = "attention_distance_by_data.png"


@dataclass
class AnalysisResult:
    out: str
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return self.index["failures"]

    def summary(self) -> str:
        analysed, skipped = len(self.index["models"]), len(self.index["skipped"])
        text = f"analysis: {analysed} model(s) analysed in {self.out}"
        text += f", {skipped} skipped (no attention)" if skipped else ""
        return text + (f", {len(self.failures)} FAILED" if self.failures else "")


def analyze(
    subjects: list[Subject],
    images: ImageSource,
    config: AnalyzeConfig,
    out: str,
    *,
    address: str | None = None,
) -> AnalysisResult:
    """Analyse every subject into OUT/NAME/, then write OUT/analysis.json and the comparison figures."""
    models: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    if subjects:
        connect_ray(address)
        needs = {"CPU": config.cpus_per_task, "GPU": config.gpus_per_task}
        check_resources(
            needs, "analyze: a task", "lower analyze.cpus_per_task or gpus_per_task", per_node=True
        )
        models, skipped, failures = _run_tasks(subjects, images, config, out)
    index = {
        "format": INDEX_FORMAT,
        "images": dataclasses.asdict(images),
        "settings": config.model_dump(mode="json"),
        "models": [_entry(document) for document in models],
        "skipped": skipped,
        "failures": failures,
    }
    with tempfile.TemporaryDirectory(prefix="vitpipe-analysis-") as scratch:
        staged = Path(scratch)
        index["figures"] = _comparison_figures(models, staged)
        index["by_data"] = _by_data(models)
        if index["by_data"]:
            _plot_by_data(index["by_data"], staged / BY_DATA)
            index["figures"]["by_data"] = BY_DATA
        publish_folder(staged, out)
    write_atomic(join(out, ANALYSIS_FILE), json.dumps(index, indent=1) + "\n")
    return AnalysisResult(out, index)


def _run_tasks(
    subjects: list[Subject], images: ImageSource, config: AnalyzeConfig, out: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Submit one task per subject and collect each as it ends: (analysed, skipped, failed)."""
    remote = ray.remote(analysis_task)
    pending = {
        remote.options(
            name=f"analyze:{subject.name}",
            num_cpus=config.cpus_per_task,
            num_gpus=config.gpus_per_task,
            max_retries=1,
            retry_exceptions=False,
        ).remote(subject, images, config, join(out, subject.name)): subject
        for subject in subjects
    }
    detail(f"analyze: {len(pending)} model(s) submitted, on {images.name} ({images.split})")
    started = time.perf_counter()
    models, skipped, failures = [], [], []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        subject = pending.pop(ready[0])
        elapsed = time.perf_counter() - started
        try:
            document = ray.get(ready[0])
        except ray.exceptions.RayError as error:
            message = task_error(error)
            failures.append({"model": subject.name, "weights": subject.weights, "error": message})
            say(f"analyze: {subject.name} FAILED after {elapsed:.0f}s: {message}", err=True)
            continue
        if "skipped" in document:
            skipped.append({"model": subject.name, "reason": document["skipped"]})
            continue
        models.append(document)
        means = ", ".join(f"{d:.1f}" for d in document["attention_distance"]["mean_by_layer"])
        detail(
            f"analyze: {subject.name} done after {elapsed:.0f}s; mean attention distance by layer {means} px"
        )
    order = {subject.name: index for index, subject in enumerate(subjects)}
    models.sort(key=lambda document: order[document["subject"]["name"]])
    return models, skipped, failures


def _entry(document: dict[str, Any]) -> dict[str, Any]:
    """A model's line of the index: who it is, where its folder is, and its headline numbers."""
    subject = document["subject"]
    distance = document["attention_distance"]
    return {
        **subject,
        "folder": subject["name"],
        "architecture": document["architecture"]["describe"],
        "images": document["images"]["count"],
        "attention_distance": {
            key: distance[key] for key in ("per_layer_and_head", "mean_by_layer", "uniform")
        },
        "position_embedding": {k: v for k, v in document["position_embedding"].items() if k != "similarity"},
        "explained_variance": document["embedding_filters"]["explained_variance"][:3],
        "pictures": document["pictures"],
    }


def _comparison_figures(models: list[dict[str, Any]], staged: Path) -> dict[str, str]:
    """A run's (not a study's) models' distances by depth in one figure."""
    run_models = [document for document in models if not document["subject"]["point"]]
    if len(run_models) < 2:
        return {}
    series = {
        d["subject"]["label"]: np.array(d["attention_distance"]["per_layer_and_head"]) for d in run_models
    }
    uniform = run_models[0]["attention_distance"]["uniform"]
    plot_distance_comparison(
        series, uniform, "attention distance by depth, every model of the run", staged / BY_MODEL
    )
    return {"by_model": BY_MODEL}


def _by_data(models: list[dict[str, Any]]) -> dict[str, Any]:
    """{model: {"sizes": [...], "per_layer_and_head": [...], "uniform": u}} over a study's points: each
    pretraining size's pretrained model (heads averaged over seeds), and as size 0 the model trained from
    scratch on the target. Empty for a run that is not a study."""
    grouped: dict[tuple[str, int], list[np.ndarray]] = {}
    uniform: dict[str, float] = {}
    for document in models:
        subject = document["subject"]
        point = subject["point"]
        from_scratch = subject["role"] == FINETUNED and point.get("size") == 0
        if not point or not (subject["role"] == PRETRAINED or from_scratch):
            continue
        distances = np.array(document["attention_distance"]["per_layer_and_head"])
        grouped.setdefault((point["model"], point["size"]), []).append(distances)
        uniform[point["model"]] = document["attention_distance"]["uniform"]
    out: dict[str, Any] = {}
    for (model, size), runs in sorted(grouped.items()):
        entry = out.setdefault(
            model, {"sizes": [], "seeds": [], "per_layer_and_head": [], "uniform": uniform[model]}
        )
        entry["sizes"].append(size)
        entry["seeds"].append(len(runs))
        entry["per_layer_and_head"].append(np.round(np.mean(runs, axis=0), 4).tolist())
    for entry in out.values():
        entry["lowest_layer_mean"] = [
            round(statistics.fmean(layers[0]), 4) for layers in entry["per_layer_and_head"]
        ]
    return out


def _plot_by_data(by_data: dict[str, Any], out: Path) -> None:
    curves = {
        model: {
            ("scratch" if size == 0 else f"{size:,} images"): np.array(distances)
            for size, distances in zip(entry["sizes"], entry["per_layer_and_head"], strict=True)
        }
        for model, entry in by_data.items()
    }
    plot_distance_by_data(curves, {model: entry["uniform"] for model, entry in by_data.items()}, out)
