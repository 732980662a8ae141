"""What per-block activation checkpointing saves and costs: one ViT training step with and without it.

One step = forward + cross-entropy + backward (no optimizer), fp32, on the CPU. Each setting runs in a
fresh subprocess so that each has its own peak resident set: the step's memory is the child's peak RSS
(getrusage ru_maxrss) minus the RSS it had just before the step, with the model built (on the meta device,
materialised once) and the batch made, so it counts the step's activations plus the parameter gradients
the backward pass allocates (the same in both; reported apart). The head starts random, not at zero, so
that the whole backbone gets gradients. Step time is given as wall seconds and as the CPU seconds the
process used: on a shared machine the wall time also holds waiting for the cores, the CPU time mostly not.
The settings alternate over rounds (off, on, off, on, ...) and each is summarised by its median.

    .venv/bin/python -m benchmarks.bench_activation_checkpointing          # B/16 at 224, batch 8: ~2 min
    .venv/bin/python -m benchmarks.bench_activation_checkpointing --batch 16 --variant S/16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.machine import save
from vit.build import build_model
from vit.config import ViTConfig
from vit.patches import patchify

MIB = 1024 * 1024


def resident_bytes() -> int:
    """This process's resident set now (VmRSS), unlike ru_maxrss which is the peak so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_resident_bytes() -> int:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_step(variant: str, image_size: int, batch: int, checkpointed: bool) -> dict:
    """One forward+backward step in this process: its seconds and the memory it added at its peak."""
    torch.manual_seed(0)
    config = ViTConfig.from_variant(variant, image_size=image_size, num_classes=1000)
    model = build_model(config, device="cpu").train()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    model.set_activation_checkpointing(checkpointed)
    shape = (batch, image_size, image_size, config.channels)
    patches = patchify(torch.randint(0, 256, shape, dtype=torch.uint8), config.patch_size)
    labels = torch.randint(0, config.num_classes, (batch,))
    gc.collect()
    before, peak_before = resident_bytes(), peak_resident_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    F.cross_entropy(model(patches), labels).backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_resident_bytes()
    gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    return {
        "activation_checkpointing": checkpointed,
        "step_s": seconds,
        "step_cpu_s": cpu_seconds,
        "rss_before_step_mib": before / MIB,
        "peak_rss_before_step_mib": peak_before / MIB,
        "peak_rss_mib": peak / MIB,
        "step_peak_mib": (peak - before) / MIB,
        "gradients_mib": gradient_bytes / MIB,
        "step_peak_less_gradients_mib": (peak - before - gradient_bytes) / MIB,
    }


def run_child(args: argparse.Namespace, checkpointed: bool) -> dict:
    """`measure_step` in a fresh interpreter: its own peak RSS, untouched by the other setting's."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_activation_checkpointing",
        "--child",
        "--variant",
        args.variant,
        "--image-size",
        str(args.image_size),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
    ]
    if checkpointed:
        command.append("--checkpointed")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict], checkpointed: bool) -> dict:
    """The median of each measure over one setting's runs."""
    mine = [row for row in rows if row["activation_checkpointing"] == checkpointed]
    keys = ("step_s", "step_cpu_s", "step_peak_mib", "step_peak_less_gradients_mib", "gradients_mib")
    return {key: statistics.median(row[key] for row in mine) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each setting, alternating")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="activation_checkpointing", help="results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_step(args.variant, args.image_size, args.batch, args.checkpointed)))
        return

    load_before = os.getloadavg()
    rows = [run_child(args, checkpointed) for _ in range(args.rounds) for checkpointed in (False, True)]
    plain, checkpointed = summarise(rows, False), summarise(rows, True)
    for name, row in (("off", plain), ("on ", checkpointed)):
        print(
            f"{args.variant}@{args.image_size} batch {args.batch}, checkpointing {name}: "
            f"step {row['step_s']:.1f} s ({row['step_cpu_s']:.1f} CPU s), "
            f"step peak {row['step_peak_mib']:.0f} MiB = {row['gradients_mib']:.0f} of gradients "
            f"+ {row['step_peak_less_gradients_mib']:.0f}"
        )
    ratios = {key: checkpointed[key] / plain[key] for key in plain if key != "gradients_mib"}
    print(
        f"checkpointed / plain: step peak {ratios['step_peak_mib']:.2f}x "
        f"({ratios['step_peak_less_gradients_mib']:.2f}x beyond gradients), "
        f"step time {ratios['step_s']:.2f}x ({ratios['step_cpu_s']:.2f}x CPU)"
    )
    path = save(
        args.name,
        {
            "what": "one fp32 forward+backward step (no optimizer) of a ViT with and without per-block "
            "activation checkpointing, each in a fresh subprocess; step peak = the child's ru_maxrss minus "
            "its RSS just before the step (model and batch built)",
            "variant": args.variant,
            "image_size": args.image_size,
            "batch": args.batch,
            "threads": args.threads,
            "rounds": args.rounds,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "runs": rows,
            "median": {"plain": plain, "checkpointed": checkpointed},
            "checkpointed_over_plain": ratios,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
