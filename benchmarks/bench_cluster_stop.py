"""How long `cluster/local.sh stop` takes to end both nodes of the local two-node cluster, against the
former way, SIGTERM to each node's whole process group at once (the processes under `ray start --block`
die first and it waits out its grace period). Each way on a freshly started cluster, `--rounds` times.

    python -m benchmarks.bench_cluster_stop [--rounds 2]

Writes benchmarks/results/cluster_stop.json.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import save

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "cluster" / "local.sh")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def one_stop(way: str) -> float:
    """Start the cluster, stop it `way` ("script" or "whole-group"); seconds until no node process is left."""
    state = Path(tempfile.mkdtemp(prefix="vp-bench-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_PORT": str(free_port()),
        "DASHBOARD_PORT": str(free_port()),
        "STATE_DIR": str(state),
        "VENV_BIN": str(Path(sys.executable).parent),
    }
    subprocess.run([SCRIPT, "start"], env=env, check=True, capture_output=True, timeout=180)
    groups = [int((state / f"{node}.pid").read_text()) for node in ("head", "worker")]
    started = time.monotonic()
    if way == "script":
        subprocess.run([SCRIPT, "stop"], env=env, check=True, capture_output=True, timeout=120)
    else:
        for group in groups:
            os.killpg(group, signal.SIGTERM)
    while any(alive(group) for group in groups) and time.monotonic() - started < 60:
        time.sleep(0.1)
    took = time.monotonic() - started
    for group in groups:  # whatever is left (the former way's 20 s grace ended in SIGKILL too)
        if alive(group):
            os.killpg(group, signal.SIGKILL)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ways = {way: [round(one_stop(way), 1) for _ in range(args.rounds)] for way in ("script", "whole-group")}
    result = {
        "seconds": ways,
        "claim": "local.sh stop ends both nodes in under 10 s; a whole-group SIGTERM took 20 s or more",
        "holds": max(ways["script"]) < 10 <= min(ways["whole-group"]),
    }
    print(result)
    print(f"written to {save('cluster_stop', result)}")


if __name__ == "__main__":
    main()
