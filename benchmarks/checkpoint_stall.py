"""How long a checkpoint stalls training (issue 41): the same pretraining saved synchronously
(`checkpoint_async: false`: written and uploaded before the next step, vitpipe's way before) and
asynchronously (staged into host memory while training waits, written and uploaded in Ray Train's upload
thread while it goes on), side by side in one run.

The real path: `pipeline.pretrain.launch.pretrain` (what `vitpipe pretrain` runs) on one Ray Train worker,
DeepSpeed ZeRO-2 in fp32, a checkpoint every `--every` steps into local storage. Two settings (`--cpus`):
the worker's torch on 1 of the 2 cores (a core left for the background write, as a GPU node's spare cores
are), and on both (the write takes its CPU from training's threads). The model is ViT-B/16's
shape (width 768, depth 12, 12 heads, MLP 3072: 86M parameters, a 1.4 GB checkpoint of weights, fp32
master and Adam's moments) on 32 px images (4 patches): the largest model this 2-core machine steps in
about a second, where a save's cost is the bytes of a real ViT-B checkpoint. Rounds alternate the two
modes (`--rounds`). Read from each run's metrics: the seconds training was blocked per save (`checkpoint`
events' blocked_s), the seconds until each save was in storage (`checkpoint_written`), step times (of the
steps not following a save, and for the asynchronous runs of the steps trained while a write was in
flight; and the step after a save, whose time holds the save's blocked seconds and any slowdown the write
brings it), and the wall time from the first step to the end (the last save's write included: the run's end
waits for it).

    .venv/bin/python -m benchmarks.checkpoint_stall    # ~10 minutes on 2 CPUs; results/checkpoint_stall.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.machine import alternate, save
from pipeline.config import FractalsConfig, PreprocessConfig, PretrainConfig
from pipeline.datasets.fractals import build_fractals
from pipeline.metrics import read_records
from pipeline.preprocess.run import preprocess
from pipeline.pretrain.checkpoints import rank_record
from pipeline.pretrain.launch import pretrain
from pipeline.pretrain.plan import plan_pretrain
from pipeline.ray_session import init_ray

RESULTS_NAME = "checkpoint_stall"
IMAGE, PATCH, MICRO = 32, 16, 8
MODEL = {"patch_size": PATCH, "width": 768, "depth": 12, "heads": 12, "mlp_dim": 3072}


def corpus(root: Path) -> str:
    """The fractal corpus (10 classes x 40 images) at 32 px in 16 px patches."""
    build_fractals(FractalsConfig(classes=10, per_class=40, size=IMAGE, shard_size=200), root / "raw")
    preprocess(str(root / "raw"), str(root / "patches"), PreprocessConfig(image_size=IMAGE, patch_size=PATCH))
    return str(root / "patches")


def run(
    directory: str, storage: Path, name: str, *, asynchronous: bool, cpus: int, steps: int, every: int
) -> dict:
    """One pretraining run; what its metrics and its last checkpoint say about its saves."""
    config = PretrainConfig(
        data=directory,
        model=MODEL,
        num_workers=1,
        cpus_per_worker=float(cpus),
        global_batch_size=MICRO,
        micro_batch_size=MICRO,
        steps=steps,
        zero_stage=2,
        checkpoint_every=every,
        checkpoint_async=asynchronous,
        keep_checkpoints=2,
        log_every=1,
        shuffle_buffer=64,
    )
    result = pretrain(plan_pretrain(config, directory), storage=str(storage), name=name)
    records = read_records(result.run_dir)
    last = Path(result.run_dir) / f"checkpoint_{steps:08d}"
    sizes = json.loads((last / rank_record(0)).read_text())["files"]
    return summary(records, asynchronous, sum(sizes.values()) / 1e6)


def summary(records: list[dict[str, Any]], asynchronous: bool, checkpoint_mb: float) -> dict[str, Any]:
    """Blocked and written seconds per save, and step times, of one run's records."""
    saves = [r for r in records if r.get("event") == "checkpoint"]
    written = [r for r in records if r.get("event") == "checkpoint_written"]
    steps = [r for r in records if "step_s" in r]
    saved = {r["step"] for r in saves}
    windows = [(s["step"], w["finished"]) for s, w in zip(saves, written, strict=True)]

    def writing(record: dict[str, Any]) -> bool:  # trained while an earlier save was being written
        return any(step < record["step"] and record["time"] <= until for step, until in windows)

    # A step's step_s covers the time since the previous read: the step after a save holds the save.
    timed = [r for r in steps[1:] if r["step"] - 1 not in saved]
    plain = [r["step_s"] for r in timed if not writing(r)]
    in_flight = [r["step_s"] for r in timed if writing(r)]
    after_save = [
        r["step_s"] for r in steps if r["step"] - 1 in saved
    ]  # the save, and its effect on the step
    started = next(r["time"] for r in records if r.get("event") == "started")
    finished = next(r["time"] for r in records if r.get("event") == "finished")
    return {
        "asynchronous": asynchronous,
        "saves": len(saves),
        "checkpoint_mb": round(checkpoint_mb, 1),
        "blocked_s": [r["blocked_s"] for r in saves],
        "written_s": [r["written_s"] for r in written],
        "background_s": [r.get("background_s") for r in written],
        "step_s_median": statistics.median(plain),
        "step_s_while_writing_median": statistics.median(in_flight) if in_flight else None,
        "step_after_save_s_median": statistics.median(after_save),
        "started_to_finished_s": round(finished - started, 2),
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and max over every save of the runs of one mode."""
    blocked = [value for r in runs for value in r["blocked_s"]]
    written = [value for r in runs for value in r["written_s"]]
    background = [value for r in runs for value in r["background_s"] if value is not None]
    during = [r["step_s_while_writing_median"] for r in runs if r["step_s_while_writing_median"] is not None]
    return {
        "saves": len(blocked),
        "blocked_s_median": statistics.median(blocked),
        "blocked_s_max": max(blocked),
        "written_s_median": statistics.median(written),
        "background_write_s_median": statistics.median(background) if background else None,
        "step_s_median": statistics.median(r["step_s_median"] for r in runs),
        "step_s_while_writing_median": statistics.median(during) if during else None,
        "step_after_save_s_median": statistics.median(r["step_after_save_s_median"] for r in runs),
        "started_to_finished_s_median": statistics.median(r["started_to_finished_s"] for r in runs),
        "checkpoint_mb": runs[0]["checkpoint_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per run")
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--rounds", type=int, default=2, help="alternating synchronous / asynchronous runs")
    parser.add_argument("--cpus", default="1,2", help="the worker's CPUs (torch threads), one setting each")
    args = parser.parse_args()
    init_ray()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="vitpipe-stall-") as scratch:
        directory = corpus(Path(scratch))
        for cpus in (int(value) for value in args.cpus.split(",")):

            def one(mode: str, name: str, cpus: int = cpus) -> dict[str, Any]:
                asynchronous = mode == "asynchronous"
                return run(
                    directory,
                    Path(scratch) / "runs",
                    name,
                    asynchronous=asynchronous,
                    cpus=cpus,
                    steps=args.steps,
                    every=args.every,
                )

            runs[f"{cpus}_cpus"] = alternate(["synchronous", "asynchronous"], args.rounds, one, f"{cpus}cpu-")
    results = {
        "settings": {
            "model": MODEL,
            "image_size": IMAGE,
            "micro_batch": MICRO,
            "workers": 1,
            "zero_stage": 2,
            "precision": "fp32",
            "steps": args.steps,
            "checkpoint_every": args.every,
            "rounds": args.rounds,
            "storage": "local disk (the run's folder), a scratch folder on the same disk",
            "path": "pipeline.pretrain.launch.pretrain: Ray Train worker, DeepSpeed engine, Saver",
        },
        "median": {
            cpus: {mode: aggregate(outcomes) for mode, outcomes in modes.items()}
            for cpus, modes in runs.items()
        },
        "runs": runs,
    }
    print(json.dumps(results["median"], indent=2))
    print(save(RESULTS_NAME, results))


if __name__ == "__main__":
    main()
