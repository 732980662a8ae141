"""The analytic FLOP count against PyTorch's FlopCounterMode on vitpipe's model and on HF's ViT."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vit.bit import ResNetV2
from vit.config import BiTConfig, ViTConfig
from vit.flops import forward_flops, forward_flops_breakdown, train_flops
from vit.hf import hf_config_dict
from vit.model import VisionTransformer
from vit.patches import patchify

CONFIGS = {
    "Ti/16@224": ViTConfig.from_variant("Ti/16", num_classes=1000),
    "S/8@32 1ch gap": ViTConfig.from_variant("S/8", image_size=32, channels=1, num_classes=10, pool="gap"),
    "tiny pre-logits": ViTConfig(
        image_size=32,
        patch_size=4,
        num_classes=10,
        width=96,
        depth=4,
        mlp_dim=384,
        heads=3,
        representation_size=64,
    ),
}


def counted_forward(config: ViTConfig) -> FlopCounterMode:
    model = VisionTransformer(config).eval()
    images = torch.zeros(1, config.image_size, config.image_size, config.channels, dtype=torch.uint8)
    # The math backend runs attention as matmuls, which FlopCounterMode counts on CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(patchify(images, config.patch_size))
    return counter


@pytest.mark.parametrize("name", list(CONFIGS))
def test_analytic_forward_flops_equal_the_counted_flops(name):
    config = CONFIGS[name]
    assert forward_flops(config) == counted_forward(config).get_total_flops()


BIT_CONFIGS = {
    "R50x1@224": BiTConfig.from_variant("R50x1", num_classes=1000),
    "R26x1 base 8 @16 1ch": BiTConfig(
        image_size=16, patch_size=4, channels=1, num_classes=10, depth=26, base_width=8, groups=8
    ),
    "R101x2 base 16 @40 odd sides": BiTConfig(
        image_size=40, patch_size=8, num_classes=7, depth=101, width_factor=2, base_width=16, groups=16
    ),
}


@pytest.mark.parametrize("name", list(BIT_CONFIGS))
def test_analytic_bit_forward_flops_equal_the_counted_flops(name):
    config = BIT_CONFIGS[name]
    model = ResNetV2(config).eval()
    images = torch.zeros(1, config.image_size, config.image_size, config.channels, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(patchify(images, config.patch_size))
    assert forward_flops(config) == counter.get_total_flops()


def test_bit_r50x1_costs_the_published_4_1_gmac():
    assert forward_flops(BIT_CONFIGS["R50x1@224"]) / 2 == pytest.approx(4.09e9, rel=0.01)


def test_analytic_flops_equal_flops_counted_on_hf_vit():
    config = CONFIGS["Ti/16@224"]
    fields = {k: v for k, v in hf_config_dict(config).items() if k != "architectures"}
    hf_config = transformers.ViTConfig(**fields)
    hf_config._attn_implementation = "eager"  # attention as explicit matmuls (conv, addmm, bmm counted)
    model = transformers.ViTForImageClassification(hf_config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, 224, 224))
    assert forward_flops(config) == counter.get_total_flops()


def test_vit_b16_costs_the_published_17_6_gmac():
    config = ViTConfig.from_variant("B/16", num_classes=1000)
    assert forward_flops(config) / 2 / 1e9 == pytest.approx(17.56, abs=0.01)
    assert train_flops(config) == 3 * forward_flops(config)
    assert sum(forward_flops_breakdown(config).values()) == forward_flops(config)


def test_backward_costs_about_twice_the_forward():
    config = CONFIGS["tiny pre-logits"]
    model = VisionTransformer(config)
    torch.nn.init.normal_(model.head.weight)
    patches = patchify(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), 4)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(patches).sum().backward()
    # The input needs no gradient, so backward is a little under 2x: train is at most 3x forward.
    ratio = counter.get_total_flops() / (2 * forward_flops(config))
    assert 2.85 < ratio <= 3.0
