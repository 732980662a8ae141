"""The model sections: a ViT variant (or its dimensions) or a BiT ResNet, resolved to a `vit` architecture
for the data it reads."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Tag, field_validator, model_validator

from pipeline.config.base import PositiveInt, Section, UnitFraction
from vit.config import BiTConfig, ViTConfig
from vit.variants import VARIANTS, parse_bit_variant, parse_variant

DIMENSIONS = ("width", "depth", "mlp_dim", "heads")


class ModelConfig(Section):
    """A ViT: a named variant ("Ti/16", or "Ti" with `patch_size`) whose dimensions may be overridden,
    or a model given by its dimensions and `patch_size` alone. Default: Ti/16."""

    label: ClassVar[str] = "ViT"
    family: Literal["vit"] = "vit"
    variant: str | None = None
    patch_size: PositiveInt = 16  # default: the variant's ("B/32": 32), else 16
    width: PositiveInt | None = None
    depth: PositiveInt | None = None
    mlp_dim: PositiveInt | None = None
    heads: PositiveInt | None = None
    # The image channels the model is meant for (3 RGB, 1 grey); the data must match. Default: the data's.
    channels: Literal[1, 3] | None = None
    pool: Literal["cls", "gap"] = "cls"
    representation_size: PositiveInt | None = None
    dropout: UnitFraction = 0.0
    drop_path: UnitFraction = 0.0

    @model_validator(mode="before")
    @classmethod
    def _patch_size_of_the_variant(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("patch_size") is None and isinstance(data.get("variant"), str):
            _, _, patch = data["variant"].rpartition("/")
            if patch.isdigit():
                return {**data, "patch_size": int(patch)}
        return data

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, variant: str | None) -> str | None:
        if variant is not None and "/" in variant:
            parse_variant(variant)
        elif variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)} (optionally /PATCH)")
        return variant

    @model_validator(mode="after")
    def _architecture_is_valid(self) -> ModelConfig:
        given = [name for name in DIMENSIONS if getattr(self, name) is not None]
        if self.variant is None and given and len(given) < len(DIMENSIONS):
            missing = ", ".join(name for name in DIMENSIONS if name not in given)
            needed = ", ".join(DIMENSIONS)
            raise ValueError(f"a model without a variant needs all of {needed}; {missing} unset")
        named = parse_variant(self.variant).patch_size if self.variant and "/" in self.variant else None
        if named not in (None, self.patch_size):
            raise ValueError(f"variant {self.variant!r} and patch_size {self.patch_size} disagree: set one")
        # vit.ViTConfig owns the architecture rules; data-dependent sizes are checked when data is known.
        self.architecture(image_size=self.patch_size, channels=1, num_classes=1)
        return self

    def describe(self) -> str:
        """`Ti/16`, or `width 96, depth 4, heads 3, MLP 384 / patch 4` for a model given by dimensions."""
        shape = VARIANTS[(self.variant or "Ti/16").split("/")[0]]
        if self.variant is not None and not any(getattr(self, name) for name in DIMENSIONS):
            return f"{self.variant.split('/')[0]}/{self.patch_size}"
        width, depth = self.width or shape.width, self.depth or shape.depth
        heads, mlp = self.heads or shape.heads, self.mlp_dim or shape.mlp_dim
        return f"width {width}, depth {depth}, heads {heads}, MLP {mlp} / patch {self.patch_size}"

    @property
    def reads_patch_size(self) -> int | None:
        """The patch size of the tensors this model reads (its patch embedding's)."""
        return self.patch_size

    def architecture(
        self, *, image_size: int, channels: int, num_classes: int, patch_size: int | None = None
    ) -> ViTConfig:
        """The model this section describes, for data of the given image size, channels and classes (the
        patch size is the model's own; the data's must match it)."""
        del patch_size
        overrides = {name: value for name in DIMENSIONS if (value := getattr(self, name)) is not None}
        variant = (self.variant or "Ti").split("/")[0]
        return ViTConfig.from_variant(
            f"{variant}/{self.patch_size}",
            image_size=image_size,
            channels=channels,
            num_classes=num_classes,
            pool=self.pool,
            representation_size=self.representation_size,
            dropout=self.dropout,
            drop_path=self.drop_path,
            **overrides,
        )


class BiTModelConfig(Section):
    """A BiT ResNet-v2, the paper's CNN baseline: a named variant ("R50x1") or `depth` and
    `width_factor`; `base_width` shrinks it for toy runs. It reads patch tensors of any patch size (it
    rebuilds the image from them): `patch_size` only says which ones it was meant for. Default: R50x1."""

    label: ClassVar[str] = "BiT"
    family: Literal["bit"]
    variant: str | None = None
    depth: Literal[26, 50, 101, 152] | None = None
    width_factor: PositiveInt | None = None
    base_width: PositiveInt = 64
    groups: PositiveInt = 32
    patch_size: PositiveInt | None = None  # default: the data's
    channels: Literal[1, 3] | None = None

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, variant: str | None) -> str | None:
        if variant is not None:
            parse_bit_variant(variant)
        return variant

    @model_validator(mode="after")
    def _architecture_is_valid(self) -> BiTModelConfig:
        if self.variant is not None and (self.depth is not None or self.width_factor is not None):
            raise ValueError(
                f"variant {self.variant!r} sets depth and width_factor already: set one or the other"
            )
        size = self.patch_size or 1  # vit.BiTConfig owns the rules; the data's sizes are checked when known
        self.architecture(image_size=size, channels=1, num_classes=1, patch_size=size)
        return self

    @property
    def reads_patch_size(self) -> int | None:
        return self.patch_size

    def _depth_and_width(self) -> tuple[int, int]:
        if self.variant is not None:
            return parse_bit_variant(self.variant)
        return self.depth or 50, self.width_factor or 1

    def describe(self) -> str:
        depth, width = self._depth_and_width()
        base = "" if self.base_width == 64 else f" base width {self.base_width}"
        return f"R{depth}x{width}{base}"

    def architecture(
        self, *, image_size: int, channels: int, num_classes: int, patch_size: int | None = None
    ) -> BiTConfig:
        """The model this section describes, for data of the given geometry and classes."""
        depth, width = self._depth_and_width()
        if (self.patch_size or patch_size) is None:
            raise ValueError("a BiT reads the data's patch layout: its patch size must be known")
        return BiTConfig(
            image_size=image_size,
            patch_size=self.patch_size or patch_size,
            channels=channels,
            num_classes=num_classes,
            depth=depth,
            width_factor=width,
            base_width=self.base_width,
            groups=self.groups,
        )


def _model_family(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("family", "vit"))
    return str(getattr(value, "family", "vit"))


# A model section: a ViT unless `family: bit` says otherwise (job files before BiT mean a ViT).
AnyModel = Annotated[
    Annotated[ModelConfig, Tag("vit")] | Annotated[BiTModelConfig, Tag("bit")],
    Discriminator(
        _model_family, custom_error_type="model_family", custom_error_message="family must be 'vit' or 'bit'"
    ),
]
