"""What the analyses cost the quickstart: `vitpipe run jobs/quickstart.yaml` from nothing, in one run,
each step's time from run.json; the claim is that the analyze step adds <= 10% to the other steps' time.

    python -m benchmarks.bench_analysis [--run-dir DIR] [--job jobs/quickstart.yaml]

Writes benchmarks/results/analysis.json. The run folder is made afresh (a temporary one by default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import save

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(REPO / "jobs" / "quickstart.yaml"))
    parser.add_argument("--run-dir", help="a new folder for the run (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as scratch:
        run = Path(args.run_dir or Path(scratch) / "run")
        if run.exists():
            sys.exit(f"{run} exists: the benchmark times a run from nothing; give a new --run-dir")
        started = time.perf_counter()
        command = [sys.executable, "-m", "pipeline.cli", "run", args.job, "--run-dir", str(run)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"the run failed:\n{done.stderr[-3000:]}")
        record = json.loads((run / "run.json").read_text())
        steps = {step["step"]: step["seconds"] for step in record["steps"]}
        index = json.loads((run / "analysis" / "analysis.json").read_text())
    analyze = steps["analyze"]
    others = sum(seconds for step, seconds in steps.items() if step != "analyze")
    result = {
        "job": str(Path(args.job).relative_to(REPO)) if Path(args.job).is_relative_to(REPO) else args.job,
        "wall_s": round(wall, 1),
        "steps_s": {step: round(seconds, 1) for step, seconds in steps.items()},
        "analyze_s": round(analyze, 1),
        "added_to_the_other_steps": round(analyze / others, 4),
        "models_analysed": [model["name"] for model in index["models"]],
        "images_per_model": index["models"][0]["images"] if index["models"] else 0,
        "claim": "the analyses add <= 10% to the quickstart's time",
        "holds": analyze / others <= 0.10,
    }
    path = save("analysis", result)
    print(json.dumps(result, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
