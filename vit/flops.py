"""Analytic FLOP count of a ViT or a BiT ResNet (2 FLOPs per multiply-add: matmuls, attention and
convolutions) and device peaks, for MFU.

Elementwise work (norms, GELU, softmax, residuals, pooling, weight standardisation) is left out, as MFU
conventions do; it is well under 1% of the total for the standard variants.
"""

from __future__ import annotations

import time

import torch

from vit.config import Architecture, BiTConfig


def forward_flops_breakdown(config: Architecture) -> dict[str, int]:
    """Forward FLOPs per image by component."""
    if isinstance(config, BiTConfig):
        return _bit_breakdown(config)
    tokens, width, mlp = config.seq_len, config.width, config.mlp_dim
    per_block = {
        "qkv": 2 * tokens * width * 3 * width,
        "attention": 2 * 2 * tokens * tokens * width,  # Q K^T and attention-weighted V
        "attention_out": 2 * tokens * width * width,
        "mlp": 2 * 2 * tokens * width * mlp,
    }
    breakdown = {"patch_embedding": 2 * config.geometry.num_patches * config.geometry.patch_dim * width}
    breakdown.update({name: flops * config.depth for name, flops in per_block.items()})
    breakdown["pre_logits"] = 2 * width * config.representation_size if config.representation_size else 0
    breakdown["head"] = 2 * config.feature_dim * config.num_classes
    return breakdown


def _conv_side(side: int, kernel: int, stride: int, padding: int) -> int:
    return (side + 2 * padding - kernel) // stride + 1


def _bit_breakdown(config: BiTConfig) -> dict[str, int]:
    """A BiT ResNet's convolutions stage by stage, following `vit.bit`'s shapes exactly."""
    side = _conv_side(config.image_size, 7, 2, 3)
    breakdown = {"stem": 2 * side * side * config.stem_width * config.channels * 49}
    side = _conv_side(side + 2, 3, 2, 0)  # zero-padded 3x3/2 max pool
    cin = config.stem_width
    for stage, (blocks, cout) in enumerate(zip(config.stage_blocks, config.stage_widths, strict=True)):
        flops, mid = 0, cout // 4
        for unit in range(blocks):
            stride = 2 if stage > 0 and unit == 0 else 1
            out = _conv_side(side, 3, stride, 1)
            flops += 2 * side * side * cin * mid + 2 * out * out * mid * mid * 9 + 2 * out * out * mid * cout
            if stride != 1 or cin != cout:
                flops += 2 * out * out * cin * cout
            side, cin = out, cout
        breakdown[f"stage{stage + 1}"] = flops
    breakdown["head"] = 2 * config.feature_dim * config.num_classes
    return breakdown


def forward_flops(config: Architecture) -> int:
    """Forward FLOPs per image."""
    return sum(forward_flops_breakdown(config).values())


def train_flops(config: Architecture) -> int:
    """Training FLOPs per image: forward + backward, counted as 3x forward (the usual MFU convention)."""
    return 3 * forward_flops(config)


# Dense peak FLOP/s per GPU from the vendors' datasheets (no sparsity): bf16 tensor cores, and TF32 for
# fp32 training. The longest matching name wins ("H100 PCIe" before "H100").
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "B200": (2250e12, 1100e12),
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM; the NVL and PCIe cards have their own rows
    "H100 NVL": (835e12, 418e12),
    "H100 PCIe": (756e12, 378e12),
    "GH200": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "A10": (125e12, 62.5e12),
    "V100": (125e12, 15.7e12),  # fp16 tensor cores; V100 has no bf16
}


def gpu_peak_flops(device_name: str, bf16: bool) -> float | None:
    """The datasheet peak of a GPU by its CUDA device name, or None for a GPU not in the table."""
    matches = [name for name in GPU_PEAK_FLOPS if name.lower() in device_name.lower()]
    if not matches:
        return None
    bf16_peak, tf32_peak = GPU_PEAK_FLOPS[max(matches, key=len)]
    return bf16_peak if bf16 else tf32_peak


def measured_matmul_flops(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5
) -> float:
    """FLOP/s of square matmuls on this CPU with this process's threads: the peak MFU is quoted against
    on a CPU, where no datasheet number fits the threads a worker was given."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm up the kernels and thread pool
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 3:
        torch.mm(a, b)
        runs += 1
    return 2 * size**3 * runs / elapsed


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """The peak one device's MFU is quoted against: a GPU's datasheet number, a CPU's measured matmul."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), bf16)
    return measured_matmul_flops(torch.bfloat16 if bf16 else torch.float32)
