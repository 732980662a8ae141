"""The study's answer, as the run computed it (pipeline/study/answer.py, in RUN/study/results.json):
`benchmarks/results/scaling_study.{json,png}` from a run folder of `vitpipe run jobs/scaling.yaml`, with
every path in it written from RUN, not from the machine that ran it.

    .venv/bin/vitpipe run jobs/scaling.yaml --run-dir /tmp/scaling_run
    .venv/bin/python -m benchmarks.study_results /tmp/scaling_run
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.machine import RESULTS, save
from pipeline.figures import saved_figure
from pipeline.metrics import read_records
from pipeline.study.answer import answer, model_families, sentences
from pipeline.study.report import FIGURE

RUN = "RUN"  # what the run folder's path is written as: the results hold no path of the machine that ran them


def relative_to_run(document: Any, run: Path) -> Any:
    """`document` with the run folder written as RUN wherever a string names it or a path in it (the
    folder itself, or it followed by `/`), never where it is only the start of another name (`RUN2`)."""
    folders = sorted({str(run.resolve()), str(run.absolute())}, key=len, reverse=True)
    if "/" in folders:
        raise ValueError("the run folder is /: give the run's own folder")
    pattern = re.compile("|".join(re.escape(folder) for folder in folders) + r"(?=/|$|[^\w.-])")
    if isinstance(document, dict):
        return {key: relative_to_run(value, run) for key, value in document.items()}
    if isinstance(document, list):
        return [relative_to_run(value, run) for value in document]
    return pattern.sub(RUN, document) if isinstance(document, str) else document


def finetune_curves(run: Path, points: list[dict[str, Any]]) -> dict[str, Any]:
    """Why a pretrained start may end below a random one: per target and model, the validation top-1 of
    the chosen rate at each fine-tuning step (mean over seeds), at the largest pretraining size and from
    scratch, read from each point's fine-tuning records."""
    done = [point for point in points if point.get("status") == "done"]
    largest = max((point["size"] for point in done), default=0)
    grouped: dict[tuple[str, str, str], list[dict[int, float]]] = {}
    for point in done:
        if point["size"] not in (0, largest):
            continue
        for result in point["results"]:
            folder = run / "study" / point["point"] / "transfer" / result["target"] / result["mode"]
            records = read_records(str(folder / f"lr-{result['lr']:g}"))
            curve = {r["step"]: r["val_top1"] for r in records if r.get("val_top1") is not None}
            where = "scratch" if point["size"] == 0 else f"pretrained on {largest:,}"
            grouped.setdefault((result["target"], point["model"], where), []).append(curve)
    out: dict[str, Any] = {}
    for (target, model, where), curves in sorted(grouped.items()):
        steps = sorted(set.intersection(*(set(curve) for curve in curves)))
        mean = {str(step): statistics.fmean(curve[step] for curve in curves) for step in steps}
        out.setdefault(target, {}).setdefault(model, {})[where] = {"seeds": len(curves), "val_top1": mean}
    return out


def plot_finetune_curves(curves: dict[str, Any], out: Path) -> Path:
    """A panel per (target, model): validation top-1 against fine-tuning step, pretrained and scratch."""
    panels = [(target, model) for target, models in curves.items() for model in models]
    layout = {"ncols": len(panels), "figsize": (4.5 * len(panels), 3.4), "squeeze": False}
    with saved_figure(out, dpi=110, **layout) as (_, axes):
        for axis, (target, model) in zip(axes.flat, panels, strict=True):
            for where, entry in curves[target][model].items():
                steps = [int(step) for step in entry["val_top1"]]
                values = [100 * value for value in entry["val_top1"].values()]
                axis.plot(steps, values, marker="o", label=f"{where} ({entry['seeds']} seeds)")
            axis.set(
                title=f"{target}: {model} fine-tuning", xlabel="fine-tuning step", ylabel="val top-1 (%)"
            )
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="the run folder of `vitpipe run jobs/scaling.yaml`")
    parser.add_argument("--note", default="", help="what a reader should know of how the run was made")
    args = parser.parse_args()
    study = relative_to_run(json.loads((args.run / "study" / "results.json").read_text()), args.run)
    run = relative_to_run(json.loads((args.run / "run.json").read_text()), args.run)
    found = answer(
        study["curves"], model_families(study.get("models", {}))
    )  # by this code (the run's may be older)
    tuning = finetune_curves(args.run, study["points"])
    tuning_figure = plot_finetune_curves(tuning, RESULTS / "scaling_study_finetune.png")
    revision = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    path = save(
        "scaling_study",
        {
            "what": "jobs/scaling.yaml run once end to end (vitpipe run): transfer against pretraining data, "
            "ViT vs BiT; the answer computed from the curves (benchmarks/study_results.py)",
            "command": f"vitpipe run jobs/scaling.yaml --run-dir {RUN}",
            "code": revision.stdout.strip(),
            "wall_seconds": run.get("seconds"),
            "steps": run.get("steps"),
            "study": {
                key: study.get(key) for key in ("sizes", "models", "seeds", "epochs", "steps", "min_steps")
            },
            "spread": study.get("spread"),
            "points": study["points"],
            "curves": study["curves"],
            "answer": found,
            "answer_lines": sentences(found),
            "finetune_curves": tuning,
            "note": args.note,
        },
    )
    shutil.copyfile(args.run / "report" / FIGURE, RESULTS / "scaling_study.png")
    print("\n".join(sentences(found)))
    wall = math.floor(run.get("seconds") or 0)
    print(f"wrote {path}, {tuning_figure} and {RESULTS / 'scaling_study.png'}; wall {wall} s")


if __name__ == "__main__":
    main()
