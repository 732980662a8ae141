"""What reducing and accumulating gradients in bf16 costs against fp32 (`pretrain.grad_reduce_dtype`), on
two gloo ranks with DeepSpeed ZeRO-2 under bf16: seconds per step, bytes each rank sends per step, and
how far the weights drift from an all-fp32 run of the same steps (bf16 compute alone drifts too, so the
fp32-reduce row is the floor), and the error of summing 64 micro-batches' bf16 gradients in a bf16 against
an fp32 accumulator. On CPUs the wire cost does not show (gloo, shared cores: the step times are noise);
on GPUs the bytes each rank sends halve.

    .venv/bin/python -m benchmarks.bench_grad_reduce      # ~2 minutes on 2 CPUs; results/grad_reduce.json
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from benchmarks.machine import save
from tests.conftest import free_port
from vit.config import ViTConfig
from vit.engine import build_engine, train_micro_batch
from vit.model import VisionTransformer
from vit.objective import step_randomness
from vit.recipe import BatchSplit, Optimizer, Recipe, Schedule, Zero

CONFIG = ViTConfig(image_size=32, patch_size=4, num_classes=10, width=192, depth=4, heads=3, mlp_dim=768)
MICRO, ACCUM, STEPS, WORLD = 8, 8, 12, 2
RECIPE = Recipe(
    Optimizer(lr=1e-3),
    Schedule(warmup_steps=2),
    total_steps=STEPS,
    batch=BatchSplit(MICRO * ACCUM * WORLD, MICRO, WORLD),
    flip=False,
)
RUNS = {
    "fp32 everything": (False, "fp32"),
    "bf16, fp32 reduce": (True, "fp32"),
    "bf16, bf16 reduce": (True, "bf16"),
}


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(
        {
            "DS_ACCELERATOR": "cpu",
            "LOCAL_RANK": str(rank),
            "RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    generator = torch.Generator().manual_seed(rank)
    shape = (ACCUM, MICRO, *CONFIG.geometry.shape)
    data = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CONFIG.num_classes, (ACCUM, MICRO), generator=generator)
    for name, (bf16, reduce_dtype) in RUNS.items():
        torch.manual_seed(0)
        recipe = dataclasses.replace(RECIPE, bf16=bf16)
        zero = Zero(2, grad_reduce_dtype=reduce_dtype)
        engine = build_engine(VisionTransformer(CONFIG), recipe, zero, WORLD)
        seconds = []
        for step in range(STEPS):
            dist.barrier()
            started = time.perf_counter()
            rng = step_randomness(0, rank, step)
            for micro in range(ACCUM):
                train_micro_batch(engine, data[micro], labels[micro], recipe, rng)
            dist.barrier()
            seconds.append(time.perf_counter() - started)
        if rank == 0:
            from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415 (after DS_ACCELERATOR=cpu)

            weights = {
                n: safe_get_full_fp32_param(p).detach().float().contiguous()
                for n, p in engine.module.named_parameters()
            }
            save_file(weights, Path(out) / f"{name}.safetensors")
            (Path(out) / f"{name}.txt").write_text(" ".join(map(str, seconds[2:])))
        else:
            from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415 (after DS_ACCELERATOR=cpu)

            for parameter in engine.module.parameters():
                safe_get_full_fp32_param(parameter)
    dist.destroy_process_group()


def drift(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """|w - w_ref| / |w_ref - w_0|-free relative L2 distance over all weights."""
    num = sum(float((weights[k] - reference[k]).double().pow(2).sum()) for k in reference)
    den = sum(float(reference[k].double().pow(2).sum()) for k in reference)
    return (num / den) ** 0.5


def accumulation_error(micro_batches: int = 64) -> dict[str, float]:
    """Relative error, against an fp64 sum, of summing `micro_batches` real bf16 gradients (the ViT's, one
    per micro-batch) in a bf16 accumulator and in an fp32 one: what accumulation over many micro-batches
    (a global batch of 4,096 on few ranks) loses in bf16."""
    torch.manual_seed(0)
    model = VisionTransformer(CONFIG)
    model.head.reset_parameters()  # a non-zero head, so every layer has a gradient
    exact = None
    sums = {"bf16": None, "fp32": None}
    for micro in range(micro_batches):
        generator = torch.Generator().manual_seed(micro)
        shape = (MICRO, *CONFIG.geometry.shape)
        patches = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, CONFIG.num_classes, (MICRO,), generator=generator)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(patches), labels).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()]).bfloat16()
        exact = grad.double() if exact is None else exact + grad.double()
        for dtype, total in sums.items():
            wanted = torch.bfloat16 if dtype == "bf16" else torch.float32
            sums[dtype] = grad.to(wanted) if total is None else total + grad.to(wanted)
    return {
        f"{dtype}_relative_error": float((total.double() - exact).norm() / exact.norm())
        for dtype, total in sums.items()
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_rank, args=(free_port(), out), nprocs=WORLD, join=True)
        reference = load_file(Path(out) / "fp32 everything.safetensors")
        parameters = sum(t.numel() for t in reference.values())
        rows = {}
        for name, (_bf16, reduce_dtype) in RUNS.items():
            seconds = [float(s) for s in (Path(out) / f"{name}.txt").read_text().split()]
            rows[name] = {
                "step_s_median": statistics.median(seconds),
                "reduced_bytes_per_step": parameters * (4 if reduce_dtype == "fp32" else 2),
                "drift_from_fp32": drift(load_file(Path(out) / f"{name}.safetensors"), reference),
            }
    results = {
        "what": f"ZeRO-2, {WORLD} gloo ranks on one CPU each, ViT width 192 depth 4 at 32 px "
        f"({parameters:,} parameters), {ACCUM} micro-batches of {MICRO} per step, {STEPS} steps (first 2 "
        "untimed); drift: relative L2 distance of the final fp32 weights from the all-fp32 run's",
        "rows": rows,
        "bf16_reduce_time_ratio": rows["bf16, bf16 reduce"]["step_s_median"]
        / rows["bf16, fp32 reduce"]["step_s_median"],
        "accumulation_of_64_micro_batches": accumulation_error(),
    }
    path = save("grad_reduce", results)
    for name, row in rows.items():
        print(
            f"{name:20s} {row['step_s_median']:.3f} s/step, {row['reduced_bytes_per_step'] / 1e6:.1f} MB "
            f"reduced, drift {row['drift_from_fp32']:.2e}"
        )
    print(results["accumulation_of_64_micro_batches"], path)


if __name__ == "__main__":
    main()
