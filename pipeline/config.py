"""The config schema of every stage, and the one loader every command validates through.

A config that fails here fails before any Ray work starts, with the file and the key path named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import io
import json
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from vit.config import BiTConfig, ViTConfig
from vit.patches import PatchGeometry
from vit.recipe import Crop, Optimizer, Recipe, Schedule, Speed, Zero, grad_accum
from vit.variants import VARIANTS, parse_bit_variant, parse_variant

# Strict numbers: YAML already types its scalars (the loader reads `1e-3` as a number, as YAML 1.2
# does), so `true`, "10" or "3e-3" where a number belongs is a mistake; so are .inf and .nan.
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Flag = Annotated[bool, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
# Sane upper bounds where a typo (an extra digit, 1e26) would plan a run that never ends.
MAX_STEPS = 1_000_000_000
StepBudget = Annotated[int, Strict(), Field(gt=0, le=MAX_STEPS)]
BatchSize = Annotated[int, Strict(), Field(gt=0, le=2**24)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
UnitFraction = Annotated[Float, Field(ge=0, lt=1)]


def _worker_count(value: Any) -> int | tuple[int, int]:
    """A positive number of workers, or [min, max] with 1 <= min <= max: one error either way."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if whole and value >= 1:
        return value
    pair = isinstance(value, list | tuple) and len(value) == 2
    if (
        pair
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= value[1]
    ):
        return (value[0], value[1])
    shown = list(value) if isinstance(value, tuple) else value
    raise ValueError(
        f"must be a number of workers (1 or more) or [min, max] with 1 <= min <= max (got {shown!r})"
    )


# Ray Train workers: a number, or [min, max] for an elastic run.
WorkerCount = Annotated[
    int | tuple[int, int], PlainValidator(_worker_count),
    PlainSerializer(lambda workers: list(workers) if isinstance(workers, tuple) else workers),
]  # fmt: skip
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)]
Extension = Annotated[str, Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")]  # a tar member's suffix, lower case

PIL_DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_RUNS = "runs"  # where runs go unless a job says otherwise (run_dir, storage_path)
DEFAULT_PATCH_SIZE = 16  # `vitpipe preprocess` without --patch-size (in a job: the model's)


class ConfigError(ValueError):
    """A config that does not validate; the message names the source file and every bad key path."""


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value: config hashes, cache keys, fingerprints."""
    payload = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and a validated config is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self, exclude: set[str] | None = None) -> str:
        """A stable hash of the settings (less `exclude`), for caching and for refusing to mix outputs."""
        return digest(self.model_dump(mode="json", exclude=exclude))


def _strict(annotation: Any) -> Any:
    """The strict config type of a dataclass field's type: numbers and flags must be what YAML typed."""
    if annotation is float:
        return Float
    if annotation is bool:
        return Flag
    if annotation is int:
        return Annotated[annotation, Strict()]
    arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return tuple[tuple(_strict(argument) for argument in arguments)]  # type: ignore[misc]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return Union[tuple(_strict(argument) for argument in arguments)]  # noqa: UP007
    return annotation


def dataclass_section(cls: type) -> Any:
    """A config section for a `vit` dataclass, which declares the fields and defaults (once, there).

    A YAML mapping is checked key by key (unknown keys, strict types, each error at its key path), then
    becomes an instance of `cls`, whose own checks run; the validated config holds that instance.
    """
    hints = typing.get_type_hints(cls)
    fields = {field.name: (_strict(hints[field.name]), field.default) for field in dataclasses.fields(cls)}

    def checked(section: BaseModel) -> BaseModel:
        cls(**dict(section))  # the dataclass's own range checks, reported at the section's key
        return section

    model = create_model(
        cls.__name__,
        __base__=Section,
        __doc__=cls.__doc__,
        __validators__={"checked": model_validator(mode="after")(checked)},
        **fields,
    )
    return Annotated[
        model,
        BeforeValidator(lambda value: dataclasses.asdict(value) if isinstance(value, cls) else value),
        AfterValidator(lambda section: cls(**dict(section))),
        PlainSerializer(dataclasses.asdict),
    ]


OptimizerSection = dataclass_section(Optimizer)
ScheduleSection = dataclass_section(Schedule)
CropSection = dataclass_section(Crop)


# --- datasets: the corpora the project can write as WebDataset shards ------------------------------


class DigitsConfig(Section):
    """scikit-learn's handwritten digits (8x8 grayscale, 10 classes) split train/test, stratified."""

    kind: Literal["digits"] = "digits"
    name: Name = "digits"
    test_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.2
    seed: NonNegativeInt = 0
    shard_size: PositiveInt = 512


class FractalsConfig(Section):
    """A FractalDB-style corpus: one random iterated function system per class, perturbed per instance."""

    kind: Literal["fractals"] = "fractals"
    name: Name = "fractals"
    classes: Annotated[int, Strict(), Field(gt=0, le=1_000_000)] = 10
    per_class: Annotated[int, Strict(), Field(gt=0, le=1_000_000)] = 100
    size: Annotated[int, Strict(), Field(ge=16, le=1024)] = 32
    seed: NonNegativeInt = 0
    shard_size: PositiveInt = 1000
    min_maps: Annotated[int, Strict(), Field(ge=2, le=8)] = 2
    max_maps: Annotated[int, Strict(), Field(ge=2, le=8)] = 4
    jitter: Annotated[Float, Field(ge=0, le=0.5)] = 0.1
    jpeg_quality: Annotated[int, Strict(), Field(ge=1, le=100)] = 90

    @model_validator(mode="after")
    def _maps_ordered(self) -> FractalsConfig:
        if self.min_maps > self.max_maps:
            raise ValueError(f"min_maps ({self.min_maps}) is larger than max_maps ({self.max_maps})")
        return self


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "gif", "tif", "tiff")


class ImageFolderConfig(Section):
    """A `class_name/image.ext` tree (ImageNet's layout) the user brings, sharded as one split."""

    kind: Literal["imagefolder"] = "imagefolder"
    name: Name = "images"
    src: str
    split: Name = "train"
    shard_samples: PositiveInt | None = 1000
    shard_bytes: ByteSize | None = ByteSize(256 * 1024**2)
    seed: NonNegativeInt = 0
    max_pixels: PositiveInt = PIL_DEFAULT_MAX_PIXELS
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    @model_validator(mode="after")
    def _some_shard_limit(self) -> ImageFolderConfig:
        if self.shard_samples is None and self.shard_bytes is None:
            raise ValueError("set shard_samples, shard_bytes or both: a shard needs a size limit")
        if self.shard_bytes is not None and self.shard_bytes <= 0:
            raise ValueError("shard_bytes must be positive")
        return self


DatasetConfig = Annotated[DigitsConfig | FractalsConfig | ImageFolderConfig, Field(discriminator="kind")]


# --- preprocess, model, pretrain, fine-tune, evaluate ----------------------------------------------


# Preprocessing settings that do not change the files written: the failure threshold, and where the
# shards came from (a moved corpus keeps its outputs; each output file records its source's size).
OUTPUT_NEUTRAL = {"max_failure_rate", "input"}


class PreprocessConfig(Section):
    """WebDataset shards to patch-tensor Parquet shards: decode, resize, patchify, once."""

    # In a job: the `datasets:` entry to read, or a shard location (folder, glob, brace pattern, URL).
    # Default: the dataset of the entry's own name. The `vitpipe preprocess` command takes INPUT instead.
    input: str | None = None
    image_size: PositiveInt = 224
    # In a job, default: the patch size of the model that reads the entry; `vitpipe preprocess`: 16.
    patch_size: PositiveInt | None = None
    channels: Literal[1, 3] = 3
    resize: Literal["shorter-side-center-crop", "squash", "pad"] = "shorter-side-center-crop"
    resample: Literal["bilinear", "bicubic"] = "bilinear"  # always antialiased when shrinking
    image_keys: tuple[Extension, ...] = Field(("jpg", "jpeg", "png", "webp", "ppm"), min_length=1)
    # "cls": an integer in the sample's .cls member; "json:label": a field of its .json; None: unlabelled.
    label_key: Annotated[str, Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)*(:[A-Za-z0-9_.-]+)?$")] | None = "cls"
    max_pixels: PositiveInt = PIL_DEFAULT_MAX_PIXELS
    # Photos' patches compress little (lz4: -10% for +0.14 ms/image, bench_preprocess); synthetic ones do.
    compression: Literal["none", "lz4", "zstd", "snappy"] = "none"
    max_failure_rate: Annotated[Float, Field(ge=0, le=1)] = 0.01

    @model_validator(mode="after")
    def _grid_divides(self) -> PreprocessConfig:
        if self.patch_size is not None:
            self.geometry()
        return self

    def geometry(self) -> PatchGeometry:
        """The patch tensors this entry writes; its patch size must be known (set, or taken from a model)."""
        if self.patch_size is None:
            raise ValueError("patch_size is not set and no model reads this entry to take it from")
        return PatchGeometry(self.image_size, self.patch_size, self.channels)

    def output_hash(self) -> str:
        """Hash of the settings that shape the output files (not the failure threshold), for resuming."""
        return self.digest(exclude=OUTPUT_NEUTRAL)


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
    Discriminator(_model_family, custom_error_type="model_family",
                  custom_error_message="family must be 'vit' or 'bit'"),
]  # fmt: skip


# How a pretraining run is operated, not what it trains: a relaunch with other values resumes the run
# (across world sizes the checkpoint is resharded; the global batch stays, its micro-batch split may not).
PRETRAIN_OPERATIONAL = frozenset({
    "data", "storage_path", "num_workers", "use_gpu", "cpus_per_worker", "data_threads", "data_cpus",
    "placement", "micro_batch_size", "cache_data", "checkpoint_every", "keep_checkpoints", "max_failures",
    "log_every", "elastic_wait_s", "compile", "activation_checkpointing", "tf32", "overlap_comm",
    "reduce_bucket_size", "allgather_bucket_size", "grad_reduce_dtype",
})  # fmt: skip
# Keys of the data path before each worker read its own rows (Ray Data): accepted, with a warning.
PRETRAIN_RETIRED = {
    "data_cpus": "each worker reads its own rows with data_threads threads, inside its own CPUs",
    "cache_data": "each worker streams its rows from the files every epoch, read ahead of the trainer",
}
# The budget: a relaunch with another one resumes the run and trains to the new end.
PRETRAIN_BUDGET = frozenset({"steps", "epochs"})


class PretrainConfig(Section):
    """DeepSpeed ZeRO pretraining on Ray Train; the batch is global and must split evenly.

    Settings divide into those that define the run (the model, the global batch, the optimizer and
    schedule, augmentation, precision, ZeRO stage, seed; a relaunch that changes one is refused) and the
    operational ones and the budget above (a relaunch that changes them resumes)."""

    data: str  # a preprocessed patch directory (path or URL), or in a job the name of a preprocess entry
    split: Name = "train"  # the split to train on; a patch directory without sub-folders has only "."
    model: AnyModel = ModelConfig()
    # Ray Train workers: a fixed number, or [min, max] for an elastic run, which starts on what the cluster
    # offers up to max, goes on with fewer (at least min) from the newest checkpoint when a node is lost,
    # and grows back at a checkpoint when resources return; the global batch stays, accumulation follows.
    num_workers: WorkerCount = 2
    # How long an elastic run waits for the cluster to place `min` workers before it fails.
    elastic_wait_s: PositiveFloat = 600.0
    use_gpu: Flag = False
    cpus_per_worker: PositiveFloat = 1.0
    # Threads each worker reads its rows of the patch files with, ahead of the trainer (pyarrow releases
    # the GIL); more help when the files are remote (s3://, gs://) or compressed.
    data_threads: Annotated[int, Field(ge=1, le=64)] = 2
    data_cpus: PositiveFloat | None = Field(None, exclude=True)  # retired (PRETRAIN_RETIRED)
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # how workers go onto nodes
    global_batch_size: BatchSize = 4096
    micro_batch_size: BatchSize = 64
    steps: StepBudget = 100_000
    epochs: StepBudget | None = None  # a budget in passes over the data instead of `steps`
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Flag = False
    bf16: Literal["auto"] | Flag = "auto"  # auto: on GPUs that support it (Ampere and newer), else fp32
    optimizer: OptimizerSection = Optimizer()
    schedule: ScheduleSection = Schedule()
    label_smoothing: UnitFraction = 0.0
    # The model's resolution; default: the stored one (preprocess.image_size). A smaller one is a centre
    # crop of the stored images, or with `crop` a random resized crop, on the device.
    image_size: PositiveInt | None = None
    # The paper's random ("Inception") crop; `{}` for its defaults: area 8-100%, aspect 3/4-4/3.
    crop: CropSection | None = None
    flip: Flag = True  # random horizontal flips, on the device
    mixup_alpha: NonNegativeFloat = 0.0  # 0 turns mixup off
    # Consecutive rows of the epoch's file order (drawn anew each epoch) permuted together; 0 reads each
    # file's rows in their order.
    shuffle_buffer: NonNegativeInt = 2048
    cache_data: Literal["auto"] | Flag | None = Field(None, exclude=True)  # retired (PRETRAIN_RETIRED)
    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 3
    max_failures: NonNegativeInt = 3  # worker-group restarts from the latest checkpoint before giving up
    log_every: PositiveInt = 10
    storage_path: str | None = None
    seed: NonNegativeInt = 0
    # GPU speed: how a step runs, never what it computes (a relaunch that changes one resumes the run).
    compile: Literal["auto"] | Flag = "auto"  # torch.compile of the model; auto: on GPUs
    activation_checkpointing: Flag = False  # recompute each block in backward: less memory, ~1/3 more compute
    tf32: Flag = True  # TF32 tensor cores for the fp32 matmuls left outside bf16 (CUDA only)
    # Gradients reduced over the ranks and accumulated over micro-batches in fp32 under bf16; bf16 halves
    # the bytes on the wire at the cost of precision (benchmarks/results/grad_reduce.json).
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    overlap_comm: Flag = True  # ZeRO 2-3 reduce while backward goes on (not stage 1 under bf16)
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction
    allgather_bucket_size: int | None = None  # per weight gather (stage 3: prefetch); None: DeepSpeed's
    deepspeed: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _batch_splits(self) -> PretrainConfig:
        sizes = range(self.min_workers, self.max_workers + 1)
        uneven = [w for w in sizes if self.global_batch_size % (self.micro_batch_size * w)]
        if uneven and not self.elastic:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size x num_workers = {self.micro_batch_size} x {self.num_workers}"
            )
        if uneven:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} does not split into micro-batches of "
                f"{self.micro_batch_size} over {' or '.join(map(str, uneven))} worker(s); an elastic run "
                f"(num_workers {list(self.num_workers)}) may train on any number from {self.min_workers} to "
                f"{self.max_workers}: choose a global batch that micro_batch_size x each of them divides"
            )
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise ValueError("set either steps or epochs, not both")
        self.zero()  # the ZeRO settings' own checks (bucket sizes, derived raw keys)
        for key, instead in PRETRAIN_RETIRED.items():
            if getattr(self, key) is not None:
                warnings.warn(f"pretrain.{key} no longer applies ({instead}); drop it", stacklevel=2)
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    def describe_workers(self) -> str:
        """`2 worker(s)`, or for an elastic run `1-4 worker(s) (elastic)`."""
        if not self.elastic:
            return f"{self.num_workers} worker(s)"
        return f"{self.min_workers}-{self.max_workers} worker(s) (elastic)"

    def recipe(self, total_steps: int, input_size: int | None = None) -> Recipe:
        """The recipe the workers train with on images stored at `input_size`, its accumulation for the
        largest group (the workers set their own for the group they find themselves in); `bf16: auto` stays
        off here and is decided on the worker, which sees the device."""
        return Recipe(
            optimizer=self.optimizer,
            schedule=self.schedule,
            total_steps=total_steps,
            micro_batch_size=self.micro_batch_size,
            grad_accum=grad_accum(self.global_batch_size, self.micro_batch_size, self.max_workers),
            label_smoothing=self.label_smoothing,
            flip=self.flip,
            mixup_alpha=self.mixup_alpha,
            bf16=self.bf16 is True,
            crop=self.crop,
            input_size=input_size,
        )

    def worker_resources(self) -> dict[str, float]:
        """What one worker takes of a node: its CPUs (it reads its own data) and a GPU."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}

    def needs(self, workers: int | None = None) -> dict[str, float]:
        """What `workers` workers (default: the most the run uses) take of a cluster."""
        count = self.max_workers if workers is None else workers
        return {key: count * need for key, need in self.worker_resources().items()}

    def zero(self) -> Zero:
        return Zero(self.zero_stage, self.offload_optimizer, dict(self.deepspeed), self.grad_reduce_dtype,
                    self.overlap_comm, self.reduce_bucket_size, self.allgather_bucket_size)  # fmt: skip

    def speed(self) -> Speed:
        return Speed(self.compile, self.activation_checkpointing, self.tf32)

    def defining(self) -> dict[str, Any]:
        """The settings that define the run, flattened (`optimizer.lr`), less the model section (its
        resolved architecture is compared as a whole, `vit.ViTConfig`) and the data's location."""
        exclude = PRETRAIN_OPERATIONAL | PRETRAIN_BUDGET | {"model"}
        return flatten(self.model_dump(mode="json", exclude=exclude))


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: settings as one level of dotted keys (lists stay whole)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# How fine-tuning runs, not what it computes: left out of the step's cache key (a change reuses results).
FINETUNE_OPERATIONAL = frozenset({"compile"})
PAPER_FINETUNE_LRS = (0.001, 0.003, 0.01, 0.03)  # the ViT paper's fine-tuning sweep (its Appendix B.1.1)


class FinetuneConfig(Section):
    """Fine-tuning on target datasets, the paper's protocol by default (SGD momentum, no decay, warmup +
    cosine, clipping at 1, the learning rate chosen from a sweep on a validation split of the target's
    training data); one Ray task per target, mode and learning rate, all submitted at once."""

    # Preprocessed patch directories (paths or URLs), or in a job the names of preprocess entries.
    targets: list[str] = Field(min_length=1)
    # Pretrained weights: a vitpipe or HF folder. In a job with a pretrain section: that run's export.
    weights: str | None = None
    modes: tuple[Literal["pretrained", "scratch"], ...] = Field(("pretrained", "scratch"), min_length=1)
    steps: StepBudget = 500
    batch_size: BatchSize = 512
    micro_batch_size: BatchSize | None = None  # gradient accumulation when it is below batch_size
    optimizer: OptimizerSection = Optimizer(name="sgd", lr=0.03, weight_decay=0.0)
    # The learning rates fine-tuned at, each its own task; the one of best validation top-1 is reported
    # (its test accuracy, never the test split's best). Default: the paper's sweep, or the one rate of
    # `optimizer.lr` when the job sets it.
    lr_sweep: tuple[PositiveFloat, ...] = Field(PAPER_FINETUNE_LRS, min_length=1)
    schedule: ScheduleSection = Schedule(warmup_steps=50)
    label_smoothing: UnitFraction = 0.0
    # As pretrain's: the resolution fine-tuned at (default: the target's stored one) and the random crop;
    # validation and test take the centre.
    image_size: PositiveInt | None = None
    crop: CropSection | None = None
    flip: Flag = True
    freeze_backbone: Flag = False  # train the head alone: a linear probe
    val_fraction: Annotated[Float, Field(ge=0, lt=1)] = 0.1  # of train, held out to pick the best weights
    validate_every: PositiveInt | None = None  # default: ten validations per run
    log_every: PositiveInt = 10
    bf16: Literal["auto"] | Flag = "auto"
    # torch.compile of the training forward: a slower start, faster steps. auto: on CUDA; on CPUs the
    # compile costs more than a fine-tune's steps gain.
    compile: Literal["auto"] | Flag = "auto"
    cpus_per_task: PositiveFloat = 1.0
    gpus_per_task: NonNegativeFloat = 0.0
    max_retries: NonNegativeInt = 2  # a task whose worker process dies is run again this many times
    seed: NonNegativeInt = 0

    @model_validator(mode="before")
    @classmethod
    def _one_lr_or_a_sweep(cls, data: Any) -> Any:
        """`optimizer.lr` alone is a sweep of that one rate. Beside `lr_sweep` it must be one of its rates
        (a saved config holds both); any other is a contradiction."""
        if not isinstance(data, dict):
            return data
        optimizer = data.get("optimizer")
        lr = optimizer.get("lr") if isinstance(optimizer, dict) else getattr(optimizer, "lr", None)
        sweep = data.get("lr_sweep")
        if lr is None:
            return data
        if sweep is None:
            return {**data, "lr_sweep": [lr]}
        if isinstance(sweep, (list, tuple)) and lr not in sweep:
            raise ValueError(
                f"optimizer.lr {lr} is not in lr_sweep {list(sweep)}: set one rate (optimizer.lr) or the "
                "rates to choose from on the validation split (lr_sweep)"
            )
        return data

    @field_validator("lr_sweep")
    @classmethod
    def _sorted_rates(cls, rates: tuple[float, ...]) -> tuple[float, ...]:
        if len(set(rates)) != len(rates):
            raise ValueError(f"a rate is listed twice: {list(rates)}")
        return tuple(sorted(rates))

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, targets: list[str]) -> list[str]:
        repeated = sorted({target for target in targets if targets.count(target) > 1})
        if repeated:
            raise ValueError(f"targets listed twice: {repeated}")
        return targets

    @field_validator("modes")
    @classmethod
    def _distinct_modes(cls, modes: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(modes)) != len(modes):
            raise ValueError(f"a mode is listed twice: {list(modes)}")
        return modes

    @model_validator(mode="after")
    def _batch_splits(self) -> FinetuneConfig:
        if len(self.lr_sweep) > 1 and self.val_fraction == 0:
            raise ValueError(
                f"lr_sweep {list(self.lr_sweep)} is chosen from on a validation split: set val_fraction > 0 "
                "(the paper holds out 2% to 10% of train) or a single optimizer.lr"
            )
        if self.batch_size % self.micro_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_size}"
            )
        return self

    @property
    def micro_size(self) -> int:
        return self.micro_batch_size or self.batch_size

    def at_rate(self, lr: float) -> FinetuneConfig:
        """This section for one member of the sweep: fine-tuning at `lr` alone."""
        optimizer = dataclasses.replace(self.optimizer, lr=lr)
        return self.model_copy(update={"optimizer": optimizer, "lr_sweep": (lr,)})

    def recipe(self, input_size: int | None = None) -> Recipe:
        """The fine-tuning recipe (no mixup) on images stored at `input_size` at `optimizer.lr` (one member of
        the sweep: see `at_rate`); `bf16: auto` is decided in the task, which sees the device."""
        return Recipe(
            optimizer=self.optimizer,
            schedule=self.schedule,
            total_steps=self.steps,
            micro_batch_size=self.micro_size,
            grad_accum=self.batch_size // self.micro_size,
            label_smoothing=self.label_smoothing,
            flip=self.flip,
            bf16=self.bf16 is True,
            crop=self.crop,
            input_size=input_size,
        )


class EvaluateConfig(Section):
    """Few-shot linear evaluation on frozen features: closed-form ridge regression to {-1, 1}."""

    shots: tuple[PositiveInt, ...] = (1, 5, 10, 25)
    seeds: PositiveInt = 3
    l2_regularization: PositiveFloat = 1.0
    batch_size: PositiveInt = 256  # images per forward pass when extracting features and scoring

    @field_validator("shots")
    @classmethod
    def _sorted_shots(cls, shots: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(shots)))


class AnalyzeConfig(Section):
    """The paper's looks inside every ViT a job trains (attention rollout maps, mean attention distance by
    depth, position-embedding similarity, embedding-filter components), from the stored weights, on the
    test images of the first finetune target; one Ray task per model."""

    images: PositiveInt = 8  # the grid of test images the rollout maps are drawn over
    distance_images: PositiveInt = 128  # the images attention distances average over (the paper's 128)
    components: PositiveInt = 28  # principal components of the embedding filters drawn (the paper's 28)
    batch_size: PositiveInt = 64
    cpus_per_task: PositiveFloat = 1.0
    gpus_per_task: NonNegativeFloat = 0.0


class StudyConfig(Section):
    """Transfer as a function of pretraining data size (the paper's Figures 3 and 4): each (size, model,
    seed) point is pretrained on a nested random subset of the corpus with the job's pretrain section as
    its recipe, then fine-tuned and few-shot evaluated on every finetune target."""

    corpus: Name | None = None  # the preprocess entry the subsets are drawn from; default: pretrain.data
    sizes: tuple[PositiveInt, ...] = Field(min_length=1)  # pretraining images of each point
    models: dict[Name, AnyModel] = Field(min_length=1)  # the models compared, by the name the report uses
    seeds: tuple[NonNegativeInt, ...] = Field((0,), min_length=1)  # each point's pretrain and finetune seed
    # The budget of every point: passes over its subset (the paper's rule: more data, more steps) or a
    # fixed number of steps at every size. Default: the pretrain section's epochs, else its steps.
    epochs: StepBudget | None = None
    steps: StepBudget | None = None
    scratch: Flag = True  # also each model trained from scratch on each target: the size-0 row
    subset_seed: NonNegativeInt = 0  # draws the nested subsets, once for every model and seed

    @field_validator("sizes", "seeds")
    @classmethod
    def _distinct_and_sorted(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(values)) != len(values):
            raise ValueError(f"a value is listed twice: {list(values)}")
        return tuple(sorted(values))

    @model_validator(mode="after")
    def _one_budget(self) -> StudyConfig:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("set either epochs or steps, not both")
        return self


class WandbConfig(Section):
    """Weights & Biases: runs in `project`; `offline` writes them under RUN/tracking (`wandb sync` later)."""

    project: Name
    mode: Literal["online", "offline"] = "online"
    entity: str | None = None
    dir: str | None = None  # where W&B writes its files (default RUN/tracking)


class TrackingConfig(Section):
    """Experiment tracking: an MLflow tracking URI (a local path, sqlite:///FILE, or http://SERVER) and/or
    W&B. Operational: it changes no cache key, and a run that cannot reach its tracker still trains."""

    mlflow: str | None = None
    experiment: Name | None = None  # the MLflow experiment (default: the job's name)
    wandb: WandbConfig | None = None

    @model_validator(mode="after")
    def _tracks_something(self) -> TrackingConfig:
        if self.mlflow is None and self.wandb is None:
            raise ValueError(
                "tracking needs mlflow: URI and/or wandb: {project: ...}; drop the section to track nothing"
            )
        return self


class PipelineConfig(Section):
    """A whole job: datasets, then preprocess, pretrain, fine-tune and evaluate (or, with a study, the
    study's points, each a pretraining and its transfer)."""

    name: Name
    run_dir: str | None = None  # the run's folder (all stage outputs); default runs/NAME
    datasets: dict[Name, DatasetConfig] = Field(default_factory=dict)
    preprocess: dict[Name, PreprocessConfig] = Field(default_factory=dict)
    pretrain: PretrainConfig | None = None
    finetune: FinetuneConfig | None = None
    evaluate: EvaluateConfig | None = None
    study: StudyConfig | None = None
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    tracking: TrackingConfig | None = None

    @model_validator(mode="after")
    def _study_has_its_recipe(self) -> PipelineConfig:
        if self.study is None:
            return self
        if self.pretrain is None or self.finetune is None:
            raise ValueError("a study needs a pretrain section (its points' recipe) and a finetune section "
                             "(the targets each point is evaluated on)")  # fmt: skip
        if "model" in self.pretrain.model_fields_set:
            raise ValueError("pretrain.model is not used by a study: its points train study.models; drop it")
        corpus = self.study.corpus or self.pretrain.data
        if corpus not in self.preprocess:
            raise ValueError(f"study.corpus {corpus!r} is not a preprocess entry of this job")
        sizes = {model.reads_patch_size for model in self.study.models.values()} - {None}
        if len(sizes) > 1:
            raise ValueError(
                f"study.models read patches of sizes {sorted(sizes)}; the corpus and the targets are "
                "preprocessed once, so every ViT of a study has one patch size"
            )
        return self

    def models_reading(self, entry: str) -> list[AnyModel]:
        """The model sections that read a preprocess entry: the pretrain model (or a study's models) for
        the pretraining data, the corpus and every finetune target."""
        if self.pretrain is None:
            return []
        targets = self.finetune.targets if self.finetune is not None else []
        corpus = (self.study.corpus or self.pretrain.data) if self.study is not None else self.pretrain.data
        if entry != corpus and entry not in targets:
            return []
        return list(self.study.models.values()) if self.study is not None else [self.pretrain.model]

    @model_validator(mode="after")
    def _patch_sizes_from_models(self) -> PipelineConfig:
        """A preprocess entry without `patch_size` takes the patch size of the model that reads it, so a
        job writes the patch size once (in the model)."""
        for name, entry in self.preprocess.items():
            if entry.patch_size is not None:
                continue
            readers = self.models_reading(name)
            sizes = [model.reads_patch_size for model in readers if model.reads_patch_size is not None]
            if not sizes:
                why = "only a BiT, which reads any patch size," if readers else "no model of this job"
                raise ValueError(
                    f"preprocess.{name}.patch_size is not set and {why} reads {name!r} (pretrain.data, the "
                    "study's corpus or a finetune target); set it"
                )
            size = sizes[0]
            self.preprocess[name] = PreprocessConfig.model_validate(
                {**entry.model_dump(exclude_unset=True), "patch_size": size}
            )
        return self


# --- loading -----------------------------------------------------------------------------------------


ModelT = TypeVar("ModelT", bound=BaseModel)


class _JobLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the last would silently win) and
    reads `1e-3` as the number it is in YAML 1.2 (YAML 1.1 wants a dot: `1.0e-3`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {seen[key].line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_JobLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _JobLoader.construct_mapping)
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")
_JobLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely; an unreadable or undecodable file, a syntax error or a repeated key
    names the file (and the line)."""
    path = Path(path)
    try:
        stream = io.StringIO(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not a text file (byte {error.start} is not UTF-8); a job config is YAML text"
        ) from None
    stream.name = str(path)  # what the loader's messages call the file
    try:
        return yaml.load(stream, Loader=_JobLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def load_config(path: str | Path, model: type[ModelT] = PipelineConfig) -> ModelT:  # type: ignore[assignment]
    """Load and validate a YAML config file against `model`."""
    return validate(load_yaml(path), model, source=str(path))


def check_name(name: str, source: str) -> str:
    """A name given on the command line (a run's, a target's): it becomes a folder, so it follows the
    same rule as a job file's names (no `/`, no `..`)."""
    if not re.fullmatch(NAME_PATTERN, name) or len(name) > 100:
        rule = "up to 100 letters, digits, '_', '.', '-', starting with a letter or digit"
        raise ConfigError(f"{source}: {name!r} is not a name ({rule})")
    return name


def validate(data: Any, model: type[ModelT], source: str, key_style: str = "yaml") -> ModelT:
    """Validate a mapping against `model`; on failure raise ConfigError naming `source` and each key.

    key_style "cli" writes top-level keys as command-line options (`--per-class`).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        lines = [_describe(item, data, model, key_style) for item in _root_causes(error.errors())]
        noun = "error" if len(lines) == 1 else "errors"
        raise ConfigError(f"{source}: {len(lines)} config {noun}:\n" + "\n".join(lines)) from None


def _root_causes(items: list[Any]) -> list[Any]:
    """The errors without those that only follow from another: a list 'too short after validation'
    because its items were refused (`sizes: [-5]` is one error, the -5, not also an empty list)."""
    refused = {tuple(item["loc"][:-1]) for item in items if item["loc"] and isinstance(item["loc"][-1], int)}
    return [item for item in items if not (item["type"] == "too_short" and tuple(item["loc"]) in refused)]


def _describe(item: dict[str, Any], data: Any, model: type[BaseModel], key_style: str) -> str:
    keys = _user_key_path(item["loc"], data)
    path = _format_path(keys, key_style)
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, keys[:-1], data)
        close = difflib.get_close_matches(str(keys[-1]), allowed, n=1)
        hint = f"; did you mean {_format_path([close[0]], key_style)!r}?" if close else ""
        return f"  {path}: unknown key{hint}"
    if item["type"] == "missing":
        return f"  {path}: required key is missing"
    if item["type"] == "too_short":  # pydantic says "... after validation", which reads as a second fault
        least, length = item.get("ctx", {}).get("min_length"), item.get("ctx", {}).get("actual_length")
        return f"  {path}: needs at least {least} {'value' if least == 1 else 'values'}, got {length}"
    got = item.get("input")
    shown = "" if isinstance(got, dict | list) or not keys else f" (got {got!r})"
    return f"  {path or '(top level)'}: {message}{shown}{_quoted_value_hint(item['type'], got)}"


def _quoted_value_hint(error_type: str, got: Any) -> str:
    """Files that vitpipe once read leniently (`lr: "3e-3"`, `use_gpu: "yes"`) are told what to write."""
    if not isinstance(got, str):
        return ""
    if error_type in ("float_type", "int_type"):
        with contextlib.suppress(ValueError):
            float(got)
            return "; write the number without quotes"
    if error_type == "bool_type" and got.lower() in ("yes", "no", "true", "false", "on", "off"):
        return "; write true or false, without quotes"
    return ""


def _user_key_path(loc: tuple[Any, ...], data: Any) -> list[Any]:
    """The error's location as the user wrote it: drop the discriminator tags pydantic inserts."""
    keys: list[Any] = []
    node = data
    for part in loc:
        inside_dict = isinstance(node, dict) and part in node
        inside_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if inside_dict or inside_list:
            node = node[part]  # type: ignore[index]
        elif isinstance(node, dict) and part in (node.get("kind"), _model_family(node)):
            continue  # the tagged-union branch, not a key of the file
        else:
            node = None
        keys.append(part)
    return keys


def _format_path(keys: list[Any], key_style: str) -> str:
    text = ""
    for key in keys:
        if isinstance(key, int):
            text += f"[{key}]"
        elif key_style == "cli" and not text:
            text = "--" + str(key).replace("_", "-")
        else:
            text += ("." if text else "") + str(key)
    return text


def _allowed_keys(model: type[BaseModel], parent: list[Any], data: Any) -> list[str]:
    """Field names of the section at `parent`, for a did-you-mean hint."""
    annotation: Any = model
    node = data
    for part in parent:
        node = node.get(part) if isinstance(node, dict) else None
        annotation = _resolve(_child_annotation(annotation, part), node)
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return list(annotation.model_fields) if is_model else []


def _child_annotation(annotation: Any, part: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field is not None else None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict:
        return args[1]
    return args[0] if args else None


def _unannotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _resolve(annotation: Any, node: Any) -> Any:
    """Unwrap Annotated and Optional; pick a tagged-union branch by the node's `kind` (or `family`)."""
    annotation = _unannotated(annotation)
    members = [_unannotated(a) for a in typing.get_args(annotation)]
    branches = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
    if not branches or typing.get_origin(annotation) in (dict, list, tuple):
        return annotation
    node = node if isinstance(node, dict) else {}
    tags = {"kind": node.get("kind"), "family": _model_family(node)}
    chosen = [
        branch
        for branch in branches
        for tag, value in tags.items()
        if tag in branch.model_fields and typing.get_args(branch.model_fields[tag].annotation) == (value,)
    ]
    return (chosen or branches)[0]
