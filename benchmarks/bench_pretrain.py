"""Pretraining step throughput: the full Ray Train + DeepSpeed step against a plain PyTorch loop, ZeRO
stages side by side, and (when a GPU is present) ViT-B/16 bf16 ZeRO-2 MFU.

CPU section, one run, on the embedded fractal corpus preprocessed to 32px / patch 4:
  * plain: one process, the same model, batch, data (already in memory: the baseline's best case), the
    same math (flip, normalisation, soft-target cross-entropy, AdamW on the same groups, clipping, LR
    schedule), with as many threads as the Ray Train worker gets. Timed in rounds alternating with the
    1-worker Ray run (`--rounds`, 3 by default); the medians are compared.
  * ray+deepspeed, 1 worker: `pipeline.pretrain.launch.pretrain`, exactly what `vitpipe pretrain` runs;
    its per-step images/s from the run's metrics (each step's wall time, data wait included).
  * ZeRO 0-3 with 2 workers on one node, same model and per-worker batch.
  * ZeRO-2 with 2 workers, each reading its rows from the files every epoch (the only data path), with its
    epoch-boundary waits.
Reported: median images/s over the steps after warm-up, and the overhead 1 - ray/plain.

GPU section (CUDA only): one process, one GPU, `vit.engine.build_engine` (the engine each Ray worker
builds) on ViT-B/16 at 224, bf16, ZeRO-2, on random uint8 patches already on the GPU; against a plain
bf16-autocast PyTorch loop with fused AdamW. MFU = 3x forward FLOPs x images/s over the datasheet peak,
and over a bf16 matmul measured in the same run: the DeepSpeed step without Ray (the CPU section measures
Ray's share; benchmarks/gpu/check.sh measures the whole path on a GPU, Ray included).

    .venv/bin/python -m benchmarks.bench_pretrain                   # CPU section -> results/pretrain.json
    python -m benchmarks.bench_pretrain --gpu-only --out gpu.json   # GPU section alone (no Ray needed)
    .venv/bin/python -m benchmarks.bench_pretrain --merge-gpu gpu.json   # add a GPU run to the results
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from benchmarks.machine import RESULTS, save
from pipeline.config import FractalsConfig, PreprocessConfig, PretrainConfig
from pipeline.datasets.fractals import build_fractals
from pipeline.metrics import read_records
from pipeline.patchfile import patches_array
from pipeline.preprocess.run import preprocess
from pipeline.pretrain.launch import pretrain
from pipeline.pretrain.plan import plan_data, plan_pretrain
from pipeline.ray_session import init_ray
from vit.config import ViTConfig
from vit.device import enable_tf32
from vit.engine import build_engine, train_micro_batch
from vit.flops import gpu_peak_flops, train_flops
from vit.model import VisionTransformer
from vit.objective import make_optimizer, set_lr, training_loss
from vit.recipe import BatchSplit, Optimizer, Recipe, Schedule, Zero

CPU_MODEL = {"patch_size": 4, "width": 128, "depth": 4, "heads": 4, "mlp_dim": 512}
CPU_IMAGE, CPU_PATCH, MICRO = 32, 4, 32
RESULTS_NAME = "pretrain"


# ---------------------------------------------------------------- plain PyTorch baseline (CPU and GPU)


def plain_recipe(steps: int, micro: int, bf16: bool = False) -> Recipe:
    """The recipe both sides train with: AdamW, warmup + cosine, clipping, flips (the pretrain defaults)."""
    optimizer = Optimizer(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, grad_clip=1.0)
    batch = BatchSplit(micro, micro)
    return Recipe(optimizer, Schedule(warmup_steps=5), total_steps=steps, batch=batch, bf16=bf16)


def plain_step(
    model: VisionTransformer,
    optimizer: torch.optim.Optimizer,
    recipe: Recipe,
    step: list[int],
    patches: torch.Tensor,
    labels: torch.Tensor,
    rng: np.random.Generator,
) -> float:
    """One training step the way a single-process PyTorch script writes it around vitpipe's step
    (`vit.objective.training_loss`): rate, forward under autocast, backward, clipping, update."""
    set_lr(optimizer, recipe.lr_at(step[0]))
    with torch.autocast(patches.device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
        loss = training_loss(model, patches, labels, recipe, rng).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optimizer.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step[0] += 1
    return float(loss.detach())


def median_rate(step_seconds: list[float], images: int) -> float:
    return images / statistics.median(step_seconds)


# ---------------------------------------------------------------- CPU section: Ray Train + DeepSpeed


def cpu_corpus(root: Path) -> str:
    """The fractal corpus (10 classes x 120 images), preprocessed to 32px / patch 4."""
    build_fractals(FractalsConfig(classes=10, per_class=120, size=CPU_IMAGE, shard_size=200), root / "raw")
    preprocess(
        str(root / "raw"), str(root / "patches"), PreprocessConfig(image_size=CPU_IMAGE, patch_size=CPU_PATCH)
    )
    return str(root / "patches")


def load_patches(directory: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every training patch and label in memory, read from the same files the Ray run reads."""
    plan = plan_data(PretrainConfig(data=directory), directory)
    tables = [pq.read_table(path, columns=["patches", "label"]) for path in plan.files]
    patches = np.concatenate([patches_array(t.column("patches"), plan.geometry) for t in tables])
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    return torch.from_numpy(patches.copy()), torch.from_numpy(labels.astype(np.int64)), len(plan.classes)


def cpu_plain(directory: str, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    patches, labels, classes = load_patches(directory)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = VisionTransformer(cpu_vit_config(classes))
        recipe = plain_recipe(steps + warmup, MICRO)
        optimizer = make_optimizer(model, recipe.optimizer)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        seconds, position, rng = [], [0], np.random.default_rng(0)
        for step in range(warmup + steps):
            index = order[(step * MICRO) % (len(order) - MICRO) :][:MICRO]
            started = time.perf_counter()
            plain_step(model, optimizer, recipe, position, patches[index], labels[index], rng)
            if step >= warmup:
                seconds.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    return {"images_per_s": median_rate(seconds, MICRO), "steps": steps, "threads": threads}


def cpu_vit_config(classes: int) -> ViTConfig:
    size = {k: v for k, v in CPU_MODEL.items() if k != "patch_size"}
    return ViTConfig(image_size=CPU_IMAGE, patch_size=CPU_PATCH, num_classes=classes, **size)


def cpu_ray(
    directory: str,
    storage: Path,
    name: str,
    *,
    workers: int,
    zero: int,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """`vitpipe pretrain` in this process; per-step images/s read back from the run's metrics."""
    config = PretrainConfig(
        data=directory,
        model=CPU_MODEL,
        num_workers=workers,
        cpus_per_worker=1.0 / workers,
        global_batch_size=MICRO * workers,
        micro_batch_size=MICRO,
        steps=steps + warmup,
        zero_stage=zero,
        checkpoint_every=10_000,
        log_every=1,
        shuffle_buffer=256,
    )
    started = time.perf_counter()
    result = pretrain(plan_pretrain(config, directory), storage=str(storage.absolute()), name=name)
    wall = time.perf_counter() - started
    records = read_records(result.run_dir)
    timed = [r for r in records if "images_per_s" in r and r["step"] > warmup]
    threads = next(r["threads"] for r in records if r.get("event") == "started")
    events = {r["event"]: r["time"] for r in records if "event" in r}
    logged = [r for r in records if "images_per_s" in r]
    epoch_starts = [b["data_wait_s"] for a, b in itertools.pairwise(logged) if b["epoch"] != a["epoch"]]
    return {
        "images_per_s": statistics.median(r["images_per_s"] for r in timed),
        "step_s": statistics.median(r["step_s"] for r in timed),
        "data_wait_s": statistics.median(r["data_wait_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "steps": len(timed),
        "workers": workers,
        "threads_per_worker": threads,
        "zero_stage": zero,
        "wall_s_including_start_checkpoint_export": wall,
        "train_s_first_to_last_step": events["finished"] - events["started"],
        "epoch_start_wait_s": statistics.median(epoch_starts) if epoch_starts else None,
        "first_step_data_wait_s": logged[0]["data_wait_s"] if logged else None,
    }


def cpu_section(steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    print(init_ray())
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as scratch:
        root = Path(scratch)
        data = cpu_corpus(root)
        runs = root / "runs"
        # The 1-worker Ray Train run and the plain loop alternate, so that the VM's drift over the run
        # (seen here: the plain loop alone moving 8-15% within minutes) falls on both alike.
        ray_rounds, plain_rounds = [], []
        for index in range(rounds):
            ray_rounds.append(
                cpu_ray(data, runs, f"ray-1w-{index}", workers=1, zero=0, steps=steps, warmup=warmup)
            )
            plain_rounds.append(cpu_plain(data, steps, warmup, ray_rounds[-1]["threads_per_worker"]))
        zero = [
            cpu_ray(data, runs, f"zero{stage}", workers=2, zero=stage, steps=steps, warmup=warmup)
            for stage in range(4)
        ]
        reads = cpu_ray(data, runs, "epoch-reads", workers=2, zero=2, steps=steps, warmup=warmup)
    one = statistics.median(r["images_per_s"] for r in ray_rounds)
    plain = statistics.median(r["images_per_s"] for r in plain_rounds)
    return {
        "model": {**CPU_MODEL, "image_size": CPU_IMAGE, "patch_size": CPU_PATCH},
        "micro_batch_per_worker": MICRO,
        "warmup_steps": warmup,
        "rounds": rounds,
        "plain_pytorch": {"rounds": plain_rounds, "images_per_s": plain},
        "ray_train_deepspeed_1_worker": {"rounds": ray_rounds, "images_per_s": one},
        "overhead_1_worker": 1 - one / plain,
        "zero_stages_2_workers": {f"zero{z['zero_stage']}": z for z in zero},
        "files_read_each_epoch_2_workers_zero2": reads,
    }


# ---------------------------------------------------------------- GPU section: ViT-B/16 bf16 ZeRO-2


def cuda_seconds(function: Any, repeats: int) -> float:
    """Mean seconds per call, timed with CUDA events around `repeats` back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def measured_bf16_peak(size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    return 2 * size**3 / cuda_seconds(lambda: a @ b, 10)


def gpu_section(variant: str, micro_batches: list[int], steps: int, warmup: int) -> dict[str, Any]:
    # DeepSpeed (2.5 s, and it picks its accelerator when imported) only where it runs: gpu/check.py and
    # the CPU sections import this module too
    import deepspeed  # noqa: PLC0415

    # What Ray Train sets in each worker (DeepSpeed asserts LOCAL_RANK), for one process on one GPU.
    for name, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29531",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        os.environ.setdefault(name, value)
    dist.init_process_group("nccl", rank=0, world_size=1)
    enable_tf32(torch.device("cuda"))
    name = torch.cuda.get_device_name()
    datasheet = gpu_peak_flops(name, bf16=True)
    measured = measured_bf16_peak()
    rows = []
    for micro in micro_batches:
        config = ViTConfig.from_variant(variant, image_size=224, num_classes=1000)
        flops = train_flops(config) * micro
        generator = torch.Generator(device="cuda").manual_seed(0)
        patches = torch.randint(
            0,
            256,
            (micro, *config.geometry.shape),
            dtype=torch.uint8,
            device="cuda",
            generator=generator,
        )
        labels = torch.randint(0, 1000, (micro,), device="cuda", generator=generator)
        for mode in ("deepspeed_zero2_bf16", "plain_autocast_bf16", "deepspeed_zero2_bf16_compiled"):
            torch.manual_seed(0)
            model = VisionTransformer(config).cuda()
            if mode.startswith("deepspeed"):
                recipe = plain_recipe(10_000, micro, bf16=True)
                engine = build_engine(model, recipe, Zero(2), world_size=1)
                if mode.endswith("compiled"):  # what torch.compile would add; the pipeline does not compile
                    engine.compile()
                rng = np.random.default_rng(0)
                step = functools.partial(train_micro_batch, engine, patches, labels, recipe, rng)
            else:
                recipe = plain_recipe(10_000, micro, bf16=True)
                optimizer = make_optimizer(model, recipe.optimizer)
                rng = np.random.default_rng(0)
                step = functools.partial(plain_step, model, optimizer, recipe, [0], patches, labels, rng)
            try:
                for _ in range(warmup):
                    step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                seconds = cuda_seconds(step, steps)
            except Exception as error:
                rows.append({"mode": mode, "micro_batch": micro, "error": f"{type(error).__name__}: {error}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            rate = micro / seconds
            rows.append(
                {
                    "mode": mode,
                    "micro_batch": micro,
                    "images_per_s": rate,
                    "step_s": seconds,
                    "mfu_datasheet": flops / seconds / datasheet if datasheet else None,
                    "mfu_measured_matmul": flops / seconds / measured,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            del model, step
            engine = optimizer = None
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    return {
        "device": name,
        "variant": variant,
        "image_size": 224,
        "steps_timed": steps,
        "warmup_steps": warmup,
        "datasheet_bf16_flops": datasheet,
        "measured_bf16_matmul_flops": measured,
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "python": platform.python_version(),
        },
        "rows": rows,
    }


# ---------------------------------------------------------------- entry point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per CPU run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating 1-worker Ray / plain rounds")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU section; no Ray needed")
    parser.add_argument("--out", help="with --gpu-only: where to write the GPU section's JSON")
    parser.add_argument("--merge-gpu", help="add a GPU section's JSON (from --gpu-only) to the results")
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--micro-batches", default="128,256")
    args = parser.parse_args()

    if args.gpu_only:
        gpu = gpu_section(args.variant, [int(m) for m in args.micro_batches.split(",")], 30, 10)
        Path(args.out or "gpu.json").write_text(json.dumps(gpu, indent=2) + "\n")
        return

    previous = RESULTS / f"{RESULTS_NAME}.json"
    if args.merge_gpu:  # the CPU run keeps its own time and machine; the GPU section carries its own
        results = json.loads(previous.read_text())
        results["gpu"] = json.loads(Path(args.merge_gpu).read_text())
        previous.write_text(json.dumps(results, indent=2) + "\n")
        print(previous)
        return
    results: dict[str, Any] = {"cpu": cpu_section(args.steps, args.warmup, args.rounds)}
    if torch.cuda.is_available():
        results["gpu"] = gpu_section(args.variant, [int(m) for m in args.micro_batches.split(",")], 30, 10)
    elif previous.is_file() and "gpu" in (old := json.loads(previous.read_text())):
        results["gpu"] = old["gpu"]  # kept from the GPU run, which has its own device and versions
    print(json.dumps(results, indent=2))
    print(save(RESULTS_NAME, results))


if __name__ == "__main__":
    main()
