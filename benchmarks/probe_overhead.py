"""What the few-shot probes cost training (issue 41): the quickstart's pretraining with its probes on
(`pretrain.eval`, digits, every `--every` steps, raw and EMA weights) and off, side by side in one run, rounds
alternating the two (`--rounds`).

The real path: the quickstart job's own datasets and preprocessing (fractals and digits at 32 px), then
`pipeline.pretrain.launch.pretrain` (what `vitpipe pretrain` runs) with the quickstart's pretrain section:
two Ray Train workers of half a CPU each, ZeRO-2, EMA on in both modes (so the difference is the probes
alone), the Prober actor beside them with the half CPU left. Read from each run's metrics: the median
step time of the logged windows (`step_s`, averaged over `log_every` steps; the first window, which holds
the start, left out), and of the windows in which a probe was handed over (its copy and gather are the
only part training waits for) or ran.

    .venv/bin/python -m benchmarks.probe_overhead    # ~10 minutes on 2 CPUs; results/probe_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.machine import alternate, save
from pipeline.config import PipelineConfig, PreprocessConfig
from pipeline.datasets.build import build_dataset
from pipeline.metrics import probe_records, read_records
from pipeline.preprocess.run import preprocess
from pipeline.pretrain.launch import pretrain
from pipeline.pretrain.plan import check_pretrain
from pipeline.ray_session import init_ray

RESULTS_NAME = "probe_overhead"
QUICKSTART = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"


def quickstart_data(root: Path) -> tuple[PipelineConfig, dict[str, str]]:
    """The quickstart job and its two datasets, built and preprocessed as its job says."""
    job = PipelineConfig.model_validate(yaml.safe_load(QUICKSTART.read_text()))
    folders = {}
    for name, dataset in job.datasets.items():
        build_dataset(dataset, root / "datasets" / name, overwrite=False, preview=False)
        entry: PreprocessConfig = job.preprocess[name]
        preprocess(str(root / "datasets" / name), str(root / "patches" / name), entry)
        folders[name] = str(root / "patches" / name)
    return job, folders


def run(
    job: PipelineConfig,
    folders: dict[str, str],
    storage: Path,
    name: str,
    *,
    probes: bool,
    steps: int,
    every: int,
) -> dict[str, Any]:
    """One pretraining of the quickstart's section, with or without its probes; its step times."""
    section = job.probes().model_copy(update={"every": every}) if probes else None
    config = job.pretrain.model_copy(update={"steps": steps, "eval": section})
    targets = {"digits": folders["digits"]} if probes else None
    plan = check_pretrain(config, folders["fractals"], str(storage / name), probe_targets=targets)
    result = pretrain(plan, storage=str(storage), name=name)
    return summary(read_records(result.run_dir), probes, config.log_every)


def summary(records: list[dict[str, Any]], probes: bool, log_every: int) -> dict[str, Any]:
    """Median step time over the logged windows, and over those where a probe was handed over."""
    windows = [r for r in records if "step_s" in r][1:]  # the first holds the start
    probed = {r["step"] for r in probe_records(records)}
    near = [r["step_s"] for r in windows if any(r["step"] - log_every < s <= r["step"] for s in probed)]
    started = next(r["time"] for r in records if r.get("event") == "started")
    finished = next(r["time"] for r in records if r.get("event") == "finished")
    return {
        "probes": probes,
        "probed_steps": sorted(probed),
        "skipped": [r["step"] for r in records if r.get("event") == "probe_skipped"],
        "step_s_median": statistics.median(r["step_s"] for r in windows),
        "step_s_mean": statistics.mean(r["step_s"] for r in windows),
        "step_s_median_probe_windows": statistics.median(near) if near else None,
        "started_to_finished_s": round(finished - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per run")
    parser.add_argument("--every", type=int, default=100, help="steps between probes (the quickstart's)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs with and without probes")
    args = parser.parse_args()
    init_ray()
    with tempfile.TemporaryDirectory(prefix="vitpipe-probes-") as scratch:
        job, folders = quickstart_data(Path(scratch))

        def one(mode: str, name: str) -> dict[str, Any]:
            runs_dir = Path(scratch) / "runs"
            return run(job, folders, runs_dir, name, probes=mode == "on", steps=args.steps, every=args.every)

        runs = alternate(["off", "on"], args.rounds, one)
    results = {
        "settings": {
            "job": "jobs/quickstart.yaml (its pretrain section; EMA on in both modes)",
            "steps": args.steps,
            "probe_every": args.every,
            "rounds": args.rounds,
        },
        **compare(runs),
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    print(save(RESULTS_NAME, results))


def compare(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Probes on against off: the median step, the mean step (the windows a probe slowed count fully)
    and the wall time from the first step to the end (the last probe waited for)."""
    summary: dict[str, Any] = {}
    for measure in ("step_s_median", "step_s_mean", "started_to_finished_s"):
        values = {mode: statistics.median(r[measure] for r in outcomes) for mode, outcomes in runs.items()}
        summary[measure] = values
        summary[f"{measure}_on_over_off"] = values["on"] / values["off"]
    return summary


if __name__ == "__main__":
    main()
