"""The ViT variant table (Dosovitskiy et al., Table 1) and the "B/16" naming: the one place both live."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class VariantShape:
    """Transformer dimensions of a named variant."""

    width: int
    depth: int
    mlp_dim: int
    heads: int


VARIANTS: dict[str, VariantShape] = {
    "Ti": VariantShape(width=192, depth=12, mlp_dim=768, heads=3),
    "S": VariantShape(width=384, depth=12, mlp_dim=1536, heads=6),
    "B": VariantShape(width=768, depth=12, mlp_dim=3072, heads=12),
    "L": VariantShape(width=1024, depth=24, mlp_dim=4096, heads=16),
    "H": VariantShape(width=1280, depth=32, mlp_dim=5120, heads=16),
}

_NAME = re.compile(r"^(?P<variant>[A-Za-z]+)/(?P<patch>[0-9]+)$")


@dataclass(frozen=True)
class VariantName:
    """A parsed "B/16": the variant's shape and the patch size."""

    variant: str
    shape: VariantShape
    patch_size: int


def parse_variant(name: str) -> VariantName:
    """Parse "Ti/16", "S/8", "B/32"...; raises ValueError naming the known variants."""
    match = _NAME.match(name.strip())
    if match is None:
        raise ValueError(f"variant {name!r} is not of the form NAME/PATCH, e.g. 'B/16'")
    variant, patch = match["variant"], int(match["patch"])
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} in {name!r}; known: {', '.join(VARIANTS)}")
    if patch < 1:
        raise ValueError(f"patch size must be positive in {name!r}")
    return VariantName(variant=variant, shape=VARIANTS[variant], patch_size=patch)


# --- BiT: ResNet-v2 depths (bottleneck units per stage) and the "R50x1" naming ---------------------

BIT_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

_BIT_NAME = re.compile(r"^R(?P<depth>[0-9]+)x(?P<width>[0-9]+)$")


def parse_bit_variant(name: str) -> tuple[int, int]:
    """Parse "R50x1", "R101x3"...: (depth, width factor); raises ValueError naming the known depths."""
    match = _BIT_NAME.match(name.strip())
    if match is None:
        raise ValueError(f"BiT variant {name!r} is not of the form R<depth>x<width>, e.g. 'R50x1'")
    depth, width = int(match["depth"]), int(match["width"])
    if depth not in BIT_DEPTHS:
        raise ValueError(f"unknown BiT depth {depth} in {name!r}; known: {', '.join(map(str, BIT_DEPTHS))}")
    if width < 1:
        raise ValueError(f"width factor must be positive in {name!r}")
    return depth, width
