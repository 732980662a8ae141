"""Describe the machine a benchmark ran on, for the results JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.info import accelerator, package_versions

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "accelerator": accelerator(),
        "platform": platform.platform(),
        "versions": package_versions(),
    }


def save(name: str, results: dict) -> Path:
    """Write results/{name}.json with the machine and the time of the run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path.write_text(
        json.dumps({"benchmark": name, "when": stamp, "machine": machine(), **results}, indent=2) + "\n"
    )
    return path


def alternate(
    modes: list[str], rounds: int, run: Callable[[str, str], dict[str, Any]], label: str = ""
) -> dict[str, list[dict[str, Any]]]:
    """A side-by-side comparison: `rounds` rounds, each running every mode once in turn (so a drift of the
    machine falls on all of them alike), `run(mode, name)` giving one run's outcome, printed as it ends."""
    outcomes: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for round_ in range(rounds):
        for mode in modes:
            began, name = time.perf_counter(), f"{label}{mode}-{round_}"
            outcomes[mode].append(run(mode, name))
            print(
                f"{name}: {json.dumps(outcomes[mode][-1])} ({time.perf_counter() - began:.0f} s)", flush=True
            )
    return outcomes
