"""The prepared GPU check (run by check.sh): ViT pretraining measured the way users run it, in one process
with one Ray. Synthetic Parquet patch shards are written with the project's own writer and manifest, then
each configuration is `pipeline.pretrain.launch.pretrain` (a Ray Train worker, the feed, DeepSpeed ZeRO-2
bf16: what `vitpipe pretrain` runs) and its per-step records are read back from the run's metrics.jsonl.

Sections, in order; the JSON is rewritten as each ends (and as each configuration ends), so a crash or a
timeout still leaves what was measured:
* machine: the device and the versions;
* matmul: a bf16 8192^3 matmul's FLOP/s on the device (mean of 10 after 3), MFU's second denominator;
* host_to_device: pinned and pageable uint8 patch batches copied to the device, as the feed hands them;
* augmentation: the recipe's random resized crop (256 -> 224, flip folded in) and the normalisation;
* data: the synthetic corpus (256 px stored, 16 px patches: the paper's jobs store 256 and crop 224);
* pretrain: ViT-B/16 and ViT-L/16 at 224, torch.compile on/off, activation checkpointing on/off, in
  priority order: images/s (median over the steps after the warmup), MFU against the datasheet bf16 peak
  and against the measured matmul, peak memory, the share of step time spent waiting for data. A global
  deadline (--deadline-s) skips, named with the reason, what would not finish in time, and stops a run
  still going at the deadline the pipeline's own way (finish the step, checkpoint, return);
* nan_check: every bf16 step's loss and gradient norm finite (from the runs' records);
* summary.

`--cpu`: the same script and path on CPUs at toy size (a tiny ViT, two Ray Train workers on gloo); the test
suite runs it (tests/test_gpu_check.py), so the check cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_pretrain import cuda_seconds, measured_bf16_peak
from benchmarks.machine import machine
from pipeline.config import PreprocessConfig, PretrainConfig
from pipeline.info import package_versions
from pipeline.metrics import read_records
from pipeline.patchfile import PatchShardWriter
from pipeline.preprocess.manifest import build_manifest, write_manifest
from pipeline.preprocess.shard import ShardReport
from pipeline.pretrain.control import TrainingStopped
from pipeline.pretrain.launch import pretrain
from pipeline.pretrain.plan import plan_pretrain
from pipeline.ray_session import init_ray
from pipeline.storage import resolve
from vit.config import ViTConfig
from vit.flops import gpu_peak_flops, measured_matmul_flops, train_flops
from vit.model import VisionTransformer
from vit.objective import training_view
from vit.patches import PatchGeometry
from vit.recipe import BatchSplit, Crop, Optimizer, Recipe, Schedule

GOAL_MFU = 0.45  # of the datasheet dense bf16 peak: the goal for ViT-B/16
CROP = {"area": [0.08, 1.0], "aspect": [0.75, 1.333]}  # the paper jobs' Inception crop


@dataclass(frozen=True)
class Configuration:
    """One pretraining run of the check."""

    name: str  # also the run's folder name and what --configs selects
    model: dict[str, Any]  # the job's `model:` section
    global_batch: int
    micro_batch: int
    steps: int
    warmup: int  # first steps left out of the medians (compilation, the first reads)
    compile: bool
    activation_checkpointing: bool
    estimate_s: float  # wall time planned for it until a run of the same model and compile setting is timed

    @property
    def kind(self) -> tuple[str, bool]:
        return json.dumps(self.model, sort_keys=True), self.compile


@dataclass(frozen=True)
class Profile:
    """What the check runs on one kind of machine."""

    device: str  # "cuda" or "cpu"
    stored_size: int  # px of the synthetic images (the model sees crops of image_size)
    image_size: int
    patch_size: int
    classes: int
    images: int
    images_per_file: int
    workers: int
    cpus_per_worker: float
    data_threads: int
    deadline_s: float  # default; check.sh passes what its budget leaves
    configurations: tuple[Configuration, ...]


def _configurations(
    sizes: dict[str, dict[str, Any]], plan: list[tuple[str, str, str, float]]
) -> tuple[Configuration, ...]:
    """`plan`: (name, the sizes it takes, "eager"/"compiled" [+ "+ac"], the seconds planned for it)."""
    return tuple(
        Configuration(
            name,
            **sizes[model],
            compile=mode.startswith("compiled"),
            activation_checkpointing=mode.endswith("+ac"),
            estimate_s=estimate,
        )
        for name, model, mode, estimate in plan
    )


GPU_SIZES = {
    "B/16": {"model": {"variant": "B/16"}, "global_batch": 256, "micro_batch": 128, "steps": 16, "warmup": 3},
    "L/16": {"model": {"variant": "L/16"}, "global_batch": 128, "micro_batch": 64, "steps": 12, "warmup": 3},
}
# Priority order: what the deadline cuts comes last. Seconds planned: the worker group's start, the
# compilation, the steps, the checkpoint and the export (until a run of the same model and mode is timed).
GPU_PLAN = [
    ("b16-eager", "B/16", "eager", 45),
    ("b16-compiled", "B/16", "compiled", 110),
    ("b16-compiled-ac", "B/16", "compiled+ac", 110),
    ("l16-compiled", "L/16", "compiled", 150),
    ("l16-compiled-ac", "L/16", "compiled+ac", 150),
    ("l16-eager", "L/16", "eager", 70),
    ("b16-eager-ac", "B/16", "eager+ac", 45),
    ("l16-eager-ac", "L/16", "eager+ac", 70),
]
CPU_SIZES = {  # 2 ranks x 2 micro-batches of 8 a step
    "tiny": {
        "model": {"patch_size": 8, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64},
        "global_batch": 32,
        "micro_batch": 8,
        "steps": 4,
        "warmup": 1,
    },
}
# Inductor's first compilation of even this model takes over a minute on 2 cores: planned so, the compiled
# runs happen only when a generous --deadline-s leaves the time.
CPU_PLAN = [
    ("tiny-eager", "tiny", "eager", 30),
    ("tiny-eager-ac", "tiny", "eager+ac", 30),
    ("tiny-compiled", "tiny", "compiled", 150),
    ("tiny-compiled-ac", "tiny", "compiled+ac", 150),
]

GPU = Profile(
    "cuda",
    stored_size=256,
    image_size=224,
    patch_size=16,
    classes=1000,
    images=4096,
    images_per_file=512,
    workers=1,
    cpus_per_worker=8,
    data_threads=4,
    deadline_s=240,
    configurations=_configurations(GPU_SIZES, GPU_PLAN),
)
CPU = Profile(
    "cpu",
    stored_size=40,
    image_size=32,
    patch_size=8,
    classes=10,
    images=256,
    images_per_file=128,
    workers=2,
    cpus_per_worker=0.5,
    data_threads=1,
    deadline_s=100,
    configurations=_configurations(CPU_SIZES, CPU_PLAN),
)


# ---------------------------------------------------------------- the results file and the deadline


class Report:
    """The results, rewritten (whole, atomically) after every section and every configuration."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**head, "sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self) -> None:
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(partial, self.path)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        """Runs a section: its results go in the dict it yields; an exception is recorded, not raised, so
        that the sections after it still run."""
        results: dict[str, Any] = {}
        self.data[name] = results
        status = self.data["sections"][name] = {"status": "running"}
        self.write()
        started = time.perf_counter()
        try:
            yield results
            status["status"] = "done"
        except Exception as error:
            traceback.print_exc()
            status |= {"status": "error", "error": f"{type(error).__name__}: {error}"}
        except KeyboardInterrupt:  # a second signal (check.sh's timeout): keep what the section has
            status |= {"status": "interrupted"}
        finally:
            status["seconds"] = round(time.perf_counter() - started, 2)
            self.write()
            print(f"check: {name}: {status['status']} in {status['seconds']} s", flush=True)


class Deadline:
    """Seconds from the check's start; a SIGINT/SIGTERM outside a run (inside one, the launch's own
    handler asks the workers to checkpoint and stop) also ends the check: nothing new starts."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.monotonic()
        self.signalled: str | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signalled = signal.Signals(signum).name

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def why_not(self, estimate_s: float) -> str | None:
        """Why a run of about `estimate_s` must not start now; None when it may."""
        if self.signalled:
            return f"stopped by {self.signalled}"
        if self.left() < estimate_s:
            return f"the deadline: about {estimate_s:.0f} s needed, {max(self.left(), 0):.0f} s left"
        return None

    @contextlib.contextmanager
    def stop_when_due(self) -> Iterator[None]:
        """At the deadline, SIGINT to this process: a running launch checkpoints its step and stops."""
        timer = threading.Timer(max(self.left(), 0.0), os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()


# ---------------------------------------------------------------- device measurements


# What the wheels check.sh installs rely on finding in the machine's image, at a version that suits them.
IMAGE_PACKAGES = ("protobuf", "grpcio", "aiohttp", "packaging", "msgpack", "click", "pandas", "tensorboard")


def seconds_per_call(function: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Mean seconds per call: CUDA events on a GPU (the calls queue asynchronously), wall time on a CPU."""
    if device.type == "cuda":
        return cuda_seconds(function, repeats)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def matmul_peak(device: torch.device) -> dict[str, Any]:
    """bf16 matmul FLOP/s on the device: on a GPU 8192^3, mean of 10 after 3 warm-ups; on a CPU a short
    loop of 512^3 (what `vit.flops` quotes a CPU's MFU against)."""
    if device.type == "cuda":
        flops = measured_bf16_peak(8192)
        torch.cuda.empty_cache()
        return {"bf16_flops": flops, "size": 8192, "repeats": 10, "warmup": 3}
    return {"bf16_flops": measured_matmul_flops(torch.bfloat16, size=512, seconds=0.2), "size": 512}


def host_to_device(device: torch.device, shape: tuple[int, ...], repeats: int = 20) -> dict[str, Any]:
    """GB/s and images/s of uint8 patch batches copied to the device as the feed does (non-blocking), from
    pinned memory (CUDA only) and from pageable memory; on a CPU the copy is a memory copy."""
    out: dict[str, Any] = {"batch": list(shape), "device": device.type}
    for pinned in (True, False) if device.type == "cuda" else (False,):
        batch = torch.randint(0, 256, shape, dtype=torch.uint8)
        batch = batch.pin_memory() if pinned else batch
        copy = functools.partial(batch.to, device, non_blocking=True, copy=True)
        for _ in range(3):
            copy()
        seconds = seconds_per_call(copy, repeats, device)
        out["pinned" if pinned else "pageable"] = {
            "gb_per_s": batch.numel() / seconds / 1e9,
            "images_per_s": shape[0] / seconds,
        }
    return out


def augmentation_cost(
    profile: Profile, micro: int, device: torch.device, repeats: int = 20
) -> dict[str, Any]:
    """ms per micro-batch of the recipe's crop (stored -> model size, flip folded in), of the centre crop
    with flip (the recipe without `crop`) and of the normalisation, on uint8 patches already on the device."""
    size = {
        "image_size": profile.image_size,
        "patch_size": profile.patch_size,
        "num_classes": profile.classes,
    }
    config = ViTConfig(**size, width=8, depth=1, heads=1, mlp_dim=8)
    model = VisionTransformer(config).to(device)  # only its normalisation is timed
    stored = PatchGeometry(profile.stored_size, profile.patch_size, 3)
    patches = torch.randint(0, 256, (micro, *stored.shape), dtype=torch.uint8, device=device)
    batch, stored_size = BatchSplit(micro, micro), profile.stored_size
    crop = Recipe(Optimizer(), Schedule(), 1, batch, crop=Crop(**CROP), input_size=stored_size)
    centre = Recipe(Optimizer(), Schedule(), 1, batch, input_size=stored_size)
    for _ in range(3):
        cropped = training_view(patches, config.geometry, crop)
    return {
        "micro_batch": micro,
        "stored_size": profile.stored_size,
        "image_size": profile.image_size,
        "inception_crop_and_flip_ms": 1e3
        * seconds_per_call(lambda: training_view(patches, config.geometry, crop), repeats, device),
        "centre_crop_and_flip_ms": 1e3
        * seconds_per_call(lambda: training_view(patches, config.geometry, centre), repeats, device),
        "normalise_ms": 1e3 * seconds_per_call(lambda: model.normalize(cropped), repeats, device),
    }


# ---------------------------------------------------------------- data: synthetic patch shards


def write_corpus(profile: Profile, directory: Path) -> dict[str, Any]:
    """`profile.images` labelled images as `vitpipe preprocess` writes them (Parquet patch shards through
    PatchShardWriter, footers, _manifest.json), made of a pool of random images shifted by their labels."""
    started = time.perf_counter()
    config = PreprocessConfig(image_size=profile.stored_size, patch_size=profile.patch_size, channels=3)
    geometry = config.geometry()
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (64, *geometry.shape), dtype=np.uint8)
    filesystem, root = resolve(str(directory))
    filesystem.create_dir(root, recursive=True)
    reports = []
    for first in range(0, profile.images, profile.images_per_file):
        count = min(profile.images_per_file, profile.images - first)
        name = f"synthetic-{first // profile.images_per_file:06d}.parquet"
        labels = rng.integers(0, profile.classes, count)
        patches = pool[rng.integers(0, len(pool), count)] + labels.astype(np.uint8)[:, None, None]
        writer = PatchShardWriter(filesystem, f"{root}/{name}", geometry, name, config.compression)
        for index in range(count):
            writer.add(f"{first + index:08d}", int(labels[index]), patches[index])
        per_class = {
            str(label): int(n) for label, n in zip(*np.unique(labels, return_counts=True), strict=True)
        }
        report = ShardReport(source=name, file=name, samples=count, per_class=per_class)
        writer.close(report.footer(config.output_hash(), None))
        reports.append(report)
    classes = [f"class_{label:04d}" for label in range(profile.classes)]
    write_manifest(filesystem, root, build_manifest(config, "synthetic", classes, reports))
    size = sum(path.stat().st_size for path in directory.glob("*.parquet"))
    return {
        "directory": str(directory),
        "images": profile.images,
        "files": len(reports),
        "stored_size": profile.stored_size,
        "patch_size": profile.patch_size,
        "classes": profile.classes,
        "bytes": size,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- pretraining runs


def job_config(profile: Profile, configuration: Configuration, data: str) -> PretrainConfig:
    """The job's `pretrain:` section of one configuration: ZeRO-2, bf16, the paper jobs' recipe (AdamW at
    1e-3, crop, flip), a record every step, one checkpoint (at the end) and no restarts."""
    return PretrainConfig(
        data=data,
        model=configuration.model,
        num_workers=profile.workers,
        use_gpu=profile.device == "cuda",
        cpus_per_worker=profile.cpus_per_worker,
        data_threads=profile.data_threads,
        image_size=profile.image_size,
        crop=CROP,
        global_batch_size=configuration.global_batch,
        micro_batch_size=configuration.micro_batch,
        steps=configuration.steps,
        zero_stage=2,
        bf16=True,
        compile=configuration.compile,
        activation_checkpointing=configuration.activation_checkpointing,
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.03, "grad_clip": 1.0},
        schedule={"warmup_steps": 4, "decay": "linear"},
        checkpoint_every=configuration.steps,
        keep_checkpoints=1,
        max_failures=0,
        log_every=1,
    )


def run_configuration(
    profile: Profile,
    configuration: Configuration,
    data: str,
    runs: Path,
    peaks: dict[str, float | None],
    deadline: Deadline,
) -> dict[str, Any]:
    """`vitpipe pretrain` of one configuration in this process; its row from the run's records. A run that
    fails (out of memory, say) is a row with its error; the next configuration still runs."""
    row: dict[str, Any] = {**asdict(configuration), "workers": profile.workers, "status": "done"}
    flops_per_image = None
    started = time.perf_counter()
    try:
        config = job_config(profile, configuration, data)
        plan = plan_pretrain(config, data)
        row["model"], flops_per_image = plan.architecture.describe(), train_flops(plan.architecture)
        with deadline.stop_when_due():
            pretrain(plan, storage=str(runs), name=configuration.name)
    except TrainingStopped as stopped:
        row |= {"status": "stopped", "error": str(stopped)}
    except KeyboardInterrupt:  # a second signal while the run checkpointed: its records so far, no more runs
        deadline.signalled = "a second signal"
        row |= {"status": "killed", "error": "stopped again before its checkpoint was written"}
    except Exception as error:
        traceback.print_exc()
        row |= {"status": "error", "error": f"{type(error).__name__}: {error}"}
    row["wall_s"] = time.perf_counter() - started
    run_dir = runs / configuration.name
    records = read_records(str(run_dir))
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints and exports: GBs a run at L/16
    return row | measured(records, configuration, flops_per_image, profile.workers, peaks)


def measured(
    records: list[dict[str, Any]],
    configuration: Configuration,
    flops_per_image: float | None,
    workers: int,
    peaks: dict[str, float | None],
) -> dict[str, Any]:
    """A run's numbers from its metrics.jsonl: medians over the steps after the warmup (all but the first
    when the run stopped sooner), MFU of the group against `peaks` (one device's FLOP/s) x workers."""
    steps = [r for r in records if "images_per_s" in r]
    timed = [r for r in steps if r["step"] > configuration.warmup] or steps[1:] or steps
    events = {r["event"]: r["time"] for r in records if "event" in r}
    out: dict[str, Any] = {
        "steps_done": len(steps),
        "steps_timed": len(timed),
        "train_s": events["finished"] - events["started"]
        if {"started", "finished"} <= events.keys()
        else None,
        "losses": [r["loss"] for r in steps],
        "grad_norms": [r["grad_norm"] for r in steps],
        "skipped_steps": steps[-1].get("skipped_steps") if steps else None,
        "finite": bool(steps) and all(_finite(r.get("loss")) and _finite(r.get("grad_norm")) for r in steps),
    }
    if not timed:
        return out
    rate = statistics.median(r["images_per_s"] for r in timed)
    step_s = sum(r["step_s"] for r in timed)
    memory = [r["peak_memory_gb"] for r in steps if r.get("peak_memory_gb") is not None]
    recorded_mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return out | {
        "images_per_s": rate,
        "step_s": statistics.median(r["step_s"] for r in timed),
        "first_step_s": steps[0]["step_s"],
        **{
            f"mfu_{name}": rate * flops_per_image / (peak * workers) if peak and flops_per_image else None
            for name, peak in peaks.items()
        },
        "mfu_recorded": statistics.median(recorded_mfu) if recorded_mfu else None,
        "peak_memory_gib": max(memory) if memory else None,
        "data_wait_s": statistics.median(r["data_wait_s"] for r in timed),
        "data_wait_share": sum(r["data_wait_s"] for r in timed) / step_s if step_s else None,
    }


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def run_all(
    profile: Profile,
    selected: set[str] | None,
    scratch: Path,
    peaks: dict[str, float | None],
    deadline: Deadline,
    report: Report,
    results: dict[str, Any],
) -> None:
    """Every configuration in priority order on the corpus in `scratch`, or its reason for being skipped; the
    report written after each. A run's time is planned from the last timed run of the same model and compile
    setting."""
    results |= {"ray": init_ray(), "rows": [], "skipped": []}
    timed: dict[tuple[str, bool], float] = {}
    for configuration in profile.configurations:
        if selected is not None and configuration.name not in selected:
            results["skipped"].append({"name": configuration.name, "reason": "not selected (--configs)"})
            continue
        estimate = timed.get(configuration.kind, configuration.estimate_s)
        reason = deadline.why_not(estimate)
        if reason is not None:
            results["skipped"].append({"name": configuration.name, "reason": reason})
            report.write()
            continue
        print(
            f"check: {configuration.name}: about {estimate:.0f} s, {deadline.left():.0f} s left", flush=True
        )
        row = run_configuration(
            profile, configuration, str(scratch / "patches"), scratch / "runs", peaks, deadline
        )
        if row["status"] == "done":
            timed[configuration.kind] = row["wall_s"]
        results["rows"].append(row)
        report.write()
        print(
            "check: " + json.dumps({k: v for k, v in row.items() if k not in ("losses", "grad_norms")}),
            flush=True,
        )


def nan_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every recorded bf16 step of every run: loss and gradient norm finite, no step skipped."""
    trained = [row for row in rows if row.get("steps_done")]
    return {
        "runs": len(trained),
        "steps": sum(row["steps_done"] for row in trained),
        "all_finite": all(row["finite"] for row in trained) if trained else None,
        "skipped_steps": sum(row.get("skipped_steps") or 0 for row in trained),
        "per_run": {
            row["name"]: {
                "first_loss": row["losses"][0],
                "last_loss": row["losses"][-1],
                "max_grad_norm": max((g for g in row["grad_norms"] if g is not None), default=None),
                "finite": row["finite"],
            }
            for row in trained
        },
    }


def summary(rows: list[dict[str, Any]], skipped: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """How the runs ended, each model's fastest configuration, and ViT-B/16's best MFU against the goal."""
    ended = {status: sum(row["status"] == status for row in rows) for status in ("done", "stopped", "error")}
    timed = sorted((row for row in rows if row.get("images_per_s")), key=lambda row: row["images_per_s"])
    fastest = {
        row["model"]: {key: row.get(key) for key in ("name", "images_per_s", "mfu_datasheet")}
        for row in timed
    }
    b16 = [
        row["mfu_datasheet"]
        for row in timed
        if row["name"].startswith("b16") and row.get("mfu_datasheet") is not None
    ]
    return {
        "runs": ended | {"skipped": len(skipped)},
        "fastest_per_model": fastest,
        "b16_best_mfu_datasheet": max(b16, default=None),
        "goal_mfu": GOAL_MFU,
        "meets_goal": max(b16) >= GOAL_MFU if b16 else None,
        "seconds": seconds,
    }


def table(rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> str:
    """The short table the end of the output shows."""

    def number(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [
        f"{'configuration':<18} {'img/s':>8} {'MFU ds':>7} {'MFU mm':>7} {'peak GiB':>8} {'wait':>6} status"
    ]
    for row in rows:
        lines.append(
            f"{row['name']:<18} {number(row.get('images_per_s'), ',.0f'):>8} "
            f"{number(row.get('mfu_datasheet'), '.1%'):>7} "
            f"{number(row.get('mfu_measured_matmul'), '.1%'):>7} "
            f"{number(row.get('peak_memory_gib'), '.1f'):>8} {number(row.get('data_wait_share'), '.1%'):>6} "
            f"{row['status']}" + (f": {row['error'][:60]}" if row.get("error") else "")
        )
    lines += [f"{item['name']:<18} skipped: {item['reason']}" for item in skipped]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the toy-size CPU run the test suite makes")
    parser.add_argument(
        "--out", type=Path, help="the JSON (default: benchmarks/results/gpu_check[_cpu].json)"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="seconds from the start: no run starts that would end later, one still going stops then "
        "(default: 240, --cpu 100)",
    )
    parser.add_argument("--configs", help="comma-separated configuration names to run (default: all)")
    parser.add_argument(
        "--scratch", type=Path, help="where the data and runs go (default: a temporary folder)"
    )
    args = parser.parse_args()
    profile = CPU if args.cpu else GPU
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu/check.sh needs a CUDA GPU (or --cpu)")
    deadline = Deadline(args.deadline_s if args.deadline_s is not None else profile.deadline_s)
    selected = set(args.configs.split(",")) if args.configs else None
    unknown = (selected or set()) - {c.name for c in profile.configurations}
    if unknown:
        raise SystemExit(
            f"unknown configuration(s) {sorted(unknown)}; known: "
            f"{', '.join(c.name for c in profile.configurations)}"
        )
    device = torch.device(profile.device)
    out = (
        args.out
        or Path(__file__).resolve().parents[1] / "results" / f"gpu_check{'_cpu' if args.cpu else ''}.json"
    )
    report = Report(
        out,
        {
            "benchmark": "gpu_check",
            "mode": profile.device,
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "deadline_s": deadline.seconds,
        },
    )
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="vitpipe-gpu-check-"))
    peaks: dict[str, float | None] = {"datasheet": None, "measured_matmul": None}
    try:
        with report.section("machine") as results:
            results |= machine() | {"python": platform.python_version(), "torch": torch.__version__}
            results["image_packages"] = package_versions(IMAGE_PACKAGES)
            if device.type == "cuda":
                results |= {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
                peaks["datasheet"] = gpu_peak_flops(torch.cuda.get_device_name(), bf16=True)
            results["datasheet_bf16_flops"] = peaks["datasheet"]
        with report.section("matmul") as results:
            results |= matmul_peak(device)
            peaks["measured_matmul"] = results["bf16_flops"]
        stored = PatchGeometry(profile.stored_size, profile.patch_size, 3)
        micro = profile.configurations[0].micro_batch
        with report.section("host_to_device") as results:
            results |= host_to_device(device, (micro, *stored.shape))
        with report.section("augmentation") as results:
            results |= augmentation_cost(profile, micro, device)
        with report.section("data") as results:
            results |= write_corpus(profile, scratch / "patches")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what the sections above cached, for the workers
        with report.section("pretrain") as results:
            run_all(profile, selected, scratch, peaks, deadline, report, results)
        rows, skipped = report.data["pretrain"].get("rows", []), report.data["pretrain"].get("skipped", [])
        with report.section("nan_check") as results:
            results |= nan_check(rows)
        with report.section("summary") as results:
            results |= summary(rows, skipped, time.monotonic() - deadline.started)
        print(table(rows, skipped), flush=True)
        print(json.dumps(report.data["summary"]), flush=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"check: {out}", flush=True)


if __name__ == "__main__":
    main()
