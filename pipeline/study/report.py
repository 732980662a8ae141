"""The study's figure and table: transfer accuracy against pretraining images, one line per model.

The paper's Figures 3 and 4 as this run measured them: for every target, fine-tuned test top-1 and each
few-shot linear accuracy against the number of pretraining images (log axis), the mean over seeds with
their sample standard deviation (ddof 1), with the models trained from scratch (size 0) as a dashed level.
`results.json` holds every point, every curve and the answer they give (`answer.py`); `results.md` the
table of every point.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from pipeline.figures import saved_figure
from pipeline.storage import write_atomic
from pipeline.study.answer import answer, model_families, sentences

STUDY_FORMAT = "vitpipe.study/1"
FIGURE = "transfer_vs_data.png"
FIGURE_DATA = "transfer_vs_data.json"  # what each panel of the figure plots, read back from its artists
FINETUNE_METRIC = "finetune top-1"
SPREAD = "sample std over seeds (ddof 1)"  # what a curve's `std` and the figure's bars are


def point_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{target: {metric: value}}: fine-tuned top-1 and the k-shot linear accuracies of one point."""
    metrics: dict[str, dict[str, float]] = {}
    for result in summary.get("results", []):
        values = metrics.setdefault(result["target"], {})
        if result.get("top1") is not None:
            values[FINETUNE_METRIC] = float(result["top1"])
        for shots, entry in (result.get("fewshot") or {}).items():
            if "mean" in entry:
                values[f"{shots}-shot linear"] = float(entry["mean"])
    return metrics


def metric_order(metric: str) -> tuple[int, int]:
    """Fine-tuned top-1 first, then the few-shot accuracies by shot count."""
    return (0, 0) if metric == FINETUNE_METRIC else (1, int(metric.split("-")[0]))


def curves(points: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[dict[str, Any]]]]]:
    """{target: {metric: {model: [{size, mean, std, seeds}]}}} over the finished points, sizes ascending;
    `std` is the seeds' sample standard deviation (ddof 1: 0 for one seed, which has no spread to show)."""
    grouped: dict[tuple[str, str, str, int], list[float]] = {}
    for point in points:
        if point.get("status") != "done":
            continue
        for target, values in point_metrics(point).items():
            for metric, value in values.items():
                grouped.setdefault((target, metric, point["model"], point["size"]), []).append(value)
    out: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for (target, metric, model, size), values in sorted(grouped.items()):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        entry = {"size": size, "mean": statistics.fmean(values), "std": std, "seeds": len(values)}
        out.setdefault(target, {}).setdefault(metric, {}).setdefault(model, []).append(entry)
    return out


def write_study_results(
    points: list[dict[str, Any]], folder: Path, settings: dict[str, Any]
) -> dict[str, Any]:
    """results.json, results.md and the figure into `folder`; returns the document."""
    folder.mkdir(parents=True, exist_ok=True)
    found = curves(points)
    slide = answer(found, model_families(settings.get("models", {})))
    document = {
        "format": STUDY_FORMAT,
        **settings,
        "spread": SPREAD,
        "points": points,
        "curves": found,
        "answer": slide,
        "answer_lines": sentences(slide),
    }
    write_atomic(str(folder / "results.json"), json.dumps(document, indent=2) + "\n")
    write_atomic(str(folder / "results.md"), markdown_table(points) + "\n")
    if document["curves"]:
        plot_curves(document["curves"], folder / FIGURE)
    return document


def chosen_rates(summary: dict[str, Any]) -> dict[str, float]:
    """{target: the fine-tuning rate its validation split chose} of one point."""
    return {r["target"]: r["lr"] for r in summary.get("results", []) if r.get("lr") is not None}


def markdown_table(points: list[dict[str, Any]]) -> str:
    """Every point: size, model, seed, params, pretraining FLOPs and steps, its accuracies (%) and the
    fine-tuning rate chosen on each target's validation split."""
    metrics = sorted(
        {(t, m) for p in points for t, values in point_metrics(p).items() for m in values},
        key=lambda tm: (tm[0], metric_order(tm[1])),
    )
    targets = sorted({t for p in points for t in chosen_rates(p)})
    header = [
        "size",
        "model",
        "seed",
        "params",
        "pretrain FLOPs",
        "steps",
        "start step",
        *(f"{t} {m}" for t, m in metrics),
        *(f"{t} lr (val)" for t in targets),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for point in sorted(points, key=lambda p: (p["size"], p["model"], p["seed"])):
        values = point_metrics(point)
        cells = [
            f"{point['size']:,}" if point["size"] else "0 (scratch)",
            point["model"],
            str(point["seed"]),
            f"{point['params'] / 1e6:.2f}M" if point.get("params") else "—",
            f"{point['pretrain_flops']:.2e}" if point.get("pretrain_flops") else "—",
            f"{point['steps']:,}" if point.get("steps") else "—",
            start_step(point),
        ]
        if point.get("status") != "done":
            cells += [f"{point.get('status', 'not run')}: {point.get('error') or ''}".strip(": ")] * len(
                metrics
            )
            cells += ["—"] * len(targets)
        else:
            cells += [_percent(values.get(t, {}).get(m)) for t, m in metrics]
            rates = chosen_rates(point)
            cells += [f"{rates[t]:g}" if t in rates else "—" for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def start_step(point: dict[str, Any]) -> str:
    """The pretraining step a point fine-tuned from, and how it was chosen: `300 (best)`, `1,404 (last)`."""
    if point.get("start_step") is None:
        return "—"
    return f"{point['start_step']:,} ({point.get('start_selection', {}).get('select', 'last')})"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def plot_curves(document_curves: dict[str, dict[str, dict[str, list[dict[str, Any]]]]], path: Path) -> Path:
    """One panel per (target, metric): accuracy against pretraining images on a log axis, a line per model
    with its seeds' spread, each model's scratch level dashed. Beside the picture, FIGURE_DATA holds the
    values its artists draw (not the document's), so what the figure shows can be checked."""
    import matplotlib

    panels = [(t, m) for t, metrics in document_curves.items() for m in sorted(metrics, key=metric_order)]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    models = sorted(
        {model for metrics in document_curves.values() for lines in metrics.values() for model in lines}
    )
    layout = {"nrows": rows, "ncols": columns, "figsize": (4.5 * columns, 3.4 * rows), "squeeze": False}
    with saved_figure(path, dpi=120, **layout) as (figure, axes):
        seeds = sorted(
            {e["seeds"] for m in document_curves.values() for c in m.values() for e in _entries(c)}
        )
        counted = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        figure.suptitle(f"mean over {counted} seed(s) a point; bars: {SPREAD}", fontsize=9)
        for axis, (target, metric) in zip(axes.flat, panels, strict=False):
            _draw_panel(axis, document_curves[target][metric], models, colours, f"{target}: {metric}")
        for axis in list(axes.flat)[len(panels) :]:
            axis.axis("off")
        drawn = {f"{t}: {m}": _plotted(axis) for axis, (t, m) in zip(axes.flat, panels, strict=False)}
    write_atomic(str(path.with_name(FIGURE_DATA)), json.dumps(drawn, indent=2) + "\n")
    return path


def _entries(lines: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [entry for entries in lines.values() for entry in entries]


def _draw_panel(
    axis: Any, lines: dict[str, list[dict[str, Any]]], models: list[str], colours: list[str], title: str
) -> None:
    """One (target, metric): each model's pretrained sizes with their spread, its scratch level dashed."""
    for index, model in enumerate(models):
        entries = lines.get(model, [])
        colour = colours[index % len(colours)]
        pretrained = [e for e in entries if e["size"] > 0]
        if pretrained:
            sizes = [e["size"] for e in pretrained]
            means = [100 * e["mean"] for e in pretrained]
            stds = [100 * e["std"] for e in pretrained]
            axis.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, color=colour, label=model)
        for scratch in (e for e in entries if e["size"] == 0):
            axis.axhline(
                100 * scratch["mean"],
                color=colour,
                linestyle="--",
                linewidth=1,
                label=f"{model} from scratch",
            )
    axis.set_xscale("log")
    axis.set_xlabel("pretraining images")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)


def _plotted(axis: Any) -> dict[str, dict[str, list[float]]]:
    """{label: {x, y, yerr}} of a panel's error-bar lines and {label: {y}} of its dashed levels, in %, as
    matplotlib holds them."""
    series: dict[str, dict[str, list[float]]] = {}
    for container in axis.containers:
        line, _, (bars,) = container.lines
        half = [float(abs(segment[1][1] - segment[0][1]) / 2) for segment in bars.get_segments()]
        series[container.get_label()] = {
            "x": [float(v) for v in line.get_xdata()],
            "y": [float(v) for v in line.get_ydata()],
            "yerr": half,
        }
    for line in axis.get_lines():
        if line.get_linestyle() == "--":
            series[line.get_label()] = {"y": [float(line.get_ydata()[0])]}
    return series
