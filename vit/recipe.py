"""The training recipe, declared once: optimizer, learning-rate schedule, batch split, regularisation,
and the ZeRO sharding it runs under.

The config schema (`pipeline.config`) validates a job's sections into these dataclasses; each stage's
plan builds the `Recipe` from them (with its `BatchSplit`), and workers receive it as it is. Plain
Python (no torch), so that validating a config stays quick; the loss and optimizer that run a recipe are
`vit.objective`, the engine `vit.engine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

# Keys vitpipe derives itself; setting them as raw DeepSpeed keys would contradict the validated config.
DERIVED_DEEPSPEED_KEYS = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "optimizer",
        "scheduler",
        "bf16",
        "fp16",
        "torch_autocast",
        "communication_data_type",
        "data_types",
    }
)
# Keys of `zero_optimization` that vitpipe derives from its own (pretrain.zero_stage, overlap_comm, ...).
DERIVED_ZERO_KEYS = frozenset(
    {"stage", "overlap_comm", "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"}
)


def _require(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


def _fraction(name: str, value: float, *, closed: bool = False) -> list[str]:
    """`value` in [0, 1) (or [0, 1] when `closed`)."""
    inside = 0 <= value <= 1 if closed else 0 <= value < 1
    return [] if inside else [f"{name} must be in [0, 1{']' if closed else ')'} (got {value})"]


@dataclass(frozen=True)
class Optimizer:
    """AdamW (the paper's pretraining) or SGD with momentum (its fine-tuning), with gradient clipping."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        problems = [] if math.isfinite(self.lr) and self.lr > 0 else [f"lr must be positive (got {self.lr})"]
        problems += _fraction("betas[0]", self.betas[0]) + _fraction("betas[1]", self.betas[1])
        problems += _fraction("momentum", self.momentum)
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be non-negative (got {self.weight_decay})")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be positive, or null for none (got {self.grad_clip})")
        _require(problems)


@dataclass(frozen=True)
class Schedule:
    """Linear warmup to the peak rate, then cosine or linear decay to `min_lr_ratio` of it (or constant)."""

    warmup_steps: int = 10_000
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        problems = [] if self.warmup_steps >= 0 else [f"warmup_steps must be >= 0 (got {self.warmup_steps})"]
        _require(problems + _fraction("min_lr_ratio", self.min_lr_ratio, closed=True))

    def multiplier(self, step: int, total_steps: int) -> float:
        """The fraction of the peak rate at optimizer step `step` (0-based) of `total_steps`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


@dataclass(frozen=True)
class Crop:
    """The random-resized ("Inception") crop of the paper's recipe, on the device: a box of a random
    fraction `area` of the image and aspect ratio (log-uniform) in `aspect`, resized to the model's size."""

    area: tuple[float, float] = (0.08, 1.0)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        object.__setattr__(self, "area", tuple(self.area))
        object.__setattr__(self, "aspect", tuple(self.aspect))
        (low, high), (narrow, wide) = self.area, self.aspect
        problems = [] if 0 < low <= high <= 1 else [f"area must be 0 < low <= high <= 1 (got {[low, high]})"]
        if not 0 < narrow <= wide:
            problems.append(f"aspect must be 0 < low <= high (got {list(self.aspect)})")
        _require(problems)


@dataclass(frozen=True)
class BatchSplit:
    """A step's `global_batch` images cut into micro-batches of `micro_batch` on `world` ranks, each rank
    accumulating `accumulation` of them, so every step sees the same images whatever the number of ranks:
    the one place the batch is split (the config's check, the plan, the workers, the feed, DeepSpeed)."""

    global_batch: int
    micro_batch: int
    world: int = 1

    def __post_init__(self) -> None:
        if min(self.global_batch, self.micro_batch, self.world) < 1:
            raise ValueError(f"a batch split needs positive sizes (got {self})")
        if self.global_batch % (self.micro_batch * self.world):
            raise ValueError(
                f"a global batch of {self.global_batch} does not split into micro-batches of "
                f"{self.micro_batch} on {self.world} rank(s)"
            )

    @property
    def accumulation(self) -> int:
        """Micro-batches each rank trains per optimizer step."""
        return self.global_batch // (self.micro_batch * self.world)

    def on(self, world: int) -> BatchSplit:
        """The same global batch and micro-batch on `world` ranks (an elastic group's other size)."""
        return replace(self, world=world)


@dataclass(frozen=True)
class Recipe:
    """Everything a training loop needs besides the model and the data."""

    optimizer: Optimizer
    schedule: Schedule
    total_steps: int
    batch: BatchSplit
    label_smoothing: float = 0.0
    flip: bool = True
    mixup_alpha: float = 0.0
    bf16: bool = False
    crop: Crop | None = None  # None: the whole image (centre-cropped to the model's size when larger)
    input_size: int | None = None  # the image size batches arrive at (stored); None: the model's

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): a function of the step alone, so a resumed
        or extended run trains each step at the rate its own schedule gives."""
        return self.optimizer.lr * self.schedule.multiplier(step, self.total_steps)


@dataclass(frozen=True)
class Cadence:
    """How often the loop records a step and saves a checkpoint (the last step always does both)."""

    log_every: int
    checkpoint_every: int


@dataclass(frozen=True)
class Zero:
    """How the model state is sharded over the ranks and its gradients travel: ZeRO stage, optimizer
    offload, the dtype gradients are reduced and accumulated in under bf16, communication overlapped with
    the backward pass in buckets of so many elements, and raw extra DeepSpeed keys."""

    stage: int
    offload_optimizer: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # fp32: a sum over ranks and micro-batches keeps fp32's 24 mantissa bits (bf16 has 8: adding 64
    # micro-batches' gradients in bf16 loses the small ones); bf16 halves the bytes on the wire.
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    overlap_comm: bool = True
    reduce_bucket_size: int = 500_000_000
    # None: DeepSpeed's own (5e8 elements per all-gather at stages 1-2, a 5e7 prefetch at stage 3, where a
    # larger one would gather a large model's layers ahead almost whole)
    allgather_bucket_size: int | None = None

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3 (got {self.stage})")
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
            raise ValueError(f"grad_reduce_dtype must be fp32 or bf16 (got {self.grad_reduce_dtype!r})")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            size = getattr(self, name)
            if size is not None and (size < 2 or size % 2):  # DeepSpeed aligns its buckets to 4 bytes
                raise ValueError(f"{name} must be an even number of elements >= 2 (got {size})")
        refuse_derived_keys(self.extra)


@dataclass(frozen=True)
class Speed:
    """How fast a step runs, never what it computes: `torch.compile` of the model ("auto": on CUDA),
    activation checkpointing per block (recompute in backward: less memory, ~1/3 more compute), TF32 for
    fp32 matmuls on CUDA."""

    compile: Literal["auto"] | bool = "auto"
    activation_checkpointing: bool = False
    tf32: bool = True

    def compiles(self, device_type: str) -> bool:
        """Whether to compile on a device of this type: `auto` compiles on CUDA only (on CPUs the compile
        costs more than a test's steps gain)."""
        return device_type == "cuda" if self.compile == "auto" else bool(self.compile)


def refuse_derived_keys(extra: dict[str, Any]) -> None:
    """Raw DeepSpeed keys may add to the generated config, not contradict what vitpipe derives."""
    clash = sorted(DERIVED_DEEPSPEED_KEYS & set(extra))
    zero = extra.get("zero_optimization")
    if isinstance(zero, dict):
        clash += [f"zero_optimization.{key}" for key in sorted(DERIVED_ZERO_KEYS & set(zero))]
    if clash:
        raise ValueError(
            f"deepspeed: {clash} are derived from vitpipe's own keys; set those instead (pretrain."
            "zero_stage, overlap_comm, reduce_bucket_size, allgather_bucket_size)"
        )
