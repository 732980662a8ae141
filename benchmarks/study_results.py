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
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.machine import RESULTS, save
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
            "study": study.get("study"),
            "spread": study.get("spread"),
            "points": study["points"],
            "curves": study["curves"],
            "answer": found,
            "answer_lines": sentences(found),
            "note": args.note,
        },
    )
    shutil.copyfile(args.run / "report" / FIGURE, RESULTS / "scaling_study.png")
    print("\n".join(sentences(found)))
    print(f"wrote {path} and {RESULTS / 'scaling_study.png'}; wall {math.floor(run.get('seconds') or 0)} s")


if __name__ == "__main__":
    main()
