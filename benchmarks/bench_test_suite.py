"""How long the inner loop takes: `pytest -m "not slow"` (what `make test-fast` runs) on this machine, with
its test count; the claim is under 3 minutes. `--all` times the whole suite (`make test`'s pytest) too.

    python -m benchmarks.bench_test_suite [--all]

Writes benchmarks/results/test_suite.json.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import save

REPO = Path(__file__).resolve().parents[1]


def timed(selection: list[str]) -> dict:
    """One pytest run of `selection`: wall seconds and the counts its summary line gives."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - started
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|deselected|skipped|error)", summary)
    }
    return {"selection": " ".join(selection) or "all", "wall_s": round(wall, 1), "exit": done.returncode,
            "summary": summary, **counts}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also time the whole suite (about 30 minutes)")
    args = parser.parse_args()
    runs = {"fast": timed(["-m", "not slow"])}
    if args.all:
        runs["all"] = timed([])
    result = {
        **runs,
        "claim": "make test-fast's tests run in under 3 minutes",
        "holds": runs["fast"]["wall_s"] < 180,
    }
    print(result)
    print(f"written to {save('test_suite', result)}")


if __name__ == "__main__":
    main()
