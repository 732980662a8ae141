"""Analytic FLOP count of a ViT (2 FLOPs per multiply-add, matmuls and attention), for MFU.

Elementwise work (norms, GELU, softmax, residuals) is left out, as MFU conventions do; it is well under
1% of the total for the standard variants.
"""

from __future__ import annotations

from vit.config import ViTConfig


def forward_flops_breakdown(config: ViTConfig) -> dict[str, int]:
    """Forward FLOPs per image by component."""
    tokens, width, mlp = config.seq_len, config.width, config.mlp_dim
    per_block = {
        "qkv": 2 * tokens * width * 3 * width,
        "attention": 2 * 2 * tokens * tokens * width,  # Q K^T and attention-weighted V
        "attention_out": 2 * tokens * width * width,
        "mlp": 2 * 2 * tokens * width * mlp,
    }
    breakdown = {"patch_embedding": 2 * config.num_patches * config.patch_dim * width}
    breakdown.update({name: flops * config.depth for name, flops in per_block.items()})
    breakdown["pre_logits"] = 2 * width * config.representation_size if config.representation_size else 0
    breakdown["head"] = 2 * config.feature_dim * config.num_classes
    return breakdown


def forward_flops(config: ViTConfig) -> int:
    """Forward FLOPs per image."""
    return sum(forward_flops_breakdown(config).values())


def train_flops(config: ViTConfig) -> int:
    """Training FLOPs per image: forward + backward, counted as 3x forward (the usual MFU convention)."""
    return 3 * forward_flops(config)
