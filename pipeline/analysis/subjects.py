"""Which models a run trained, found from what its steps wrote: the pretraining export, the weights each
(target, mode) chose, and for a study every point's export and chosen weights. Each is a `Subject`: its
weights, its folder under RUN/analysis and how the report names it."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.storage import join, read_json

PRETRAINED, FINETUNED = "pretrained", "fine-tuned"
ANALYSIS_FILE = "analysis.json"  # a model's numbers in its folder; the index of them all in RUN/analysis


@dataclass(frozen=True)
class Subject:
    """One trained model to analyse."""

    name: (
        str  # its folder in RUN/analysis: `pretrained`, `digits-scratch`, `n0000000100-vit-seed0/pretrained`
    )
    label: str  # how tables and figures name it
    weights: str  # a vitpipe (or HF) weights folder
    role: str  # PRETRAINED (the upstream export) or FINETUNED (a target's chosen weights)
    point: dict[str, Any] = field(default_factory=dict)  # a study point's size, model and seed


def run_subjects(pretrain_export: str | None, transfer_out: str | None) -> list[Subject]:
    """A run's models: its pretraining export (if it pretrained) and every fine-tuned (target, mode)."""
    subjects = []
    if pretrain_export is not None:
        subjects.append(Subject(PRETRAINED, "pretrained", pretrain_export, PRETRAINED))
    if transfer_out is not None:
        results = _read_json(join(transfer_out, "results.json")).get("results", [])
        subjects += _finetuned(results, "", transfer_out)
    return subjects


def study_subjects(points: list[tuple[str, str]], vit_models: set[str]) -> list[Subject]:
    """The models of `points`, `(point name, folder)`, those of `vit_models` only (a BiT ResNet has no
    attention to look at). The caller gives finished points (their records say done): a point.json that
    an earlier run left is no proof that this run's point finished."""
    subjects = []
    for name, folder in points:
        summary = _read_json(join(folder, "point.json"))
        if not summary or summary.get("model") not in vit_models:
            continue
        point = {key: summary[key] for key in ("size", "model", "seed")}
        if summary.get("weights"):
            label, weights = f"{name} pretrained", moved(summary["weights"], f"/{name}/", folder)
            subjects.append(Subject(f"{name}/{PRETRAINED}", label, weights, PRETRAINED, point))
        subjects += _finetuned(summary.get("results", []), name, join(folder, "transfer"), point)
    return subjects


def _finetuned(
    results: list[dict[str, Any]], prefix: str, transfer_out: str, point: dict[str, Any] | None = None
) -> list[Subject]:
    subjects = []
    for result in results:
        if not result.get("weights"):
            continue
        target, mode = result["target"], result["mode"]
        folder = f"{target}-{mode}"
        name = posixpath.join(prefix, folder) if prefix else folder
        label = f"{prefix + ' ' if prefix else ''}{target} fine-tuned ({mode})"
        weights = moved(result["weights"], f"/{target}/{mode}/", join(transfer_out, target, mode))
        subjects.append(Subject(name, label, weights, FINETUNED, point or {}))
    return subjects


def moved(recorded: str, marker: str, now: str) -> str:
    """A local path an earlier command recorded (`OLD/.../digits/pretrained/lr-0.03/model`), read where its
    folder (the one `marker` ends) is `now` when it is there (the run folder moved or was copied since);
    else as recorded."""
    _, found, tail = recorded.rpartition(marker)
    if "://" in recorded or not found:
        return recorded
    here = join(now, tail)
    return here if Path(here).exists() else recorded  # a copy's own models, not those of its original


def _read_json(location: str) -> dict[str, Any]:
    """A JSON file's content, or {} when there is none (a step that wrote nothing yet)."""
    return read_json(location) or {}
