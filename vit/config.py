"""ViTConfig: every number that defines a ViT's architecture and input; what `config.json` stores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from vit.patches import PatchGeometry, geometry_problems
from vit.variants import parse_variant

CONFIG_FILE = "config.json"  # the file a saved model folder describes itself in (vitpipe's and HF's)
DEFAULT_MEAN = 0.5  # big_vision / the paper's checkpoints scale pixels to [-1, 1]
DEFAULT_STD = 0.5


@dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer on square images of `image_size` cut into `patch_size` patches."""

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

    def __post_init__(self) -> None:
        # Per-channel normalisation defaults to 0.5/0.5 for however many channels there are.
        if not self.mean:
            object.__setattr__(self, "mean", (DEFAULT_MEAN,) * self.channels)
        if not self.std:
            object.__setattr__(self, "std", (DEFAULT_STD,) * self.channels)
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        problems = self._problems()
        if problems:
            raise ValueError("invalid ViT config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        integers = ("num_classes", "width", "depth", "mlp_dim", "heads")
        problems = geometry_problems(self.image_size, self.patch_size, self.channels)
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
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                problems.append(
                    f"{name} has {len(getattr(self, name))} values for {self.channels} channel(s)"
                )
        if any(s <= 0 for s in self.std):
            problems.append(f"std values must be positive (got {self.std})")
        return problems

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> ViTConfig:
        """The config of a named variant ("B/16"); keyword arguments override any field."""
        parsed = parse_variant(name)
        shape = dataclasses.asdict(parsed.shape)
        return cls(**{"patch_size": parsed.patch_size, **shape, **overrides})

    @property
    def geometry(self) -> PatchGeometry:
        """The patch tensors the model reads."""
        return PatchGeometry(self.image_size, self.patch_size, self.channels)

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

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ViTConfig:
        """Build from `to_dict()` output; unknown keys are an error naming `source` and the keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown ViT config key(s) {', '.join(unknown)}; known: {sorted(known)}"
            )
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
