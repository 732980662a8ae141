"""What a resize of an elastic pretraining costs (issue 29): seconds from the cluster's change to the next
trained step, and the steps trained again, for the three ways the group changes size.

On a cluster of one-CPU nodes on this machine (`ray.cluster_utils.Cluster`), `vitpipe pretrain` of the
tests' tiny ViT with `num_workers: [1, 2]`, ZeRO-2, a checkpoint every 100 steps, 400 steps:
- lost: the second node is removed at once (a crash, no notice), mid-way between two checkpoints;
- spot: the second node is drained with a 20 s deadline (a spot notice), then removed at the deadline
  (a longer run, 2,500 steps and no periodic checkpoint before the end, so that the notice's checkpoints
  are all there is to resume from; Ray Train looks for drains every second here,
  `RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S=1`);
- grow: the run starts on one node and a second joins.
Each phase of the way back is read from the run's own records (`time` on every step and event): the
change, the group's restart ("resumed"), the first step after it. Repeated `--repeats` times.

    .venv/bin/python -m benchmarks.bench_elastic           # ~6 minutes on 2 CPUs; results/elastic.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

from benchmarks.machine import save
from pipeline.config import FractalsConfig, PreprocessConfig
from pipeline.datasets.fractals import build_fractals
from pipeline.metrics import read_records
from pipeline.preprocess.run import preprocess
from pipeline.pretrain.launch import ELASTIC_START_TIMEOUT_S
from pipeline.ray_session import init_ray

REPO = Path(__file__).resolve().parents[1]
RUN = {
    "model": {"variant": "Ti/4", "width": 64, "depth": 2, "heads": 2, "mlp_dim": 128},
    "num_workers": [1, 2],
    "cpus_per_worker": 1.0,
    "global_batch_size": 32,
    "micro_batch_size": 16,
    "steps": 400,
    "zero_stage": 2,
    "optimizer": {"lr": 3.0e-3, "weight_decay": 0.05},
    "schedule": {"warmup_steps": 8},
    "flip": False,
    "shuffle_buffer": 64,
    "checkpoint_every": 100,
    "log_every": 2,
}
SPOT_DEADLINE_S = 20
SPOT_RUN = {"steps": 2500, "checkpoint_every": 2500}


def corpus(root: Path) -> str:
    """The tests' fractal corpus at 16 px in 4 px patches."""
    init_ray(num_cpus=2)
    build_fractals(
        FractalsConfig(classes=10, per_class=30, size=32, shard_size=64, seed=7), root / "fractals"
    )
    preprocess(str(root / "fractals"), str(root / "patches"), PreprocessConfig(image_size=16, patch_size=4))
    ray.shutdown()
    return str(root / "patches")


def steps(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


def wait_until(run_dir: Path, run: subprocess.Popen, step: int) -> None:
    while run.poll() is None and not any(r["step"] >= step for r in steps(read_records(str(run_dir)))):
        time.sleep(0.1)


def one_resize(way: str, data: str, root: Path) -> dict:
    """One run with one resize of the kind `way`; the phases of the way back, in seconds."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1) if way != "grow" else None
    cluster.wait_for_nodes()
    name = f"{way}-{time.monotonic_ns()}"
    settings = {**RUN, **(SPOT_RUN if way == "spot" else {}), "data": data}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(settings))
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "pretrain",
        str(root / f"{name}.yaml"),
        "--storage",
        str(root),
        "--address",
        cluster.address,
    ]
    run_dir = root / name
    try:
        env = {**os.environ, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
        with subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as run:
            wait_until(run_dir, run, 150)  # mid-way between the checkpoints at 100 and 200
            changed = _change(way, cluster, second)
            run.wait(timeout=600)
    finally:
        cluster.shutdown()
    records = read_records(str(run_dir))
    resized = next((r for r in records if r.get("event") == "resized"), None)
    if resized is None:  # the run ended before the change took effect: nothing to measure
        return {"way": way, "returncode": run.returncode, "error": "no resize recorded"}
    resumed = next(r for r in records if r.get("event") == "resumed" and r["time"] >= changed)
    first = next(r for r in steps(records[records.index(resized) :]))
    last_before = steps(records[: records.index(resized)])[-1]["step"]
    return {
        "way": way,
        "returncode": run.returncode,
        "from_workers": resized["from_workers"],
        "to_workers": resized["workers"],
        "resumed_at_step": resized["step"],
        "last_step_before": last_before,
        "steps_trained_again": last_before - resized["step"],
        "change_to_group_resumed_s": round(resumed["time"] - changed, 2),
        "change_to_next_step_s": round(first["time"] - changed, 2),
    }


def _change(way: str, cluster: Cluster, second) -> float:
    """Change the cluster as `way` says; returns the time of the change the way back is measured from:
    the node's loss (lost, spot) or its arrival (grow)."""
    if way == "grow":
        changed = time.time()
        cluster.add_node(num_cpus=1)
        return changed
    if way == "spot":
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "drain-node",
                "--address",
                cluster.address,
                "--node-id",
                second.node_id,
                "--reason",
                "DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message",
                "bench",
                "--deadline-remaining-seconds",
                str(SPOT_DEADLINE_S),
            ],
            check=True,
            capture_output=True,
        )
        time.sleep(SPOT_DEADLINE_S)
    changed = time.time()
    cluster.remove_node(second)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ways", nargs="+", default=["lost", "spot", "grow"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = corpus(root)
        runs = []
        for way in args.ways:
            for _ in range(args.repeats):
                runs.append(one_resize(way, data, root))
                print(runs[-1], flush=True)
    summary = {
        way: {
            key: statistics.median(r[key] for r in runs if r["way"] == way and "error" not in r)
            for key in ("change_to_group_resumed_s", "change_to_next_step_s", "steps_trained_again")
        }
        for way in args.ways
    }
    settings = {
        **RUN,
        "spot": {**SPOT_RUN, "deadline_s": SPOT_DEADLINE_S},
        "ray_train_worker_group_start_timeout_s": float(ELASTIC_START_TIMEOUT_S),
    }
    path = save("elastic", {"settings": settings, "median": summary, "runs": runs})
    print(path)


if __name__ == "__main__":
    main()
