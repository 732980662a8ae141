"""When and why bf16 BiT learned ~10x slower than fp32, and that it no longer does (issue 28, part 2).

Two measurements, each with BiT's convolutions as they were (bf16 arithmetic throughout, "before") and as
they are (on CPUs, bf16 weights and activations with fp32 convolution arithmetic, "after"):

1. Gradient agreement: per-layer cosine of a bf16 model's gradient against fp32's at the same weights
   (reached by a few fp32 AdamW steps at each lr), across lr, depth and image size; how often a bf16
   backward gives a non-finite gradient; and, as the noise floor, fp64's gradient at weights perturbed by
   1e-3 (bf16's rounding is ~4e-3), which says how much of the disagreement is the function's own
   sensitivity rather than bf16's arithmetic.
2. Training: DeepSpeed engines (one-rank gloo, DeepSpeed's CPU accelerator) from the same seed, bf16 against
   fp32, at ZeRO 0, 2 and 3: final losses and the steps DeepSpeed skipped; the ViT the same.

    .venv/bin/python -m benchmarks.bench_bf16           # ~3 minutes on 2 CPUs; results/bf16.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import socket
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.machine import save
from vit import bit
from vit.bit import ResNetV2, StdConv2d
from vit.config import Architecture, BiTConfig, ViTConfig
from vit.engine import build_engine, train_micro_batch
from vit.model import VisionTransformer
from vit.objective import training_loss
from vit.recipe import BatchSplit, Optimizer, Recipe, Schedule, Zero

BATCH = 8
CLASSES = 5


def bit_config(**changes) -> BiTConfig:
    base = {
        "image_size": 16,
        "patch_size": 4,
        "num_classes": CLASSES,
        "depth": 26,
        "base_width": 8,
        "groups": 8,
    }
    return BiTConfig(**{**base, **changes})


VIT = ViTConfig(image_size=16, patch_size=4, num_classes=CLASSES, width=32, depth=2, heads=2, mlp_dim=64)


def _bf16_conv_arithmetic(self: StdConv2d, x: torch.Tensor) -> torch.Tensor:
    """StdConv2d.forward as it was before the fix: the convolution in the input's dtype on every device."""
    return F.conv2d(x, bit.standardize_weight(self.weight), None, self.stride, self.padding)


@contextlib.contextmanager
def convolutions(kind: str) -> Iterator[None]:
    """BiT's convolutions 'after' (as vit/bit.py has them) or 'before' the fix."""
    if kind == "after":
        yield
        return
    fixed = StdConv2d.forward
    StdConv2d.forward = _bf16_conv_arithmetic
    try:
        yield
    finally:
        StdConv2d.forward = fixed


def batch(config: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    patches = torch.randint(0, 256, (BATCH, *config.geometry.shape), dtype=torch.uint8, generator=generator)
    return patches, torch.arange(BATCH) % CLASSES


def recipe(lr: float, steps: int, bf16: bool = False) -> Recipe:
    return Recipe(
        Optimizer(lr=lr),
        Schedule(warmup_steps=0),
        total_steps=steps,
        batch=BatchSplit(BATCH, BATCH),
        bf16=bf16,
    )


# ---------------------------------------------------------------- gradient agreement


def gradients(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight-matrix gradients of one training loss (flips drawn from a fixed seed), in fp64."""
    torch.manual_seed(5)  # the training view's flips come from torch's generator: the same for every dtype
    model.zero_grad()
    training_loss(model, *data, recipe(1e-3, 1), np.random.default_rng(0)).loss.backward()
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.ndim > 1}


def cosines(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    values = [
        float(F.cosine_similarity(reference[n].flatten(), other[n].flatten(), dim=0)) for n in reference
    ]
    finite = [v for v in values if np.isfinite(v)]
    return {
        "stem": values[0],
        "min": min(finite) if finite else float("nan"),
        "median": float(np.median(finite)) if finite else float("nan"),
        "non_finite_layers": len(values) - len(finite),
    }


def trained(make: Callable[[], torch.nn.Module], lr: float, steps: int) -> torch.nn.Module:
    """A model a few fp32 AdamW steps from init (a zero head gives the body no gradient at step 0)."""
    torch.manual_seed(0)
    model = make()
    data = batch(model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        torch.manual_seed(1)
        optimizer.zero_grad()
        training_loss(model, *data, recipe(lr, steps), np.random.default_rng(0)).loss.backward()
        optimizer.step()
    return model


def agreement(label: str, make: Callable[[], torch.nn.Module], lr: float, tries: int) -> dict:
    model = trained(make, lr, steps=3)
    data = batch(model.config)
    reference = gradients(copy.deepcopy(model).double(), data)
    row: dict = {"case": label, "lr": lr}
    fp32 = gradients(model, data)
    row["fp32"] = cosines(reference, fp32)
    perturbed = copy.deepcopy(model).double()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for parameter in perturbed.parameters():
            parameter.mul_(1 + 1e-3 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    row["fp64_weights_perturbed_1e-3"] = cosines(reference, gradients(perturbed, data))
    for kind in ("before", "after"):
        with convolutions(kind):
            low = copy.deepcopy(model).to(torch.bfloat16)
            runs = [gradients(low, data) for _ in range(tries)]
        broken = sum(any(not torch.isfinite(g).all() for g in run.values()) for run in runs)
        row[f"bf16_{kind}"] = {**cosines(reference, runs[0]), "non_finite_backwards": f"{broken}/{tries}"}
    return row


def agreement_table(tries: int) -> list[dict]:
    cases = [("BiT R26 w8 16px", lambda: ResNetV2(bit_config()), lr) for lr in (1e-3, 3e-3, 1e-2)]
    cases += [
        ("BiT R50 w8 16px", lambda: ResNetV2(bit_config(depth=50)), 3e-3),
        ("BiT R26 w8 32px", lambda: ResNetV2(bit_config(image_size=32)), 3e-3),
        ("BiT R26 w32 16px", lambda: ResNetV2(bit_config(base_width=32, groups=8)), 3e-3),
        ("ViT w32 d2 16px", lambda: VisionTransformer(VIT), 3e-3),
    ]
    rows = []
    for label, make, lr in cases:
        rows.append(agreement(label, make, lr, tries))
        before, after = rows[-1]["bf16_before"], rows[-1]["bf16_after"]
        print(
            f"{label:18s} lr {lr:g}: bf16 before stem {before['stem']:.3f} non-finite "
            f"{before['non_finite_backwards']}; after stem {after['stem']:.3f} non-finite "
            f"{after['non_finite_backwards']}; fp64 perturbed stem "
            f"{rows[-1]['fp64_weights_perturbed_1e-3']['stem']:.3f}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------- training in DeepSpeed


def one_rank_group() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update({"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def train(config: Architecture, bf16: bool, stage: int, lr: float, steps: int) -> dict:
    torch.manual_seed(0)
    model = ResNetV2(config) if isinstance(config, BiTConfig) else VisionTransformer(config)
    plan = recipe(lr, steps, bf16)
    engine = build_engine(model, plan, Zero(stage), world_size=1)
    data, rng = batch(config), np.random.default_rng(0)
    losses = [float(train_micro_batch(engine, *data, plan, rng).loss.detach()) for _ in range(steps)]
    return {"first_loss": losses[0], "final_loss": losses[-1], "skipped_steps": int(engine.skipped_steps)}


def training_table(steps: int) -> list[dict]:
    rows = []
    for label, config in (
        ("BiT R26 w8 16px", bit_config()),
        ("BiT R26 w8 32px", bit_config(image_size=32)),
        ("ViT w32 d2 16px", VIT),
    ):
        for stage in (0, 2, 3):
            row = {"case": label, "zero_stage": stage, "lr": 3e-3, "steps": steps}
            row["fp32"] = train(config, False, stage, 3e-3, steps)
            kinds = ("before", "after") if isinstance(config, BiTConfig) else ("after",)
            for kind in kinds:
                with convolutions(kind):
                    row[f"bf16_{kind}"] = train(config, True, stage, 3e-3, steps)
            rows.append(row)
            described = ", ".join(
                f"{key} {row[key]['final_loss']:.3f} (skipped {row[key]['skipped_steps']})"
                for key in row
                if key.startswith(("fp32", "bf16"))
            )
            print(f"{label:18s} ZeRO-{stage}: final loss {described}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tries", type=int, default=8, help="bf16 backward passes per case")
    parser.add_argument("--steps", type=int, default=20, help="training steps per engine")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    gradient_rows = agreement_table(args.tries)
    one_rank_group()
    training_rows = training_table(args.steps)
    path = save(
        "bf16",
        {
            "what": "bf16 vs fp32 gradients and training of BiT (and the ViT), BiT's convolutions before and "
            "after the fix (on CPUs: fp32 convolution arithmetic on bf16 weights and activations)",
            "command": "python -m benchmarks.bench_bf16",
            "gradient_agreement": gradient_rows,
            "training": training_rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
