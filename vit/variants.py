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
