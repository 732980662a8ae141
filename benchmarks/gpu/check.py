"""The prepared GPU check (run by check.sh): on one GPU with no Ray and no network, in one process.

* B/16 at 224, bf16: vitpipe's DeepSpeed ZeRO-2 engine step (the one each Ray worker runs), compiled
  and not, beside a plain autocast + fused AdamW loop (benchmarks.bench_pretrain.gpu_section); MFU
  against the datasheet bf16 peak and a bf16 matmul measured in the same run;
* a NaN check: the engine's bf16 steps at the recipe's rate on real-looking data stay finite;
* the device augmentation's cost (random resized crop 256 -> 224 with its flip, normalisation) per
  micro-batch, beside the step it feeds;
* host-to-device rate of pinned uint8 patch batches (what the feed hands each GPU worker).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_pretrain import cuda_seconds, gpu_section, plain_recipe
from vit.config import ViTConfig
from vit.model import VisionTransformer
from vit.recipe import Crop, Zero
from vit.step import training_view

GOAL_MFU = 0.45  # of the datasheet dense bf16 peak (the goal for ViT-B/16)


def nan_check(micro: int, steps: int) -> dict[str, Any]:
    """The engine's bf16 ZeRO-2 steps on smooth random images at lr 1e-3 (AdamW, warmup 5): every loss
    and gradient norm finite, and the loss moving."""
    from vit.engine import build_engine, set_step_lr, train_micro_batch

    torch.manual_seed(0)
    config = ViTConfig.from_variant("B/16", image_size=224, num_classes=10)
    engine = build_engine(VisionTransformer(config).cuda(), plain_recipe(steps, micro, bf16=True), Zero(2), 1)
    recipe = plain_recipe(steps, micro, bf16=True)
    generator = torch.Generator(device="cuda").manual_seed(1)
    labels = torch.randint(0, 10, (micro,), device="cuda", generator=generator)
    # Images whose mean brightness is the label: learnable, so a broken step shows as a flat loss.
    base = (labels.float() * 25).view(-1, 1, 1) + torch.randn(
        micro, *config.geometry.shape, device="cuda"
    ) * 20
    patches = base.clamp(0, 255).to(torch.uint8)
    rng, losses, norms = np.random.default_rng(0), [], []
    for step in range(steps):
        set_step_lr(engine, recipe, step)
        result = train_micro_batch(engine, patches, labels, recipe, rng)
        losses.append(float(result.loss))
        norm = engine.get_global_grad_norm()
        norms.append(float(norm) if norm is not None else float("nan"))
    finite = all(math.isfinite(v) for v in losses + norms)
    return {"steps": steps, "micro_batch": micro, "all_finite": finite, "first_loss": losses[0],
            "last_loss": losses[-1], "max_grad_norm": max(norms)}  # fmt: skip


def augmentation_cost(micro: int, repeats: int = 20) -> dict[str, Any]:
    """ms per micro-batch of the recipe's crop (256 -> 224 / patch 16, flip folded in) and of the
    normalisation, on uint8 patches already on the GPU."""
    from vit.recipe import Optimizer, Recipe, Schedule

    model = VisionTransformer(ViTConfig.from_variant("B/16", image_size=224, num_classes=10)).cuda()
    stored = torch.randint(0, 256, (micro, 256, 768), dtype=torch.uint8, device="cuda")
    geometry = model.config.geometry
    crop = Recipe(Optimizer(), Schedule(), 1, micro, crop=Crop(), input_size=256)
    centre = Recipe(Optimizer(), Schedule(), 1, micro, input_size=256)
    for _ in range(3):
        cropped = training_view(stored, geometry, crop)
    return {
        "micro_batch": micro,
        "inception_crop_and_flip_ms": cuda_seconds(lambda: training_view(stored, geometry, crop), repeats)
        * 1e3,
        "centre_crop_and_flip_ms": cuda_seconds(lambda: training_view(stored, geometry, centre), repeats)
        * 1e3,
        "normalise_ms": cuda_seconds(lambda: model.normalize(cropped), repeats) * 1e3,
    }


def host_to_device(micro: int, repeats: int = 20) -> dict[str, Any]:
    """GB/s and images/s of pinned uint8 224/16 patch batches copied to the GPU (non-blocking, as the feed
    does), beside pageable memory."""
    out = {}
    for pinned in (True, False):
        batch = torch.randint(0, 256, (micro, 196, 768), dtype=torch.uint8).pin_memory() if pinned else (
            torch.randint(0, 256, (micro, 196, 768), dtype=torch.uint8))  # fmt: skip
        for _ in range(3):
            batch.to("cuda", non_blocking=True)
        seconds = cuda_seconds(lambda b=batch: b.to("cuda", non_blocking=True), repeats)
        out["pinned" if pinned else "pageable"] = {"gb_per_s": batch.numel() / seconds / 1e9,
                                                   "images_per_s": micro / seconds}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--micro-batches", default="128,256")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu/check.sh needs a CUDA GPU")
    started = time.perf_counter()
    micro = [int(m) for m in args.micro_batches.split(",")]
    results: dict[str, Any] = {
        "benchmark": "gpu_check",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "device": torch.cuda.get_device_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
    }
    results["step"] = gpu_section("B/16", micro, args.steps, warmup=8)  # starts the process group
    print(json.dumps(results["step"]["rows"]), flush=True)
    results["augmentation"] = augmentation_cost(max(micro))
    results["host_to_device"] = host_to_device(max(micro))
    results["nan_check"] = _with_group(nan_check, max(micro) // 2, 60)
    best = max((r.get("mfu_datasheet") or 0 for r in results["step"]["rows"]), default=0)
    results["summary"] = {"best_mfu_datasheet": best, "goal": GOAL_MFU, "meets_goal": best >= GOAL_MFU,
                          "finite": results["nan_check"]["all_finite"],
                          "seconds": time.perf_counter() - started}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"]), flush=True)


def _with_group(function: Any, *args: Any) -> Any:
    """Run `function` inside a one-rank NCCL group (gpu_section ends its own)."""
    import torch.distributed as dist

    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        return function(*args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
