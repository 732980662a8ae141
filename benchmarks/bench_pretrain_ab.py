"""A/B of the pretraining step between two checkouts of vitpipe: the 2-worker Ray Train + DeepSpeed ZeRO-2
run of `bench_pretrain.cpu_ray` (what `vitpipe pretrain` runs), the trees alternating round by round so
that the machine's drift falls on both.

    git worktree add /tmp/before REV
    .venv/bin/python -m benchmarks.bench_pretrain_ab /tmp/before . --name pretrain_ab_NAME --note "..."

Each run is a fresh process started in its tree, so it imports that tree's `pipeline` and `vit`.
Result: results/NAME.json with each round's median images/s and step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import ray

from benchmarks.bench_pretrain import cpu_corpus
from benchmarks.machine import save
from pipeline.ray_session import init_ray

PROBE = """
import json, sys, tempfile
from pathlib import Path
from benchmarks.bench_pretrain import cpu_ray
with tempfile.TemporaryDirectory() as runs:
    r = cpu_ray(sys.argv[1], Path(runs), "ab", workers=2, zero=2, steps=int(sys.argv[2]), warmup=5)
print("RESULT", json.dumps({key: r[key] for key in ("images_per_s", "step_s", "data_wait_s")}))
"""


def one_run(tree: Path, corpus: str, steps: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, corpus, str(steps)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{tree}: the run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the tree to compare against (a git worktree)")
    parser.add_argument("after", type=Path, help="this tree")
    parser.add_argument("--name", required=True, help="results/NAME.json")
    parser.add_argument("--note", default="", help="what differs between the trees")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        init_ray()
        corpus = cpu_corpus(Path(scratch))

        ray.shutdown()  # each run starts its own Ray, as `vitpipe pretrain` does
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for side in ("before", "after"):
                runs[side].append(one_run(getattr(args, side).resolve(), corpus, args.steps))
                print(side, runs[side][-1], flush=True)
    rates = {side: [round(r["images_per_s"], 1) for r in results] for side, results in runs.items()}
    path = save(
        args.name,
        {
            "what": "2-worker Ray Train + DeepSpeed ZeRO-2 step (benchmarks.bench_pretrain.cpu_ray, "
            f"{args.steps} timed steps after 5, the embedded fractal corpus at 32px/patch 4), "
            f"{args.before} and {args.after} alternating, {args.rounds} round(s). {args.note}",
            "before_images_per_s": rates["before"],
            "after_images_per_s": rates["after"],
            "before_mean": round(statistics.mean(rates["before"]), 1),
            "after_mean": round(statistics.mean(rates["after"]), 1),
            "step_s_before": [round(r["step_s"], 4) for r in runs["before"]],
            "step_s_after": [round(r["step_s"], 4) for r in runs["after"]],
        },
    )
    print(path)


if __name__ == "__main__":
    main()
