"""Training-step throughput of vitpipe's ViT against HF transformers' ViT, and against this machine's peak.

One step = forward + backward + AdamW update on a batch, fp32. The two models have identical shapes and
are timed interleaved (vitpipe, HF, vitpipe, HF, ...) so that drift of the machine hits both alike; the
median over rounds is reported. Achieved GFLOP/s uses vitpipe's analytic count (3x forward FLOPs) for
both, divided by the best GFLOP/s of a large fp32 matmul measured in the same run. The speedup is the
median of per-round ratios (each round's two steps ran back to back), with its range: on a shared
virtual machine single steps vary by +-15%, so the range says how far to trust the median.

    .venv/bin/python -m benchmarks.bench_model            # Ti/16 and S/16 at 224, batch 32
    .venv/bin/python -m benchmarks.bench_model --variants Ti/16 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers

from benchmarks.machine import save
from vit.config import ViTConfig
from vit.flops import train_flops
from vit.hf import hf_config_dict
from vit.model import VisionTransformer
from vit.patches import patchify


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 6) -> dict:
    """Best fp32 GFLOP/s of square matmuls: the ceiling a training step is measured against."""
    by_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        by_size[n] = 2 * n**3 / min(times) / 1e9
    return {"gflops": max(by_size.values()), "by_size": by_size}


def make_batch(config: ViTConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same images as vitpipe's uint8 patches and as HF's normalised [B, C, H, W] floats."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, config.image_size, config.image_size, config.channels)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    mean, std = torch.tensor(config.mean), torch.tensor(config.std)
    pixels = ((images.float() / 255 - mean) / std).permute(0, 3, 1, 2).contiguous()
    labels = torch.randint(0, config.num_classes, (batch,), generator=generator)
    return patchify(images, config.patch_size), pixels, labels


def training_step(
    model: torch.nn.Module, forward: Callable[[], torch.Tensor], labels: torch.Tensor
) -> Callable:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(forward(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def hf_model(config: ViTConfig) -> torch.nn.Module:
    fields = {k: v for k, v in hf_config_dict(config).items() if k != "architectures"}
    return transformers.ViTForImageClassification(transformers.ViTConfig(**fields))


def bench_variant(name: str, image_size: int, batch: int, rounds: int, warmup: int) -> dict:
    config = ViTConfig.from_variant(name, image_size=image_size, num_classes=1000)
    patches, pixels, labels = make_batch(config, batch)
    ours = VisionTransformer(config)
    theirs = hf_model(config)
    # A zero head gives zero gradients to the backbone on the first step; both start from a random head.
    torch.nn.init.normal_(ours.head.weight, std=0.02)
    steps = {
        "vitpipe": training_step(ours, lambda: ours(patches), labels),
        "hf": training_step(theirs, lambda: theirs(pixel_values=pixels).logits, labels),
    }
    times: dict[str, list[float]] = {key: [] for key in steps}
    for round_index in range(warmup + rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[key].append(elapsed)
    flops = train_flops(config) * batch
    result = {
        "config": config.to_dict(),
        "batch": batch,
        "train_gflop_per_step": flops / 1e9,
        "hf_attention": theirs.config._attn_implementation,
    }
    for key, seconds in times.items():
        median = statistics.median(seconds)
        result[key] = {
            "step_s": seconds,
            "median_step_s": median,
            "images_per_s": batch / median,
            "gflops": flops / median / 1e9,
        }
    ratios = [theirs / ours for ours, theirs in zip(times["vitpipe"], times["hf"], strict=True)]
    result["speedup_vs_hf"] = statistics.median(ratios)
    result["speedup_vs_hf_range"] = [min(ratios), max(ratios)]
    return result


def cpu_steal_ticks() -> int:
    """Ticks the hypervisor gave this VM's CPUs to someone else (the 8th field of /proc/stat's cpu line)."""
    try:
        with open("/proc/stat") as stat:
            return int(stat.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["Ti/16", "S/16"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--name", default="model", help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    steal_start, wall_start = cpu_steal_ticks(), time.perf_counter()
    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak['gflops']:.1f} GFLOP/s ({args.threads} threads)")
    results = {}
    for name in args.variants:
        result = bench_variant(name, args.image_size, args.batch, args.rounds, args.warmup)
        for key in ("vitpipe", "hf"):
            result[key]["fraction_of_peak"] = result[key]["gflops"] / peak["gflops"]
        results[name] = result
        print(
            f"{name}@{args.image_size} batch {args.batch}: "
            + ", ".join(
                f"{key} {result[key]['images_per_s']:.2f} img/s "
                f"({result[key]['gflops']:.1f} GFLOP/s, {result[key]['fraction_of_peak']:.0%} of peak)"
                for key in ("vitpipe", "hf")
            )
            + f"; vitpipe/HF {result['speedup_vs_hf']:.3f}x (rounds "
            + f"{result['speedup_vs_hf_range'][0]:.2f}-{result['speedup_vs_hf_range'][1]:.2f})"
        )
    wall = time.perf_counter() - wall_start
    steal = (cpu_steal_ticks() - steal_start) / os.sysconf("SC_CLK_TCK") / (wall * (os.cpu_count() or 1))
    print(f"CPU time stolen by the hypervisor during the run: {steal:.1%}")
    path = save(
        args.name,
        {
            "what": "fp32 training step (forward+backward+AdamW), vitpipe vs HF ViTForImageClassification, "
            "interleaved, median of rounds",
            "threads": args.threads,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "matmul_peak": peak,
            "cpu_steal_fraction": steal,
            "variants": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
