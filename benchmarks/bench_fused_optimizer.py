"""torch's fused AdamW against its per-tensor (foreach) loop on the CPU, the optimizer step alone over a
ViT-S/16's parameters in vitpipe's decay/no-decay groups: the engine uses the fused one on every device
(issue 38: keep it on the CPU if it is not slower there).

    .venv/bin/python -m benchmarks.bench_fused_optimizer      # ~20 s; results/fused_optimizer.json
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.machine import save
from vit.config import ViTConfig
from vit.model import VisionTransformer
from vit.objective import param_groups

ROUNDS, STEPS = 3, 10


def step_ms(model: torch.nn.Module, fused: bool) -> float:
    """Mean ms of one AdamW step after three warm-up steps."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=fused, foreach=not fused)
    for _ in range(3):
        optimizer.step()
    started = time.perf_counter()
    for _ in range(STEPS):
        optimizer.step()
    return (time.perf_counter() - started) / STEPS * 1e3


def main() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.from_variant("S/16", image_size=224, num_classes=1000))
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    times: dict[str, list[float]] = {"foreach": [], "fused": []}
    for _ in range(ROUNDS):  # alternated, so drift in the machine's speed hits both alike
        for name in times:
            times[name].append(step_ms(model, fused=name == "fused"))
    medians = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "benchmark": "fused_optimizer",
        "what": "AdamW step over ViT-S/16 parameters (22M), CPU, fp32, torch threads "
        f"{torch.get_num_threads()}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_ms": times,
        "median_ms": medians,
        "fused_speedup": medians["foreach"] / medians["fused"],
    }
    path = save("fused_optimizer", results)
    print(
        f"foreach {medians['foreach']:.1f} ms, fused {medians['fused']:.1f} ms "
        f"({results['fused_speedup']:.1f}x) -> {path}"
    )


if __name__ == "__main__":
    main()
