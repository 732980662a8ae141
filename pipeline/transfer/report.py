"""The transfer results as a person reads them: `results.json`, a `results.md` table, a bar chart, and a
confusion-matrix picture per fine-tuned model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.figures import saved_figure

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PLOT = "results.png"
FORMAT = "vitpipe.transfer/1"
HEADLINE_SHOTS = 10  # the paper's headline few-shot number


def results_excerpt(folder: str, blocks: int | None = None) -> str | None:
    """The first `blocks` paragraphs (or all) of the results table in `folder`, a local one; None when
    there is none (nothing finished, or the folder is remote)."""
    results = Path(folder) / RESULTS_MD
    if "://" in folder or not results.is_file():
        return None
    return "\n\n".join(results.read_text().strip().split("\n\n")[:blocks])


def headline_shots(shots: list[int]) -> int:
    """The few-shot count the summary table shows: 10 when evaluated, else the largest."""
    return HEADLINE_SHOTS if HEADLINE_SHOTS in shots else max(shots)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _fewshot_cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "—"
    if "mean" not in entry:
        return "skipped"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


def best_modes(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target, the fine-tuned mode to keep: best validation top-1 (the test split is not used to
    choose); test top-1 only when no run had a validation hold-out, and then said so."""
    best: dict[str, dict[str, Any]] = {}
    for target in sorted({r["target"] for r in results}):
        runs = [r for r in results if r["target"] == target and r.get("weights")]
        if not runs:
            continue
        by_validation = all(r.get("val_top1") is not None for r in runs)
        key = "val_top1" if by_validation else "top1"
        chosen = max(runs, key=lambda r: r.get(key) or 0.0)
        best[target] = {"mode": chosen["mode"], "weights": chosen["weights"], "chosen_by": key}
    return best


def results_document(
    results: list[dict[str, Any]], failures: list[dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Any]:
    """What results.json holds: settings, every finished (target, mode), the best per target, failures."""
    ordered = sorted(results, key=lambda r: (r["target"], r["mode"]))
    return {
        "format": FORMAT,
        **settings,
        "results": ordered,
        "best": best_modes(ordered),
        "failures": sorted(failures, key=lambda f: (f["target"], f.get("mode") or "")),
    }


def markdown_table(document: dict[str, Any]) -> str:
    """target x mode rows: fine-tune top-1 and top-5, the headline few-shot accuracy, and the budget."""
    shots = list(document["evaluate"]["shots"]) if document.get("evaluate") else []
    headline = headline_shots(shots) if shots else None
    seeds = document["evaluate"]["seeds"] if document.get("evaluate") else 0
    fewshot_header = f" {headline}-shot linear (%) |" if headline else ""
    header = (
        f"| target | mode | fine-tune top-1 (%) | top-5 (%) |{fewshot_header} lr | best step / steps | time |"
    )
    lines = [
        header,
        "| --- | --- | --- | --- |" + (" --- |" if headline else "") + " --- | --- | --- |",
    ]
    for r in document["results"]:
        fewshot = f" {_fewshot_cell((r.get('fewshot') or {}).get(str(headline)))} |" if headline else ""
        budget = f"{r['best_step']} / {r['steps']}" if "steps" in r else "—"
        lr = f"{r['lr']:g}" if r.get("lr") is not None else "—"
        lines.append(
            f"| {r['target']} | {r['mode']} | {_percent(r.get('top1'))} | {_percent(r.get('top5'))} |"
            f"{fewshot} {lr} | {budget} | {r['seconds']:.0f} s |"
        )
    parts = ["\n".join(lines)]
    sweeps = [r for r in document["results"] if len(r.get("lr_sweep") or ()) > 1]
    if sweeps:
        parts.append(_sweep_table(sweeps))
    if shots and seeds:
        parts.append(_fewshot_table(document["results"], shots, seeds))
    if document["best"]:
        kept = [
            f"- {target}: {best['mode']} (by {best['chosen_by'].replace('_', ' ')}), `{best['weights']}`"
            for target, best in document["best"].items()
        ]
        parts.append("Best fine-tuned weights per target:\n\n" + "\n".join(kept))
    if document["failures"]:
        failed = [
            f"- {f['target']}" + (f" / {f['mode']}" if f.get("mode") else "") + f": {f['error']}"
            for f in document["failures"]
        ]
        parts.append("Failed:\n\n" + "\n".join(failed))
    return "\n\n".join(parts) + "\n"


def _sweep_table(results: list[dict[str, Any]]) -> str:
    """Each (target, mode)'s validation top-1 at every rate of the sweep; the chosen rate in bold, a rate an
    extension of the grid added (`finetune.lr_extend`) marked as such, notes on a choice still at an edge."""
    rates = sorted({entry["lr"] for r in results for entry in r["lr_sweep"]})
    added = {entry["lr"] for r in results for entry in r["lr_sweep"] if entry.get("extension")}
    legend = "; (added): past the edge of lr_sweep a choice landed on, by finetune.lr_extend" if added else ""
    header = " | ".join(f"lr {lr:g}" + (" (added)" if lr in added else "") for lr in rates)
    lines = [
        "Learning rate chosen on the validation split (top-1 %, held out of train; test reported at the "
        f"chosen rate only{legend}):",
        "",
        f"| target | mode | {header} |",
        "| --- | --- |" + " --- |" * len(rates),
    ]
    for r in results:
        scores = {entry["lr"]: entry.get("val_top1") for entry in r["lr_sweep"]}
        cells = [_percent(scores.get(lr)) if lr in scores else "" for lr in rates]
        cells = [
            f"**{cell}**" if lr == r["lr"] and scores.get(lr) is not None else cell
            for lr, cell in zip(rates, cells, strict=True)
        ]
        lines.append(f"| {r['target']} | {r['mode']} | " + " | ".join(cells) + " |")
    notes = [
        f"- {r['target']} / {r['mode']}: warning: {r[note]}"
        for r in results
        for note in ("lr_choice_warning", "lr_at_edge")
        if r.get(note)
    ]
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def _fewshot_table(results: list[dict[str, Any]], shots: list[int], seeds: int) -> str:
    header = " | ".join(f"{k}-shot" for k in shots)
    lines = [
        f"Few-shot linear accuracy (%) on frozen features, mean ± std over {seeds} seed(s):",
        "",
        f"| target | mode | {header} |",
        "| --- | --- |" + " --- |" * len(shots),
    ]
    for r in results:
        cells = " | ".join(_fewshot_cell((r.get("fewshot") or {}).get(str(k))) for k in shots)
        lines.append(f"| {r['target']} | {r['mode']} | {cells} |")
    return "\n".join(lines)


def write_results(
    out: Path, results: list[dict[str, Any]], failures: list[dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Any]:
    """Write results.json, results.md and results.png into the local folder `out`; returns the document."""
    document = results_document(results, failures, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(document, indent=2) + "\n")
    title = f"# Transfer results: {settings.get('name', '')}".rstrip(": ")
    (out / RESULTS_MD).write_text(f"{title}\n\n{markdown_table(document)}")
    if document["results"]:
        plot_results(document, out / RESULTS_PLOT)
    return document


def plot_results(document: dict[str, Any], out: Path) -> Path:
    """Grouped bars per target, one colour per mode: fine-tune top-1, and the headline few-shot accuracy
    with its spread over seeds."""
    results = document["results"]
    targets = sorted({r["target"] for r in results})
    modes = sorted({r["mode"] for r in results}, key=lambda m: (m != "pretrained", m))
    shots = list(document["evaluate"]["shots"]) if document.get("evaluate") else []
    panels = [("fine-tune top-1", lambda r: (r.get("top1"), 0.0))]
    if shots:
        headline = str(headline_shots(shots))

        def fewshot(r: dict[str, Any]) -> tuple[float | None, float]:
            entry = (r.get("fewshot") or {}).get(headline) or {}
            return entry.get("mean"), entry.get("std", 0.0)

        panels.append((f"{headline}-shot linear", fewshot))
    size = (4 + 2.5 * len(targets) * len(panels), 4)
    with saved_figure(out, nrows=1, ncols=len(panels), figsize=size, squeeze=False) as (_, axes):
        width = 0.8 / max(1, len(modes))
        for axis, (name, value) in zip(axes[0], panels, strict=True):
            for index, mode in enumerate(modes):
                heights, errors = [], []
                for target in targets:
                    run = next((r for r in results if r["target"] == target and r["mode"] == mode), {})
                    height, error = value(run) if run else (None, 0.0)
                    heights.append(np.nan if height is None else height)
                    errors.append(error)
                positions = np.arange(len(targets)) + (index - (len(modes) - 1) / 2) * width
                bars = axis.bar(positions, heights, width, yerr=errors, capsize=3, label=mode)
                axis.bar_label(
                    bars, labels=[_percent(None if np.isnan(h) else h) for h in heights], fontsize=8
                )
            axis.set_xticks(np.arange(len(targets)), targets)
            axis.set_ylim(0, 1.05)
            axis.set_title(name)
            axis.set_ylabel("accuracy")
        # Right of the last panel, outside every axes: inside one, the legend sits on bars (they reach 1.0).
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), title="mode")
    return out


def plot_confusion(confusion: np.ndarray, classes: list[str], title: str, out: Path) -> Path:
    """Row-normalised confusion matrix (true class down, prediction across); names shown up to 40 classes."""
    totals = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    size = min(12.0, 3.0 + 0.35 * len(classes))
    with saved_figure(out, figsize=(size + 1, size)) as (figure, axis):
        image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        figure.colorbar(image, ax=axis, fraction=0.046, label="fraction of the true class")
        if len(classes) <= 40:
            axis.set_xticks(range(len(classes)), classes, rotation=90)
            axis.set_yticks(range(len(classes)), classes)
        if len(classes) <= 15:
            for row in range(len(classes)):
                for col in range(len(classes)):
                    if confusion[row, col]:
                        colour = "white" if rates[row, col] > 0.5 else "black"
                        count = str(confusion[row, col])
                        axis.text(col, row, count, ha="center", va="center", color=colour, fontsize=8)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(title)
    return out
