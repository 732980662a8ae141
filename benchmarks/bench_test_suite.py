"""How long the inner loop takes: `pytest -m "not slow"` (what `make test-fast` runs) on this machine, with
its test count; the claim is under 3 minutes. `--all` times the whole suite (`make test`'s pytest) too.
`--compare OLD.log NEW.log` sets two whole-suite runs side by side instead, from the logs of
`PYTEST_ADDOPTS=--durations=0 /usr/bin/time -v make test` (or `.ci/run`) on two trees in one session:
counts, pytest and wall seconds, the ratio, and the seconds by test file.

    python -m benchmarks.bench_test_suite [--all]
    python -m benchmarks.bench_test_suite --compare OLD.log NEW.log --trees OLD_REV NEW_REV

Writes benchmarks/results/test_suite.json (test_suite_compare.json for --compare).
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
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return {
        "selection": " ".join(selection) or "all",
        "wall_s": round(wall, 1),
        "exit": done.returncode,
        "summary": summary,
        **counts_of(summary),
    }


def counts_of(summary: str) -> dict[str, int]:
    """The test counts a pytest summary line gives: passed, failed, deselected, skipped, error."""
    return {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|deselected|skipped|error)", summary)
    }


def read_log(path: Path) -> dict:
    """A `make test` log's pytest summary (counts, seconds), /usr/bin/time's wall clock, and the seconds
    spent in each test file (setup, call and teardown of --durations=0)."""
    text = path.read_text(errors="replace")
    summary = re.findall(r"^=*\s*(\d+ passed.*? in ([\d.]+)s.*)$", text, re.MULTILINE)
    if not summary:
        raise SystemExit(f"{path}: no pytest summary line (was the run finished?)")
    line, seconds = summary[-1]
    counts = counts_of(line)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    by_file: dict[str, float] = {}
    for spent, test in re.findall(r"^([\d.]+)s (?:call|setup|teardown)\s+(\S+)", text, re.MULTILINE):
        name = test.split("::")[0]
        by_file[name] = by_file.get(name, 0.0) + float(spent)
    return {
        "log": str(path),
        "summary": line.strip("= "),
        **counts,
        "pytest_s": float(seconds),
        "wall": wall.group(1) if wall else None,
        "by_file_s": {name: round(spent, 1) for name, spent in sorted(by_file.items(), key=lambda i: -i[1])},
    }


def compare(old: Path, new: Path, trees: list[str]) -> dict:
    before, after = read_log(old), read_log(new)
    ratio = after["pytest_s"] / before["pytest_s"]
    return {
        "old": {"tree": trees[0], **before},
        "new": {"tree": trees[1], **after},
        "ratio": round(ratio, 3),
        "claim": "make test on the new tree takes at most 55% of the old tree's time, as many tests passing",
        "holds": ratio <= 0.55 and after.get("passed", 0) >= before.get("passed", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also time the whole suite (about 30 minutes)")
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("OLD_LOG", "NEW_LOG"),
        help="two `make test` logs (--durations=0, under time -v)",
    )
    parser.add_argument("--trees", nargs=2, default=["old", "new"], help="the two trees' revisions")
    args = parser.parse_args()
    if args.compare:
        result = compare(*args.compare, args.trees)
        print({key: result[key] for key in ("ratio", "holds")})
        print(f"written to {save('test_suite_compare', result)}")
        return
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
