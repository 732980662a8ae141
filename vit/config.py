"""The model configs: every number that defines a ViT's or a BiT ResNet's architecture and input, what
`config.json` and each checkpoint store. `Architecture` is either; its `family` says which."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from vit.patches import PatchGeometry, geometry_problems
from vit.variants import BIT_DEPTHS, parse_bit_variant, parse_variant

CONFIG_FILE = "config.json"  # the file a saved model folder describes itself in (vitpipe's and HF's)
DEFAULT_MEAN = 0.5  # big_vision / the paper's checkpoints scale pixels to [-1, 1]
DEFAULT_STD = 0.5


class _Stored:
    """What every model config does alike: input geometry and normalisation, its checks, copies with
    changes, and the dict `config.json` stores. Subclasses are frozen dataclasses with `image_size`,
    `patch_size`, `channels`, `mean` and `std`, and their own `_problems`."""

    label: ClassVar[str]  # "ViT", "BiT": what messages call the family
    image_size: int
    patch_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Per-channel mean/std default to 0.5/0.5 (pixels scaled to [-1, 1]) for however many channels.
        mean = tuple(float(m) for m in self.mean or (DEFAULT_MEAN,) * self.channels)
        std = tuple(float(s) for s in self.std or (DEFAULT_STD,) * self.channels)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        problems = self._problems()
        if problems:
            raise ValueError(f"invalid {self.label} config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        """The family's own checks; the normalisation's are added here."""
        problems = [
            f"{name} has {len(getattr(self, name))} values for {self.channels} channel(s)"
            for name in ("mean", "std")
            if len(getattr(self, name)) != self.channels
        ]
        if any(s <= 0 for s in self.std):
            problems.append(f"std values must be positive (got {self.std})")
        return problems

    @property
    def geometry(self) -> PatchGeometry:
        """The patch tensors the model reads."""
        return PatchGeometry(self.image_size, self.patch_size, self.channels)

    def replace(self: Self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        data["mean"], data["std"] = list(data["mean"]), list(data["std"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Self:
        """Build from `to_dict()` output; unknown keys are an error naming `source` and the keys."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown {cls.label} config key(s) {', '.join(unknown)}; known: {sorted(known)}"
            )
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


@dataclass(frozen=True)
class ViTConfig(_Stored):
    """A Vision Transformer on square images of `image_size` cut into `patch_size` patches."""

    family: ClassVar[str] = "vit"
    label: ClassVar[str] = "ViT"
    # Fields a checkpoint can be loaded under a different value of; every other field must match it.
    adaptable: ClassVar[frozenset[str]] = frozenset(
        {"image_size", "num_classes", "representation_size", "dropout", "attention_dropout", "drop_path"}
    )
    # What the data must match: the patch embedding is learned on patches of this size and channels.
    fixed_geometry: ClassVar[tuple[str, ...]] = ("patch_size", "channels")

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    num_classes: int = 1000
    width: int = 192
    depth: int = 12
    mlp_dim: int = 768
    heads: int = 3
    pool: Literal["cls", "gap"] = "cls"
    representation_size: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def _problems(self) -> list[str]:
        integers = ("num_classes", "width", "depth", "mlp_dim", "heads")
        problems = geometry_problems(self.image_size, self.patch_size, self.channels) + super()._problems()
        sizes = [
            f"{name} must be a positive integer (got {getattr(self, name)!r})"
            for name in integers
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if sizes:
            return problems + sizes
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pool not in ("cls", "gap"):
            problems.append(f"pool must be 'cls' or 'gap' (got {self.pool!r})")
        if self.representation_size is not None and self.representation_size < 1:
            problems.append(f"representation_size must be positive or None (got {self.representation_size})")
        for name in ("dropout", "attention_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1) (got {getattr(self, name)})")
        if not self.layer_norm_eps > 0:
            problems.append(f"layer_norm_eps must be positive (got {self.layer_norm_eps})")
        return problems

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> ViTConfig:
        """The config of a named variant ("B/16"); keyword arguments override any field."""
        parsed = parse_variant(name)
        shape = dataclasses.asdict(parsed.shape)
        return cls(**{"patch_size": parsed.patch_size, **shape, **overrides})

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the class token, when pooling from it."""
        return 1 if self.pool == "cls" else 0

    @property
    def seq_len(self) -> int:
        return self.geometry.num_patches + self.num_prefix_tokens

    @property
    def feature_dim(self) -> int:
        """Width of the pre-logits features the head (and few-shot probes) read."""
        return self.representation_size or self.width

    def describe(self) -> str:
        return f"ViT width {self.width} depth {self.depth} heads {self.heads}"

    def for_target(self, *, image_size: int, patch_size: int, num_classes: int) -> ViTConfig:
        """The model fine-tuned on a target: its resolution and classes, no pre-logits layer (as the
        paper); the patch size is the model's own (`fixed_geometry`)."""
        del patch_size
        return self.replace(image_size=image_size, num_classes=num_classes, representation_size=None)


@dataclass(frozen=True)
class BiTConfig(_Stored):
    """A BiT ResNet-v2 (Kolesnikov et al. 2020): pre-activation bottlenecks, GroupNorm and weight-
    standardised convolutions. It reads the same patch tensors as a ViT and rebuilds the image from them,
    so `patch_size` is the data's layout only: its weights fit any patch size and any resolution."""

    family: ClassVar[str] = "bit"
    label: ClassVar[str] = "BiT"
    adaptable: ClassVar[frozenset[str]] = frozenset({"image_size", "patch_size", "num_classes"})
    fixed_geometry: ClassVar[tuple[str, ...]] = ("channels",)

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    num_classes: int = 1000
    depth: int = 50  # 26, 50, 101 or 152 (vit.variants.BIT_DEPTHS)
    width_factor: int = 1  # R50x1, R50x2, ...
    base_width: int = 64  # the stem's channels at width factor 1 (BiT's is 64; smaller for toy models)
    groups: int = 32  # GroupNorm groups
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def _problems(self) -> list[str]:
        problems = geometry_problems(self.image_size, self.patch_size, self.channels) + super()._problems()
        for name in ("num_classes", "width_factor", "base_width", "groups"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer (got {getattr(self, name)!r})")
        if problems:
            return problems
        if self.depth not in BIT_DEPTHS:
            problems.append(f"depth must be one of {sorted(BIT_DEPTHS)} (got {self.depth!r})")
        if self.stem_width % self.groups:
            problems.append(
                f"the stem's {self.stem_width} channels (base_width x width_factor) do not split into "
                f"{self.groups} GroupNorm groups"
            )
        return problems

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> BiTConfig:
        """The config of a named variant ("R50x1"); keyword arguments override any field."""
        depth, width_factor = parse_bit_variant(name)
        return cls(**{"depth": depth, "width_factor": width_factor, **overrides})

    @property
    def stem_width(self) -> int:
        return self.base_width * self.width_factor

    @property
    def stage_blocks(self) -> tuple[int, int, int, int]:
        return BIT_DEPTHS[self.depth]

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Each stage's output channels (4x its bottleneck's): 256, 512, 1024, 2048 for R50x1."""
        return tuple(4 * self.stem_width * 2**stage for stage in range(4))

    @property
    def feature_dim(self) -> int:
        """Channels of the global-pooled features the head (and few-shot probes) read."""
        return self.stage_widths[-1]

    def describe(self) -> str:
        base = "" if self.base_width == 64 else f", base width {self.base_width}"
        return f"BiT R{self.depth}x{self.width_factor}{base}"

    def for_target(self, *, image_size: int, patch_size: int, num_classes: int) -> BiTConfig:
        """The model fine-tuned on a target: its resolution, patch layout and classes."""
        return self.replace(image_size=image_size, patch_size=patch_size, num_classes=num_classes)


Architecture = ViTConfig | BiTConfig
FAMILIES: dict[str, type[ViTConfig] | type[BiTConfig]] = {"vit": ViTConfig, "bit": BiTConfig}


def architecture_record(config: Architecture) -> dict[str, Any]:
    """How config.json and checkpoints store an architecture: under its family's key (`"vit": {...}`)."""
    return {config.family: config.to_dict()}


def architecture_from_record(record: dict[str, Any], source: str) -> Architecture:
    """The architecture stored by `architecture_record` in `record` (which may hold other keys)."""
    present = [family for family in FAMILIES if isinstance(record.get(family), dict)]
    if len(present) != 1:
        wanted = " or ".join(FAMILIES)
        raise ValueError(f"{source}: expected one architecture under {wanted}; found {present}")
    return FAMILIES[present[0]].from_dict(record[present[0]], source=source)
