"""What a command's options become: a `datasets`/`preprocess` command's config section, a single-stage
command's StageOptions, and the arguments that continue a stopped command. Each is checked here, before
anything starts, so that a wrong option is one line naming it."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import (
    DEFAULT_PATCH_SIZE,
    ConfigError,
    DigitsConfig,
    FractalsConfig,
    ImageFolderConfig,
    MnistConfig,
    PreprocessConfig,
    Section,
    check_name,
    validate,
)
from pipeline.runner.plan import Overrides, StageOptions

DATASET_MODELS: dict[str, type[Section]] = {
    "digits": DigitsConfig,
    "mnist": MnistConfig,
    "fractals": FractalsConfig,
    "imagefolder": ImageFolderConfig,
}


# The options of `vitpipe datasets KIND` that are not the dataset's settings.
NOT_SETTINGS = {"command", "kind", "out", "overwrite", "preview", "address", "verbose"}


def dataset_config(args: argparse.Namespace) -> Section:
    """The validated dataset config from the options given (unset options keep the schema's defaults)."""
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS and v is not None}
    if "src" in values:
        values["src"] = str(values["src"])
    for key in ("shard_samples", "shard_bytes"):
        if key in values and str(values[key]).lower() == "none":
            values[key] = None  # 'none' lifts that limit
    if values.get("shard_samples") is not None:
        option = f"vitpipe datasets {args.kind}: --shard-samples"
        values["shard_samples"] = _as_int(values["shard_samples"], option)
    return validate(
        values, DATASET_MODELS[args.kind], source=f"vitpipe datasets {args.kind}", key_style="cli"
    )


PREPROCESS_OPTIONS = (
    "image_size",
    "patch_size",
    "channels",
    "resize",
    "resample",
    "image_keys",
    "label_key",
    "max_pixels",
    "compression",
    "max_failure_rate",
)


def preprocess_config(args: argparse.Namespace) -> PreprocessConfig:
    """The validated preprocessing config from the options given."""
    values: dict[str, Any] = {k: getattr(args, k) for k in PREPROCESS_OPTIONS if getattr(args, k) is not None}
    if "image_keys" in values:
        values["image_keys"] = tuple(key.strip().lstrip(".") for key in values["image_keys"].split(","))
    if str(values.get("label_key", "")).lower() == "none":
        values["label_key"] = None
    values.setdefault("patch_size", DEFAULT_PATCH_SIZE)
    return validate(values, PreprocessConfig, source="vitpipe preprocess", key_style="cli")


def _as_int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option}: expected a whole number or 'none', got {text!r}") from None


def stage_options(args: argparse.Namespace) -> StageOptions:
    """A single-stage command's options, checked: --target NAME=DIR, --name, --steps with --data-only."""
    given: dict[str, str] = {}
    for option in getattr(args, "target", []):
        name, separator, directory = option.partition("=")
        if not separator or not name or not directory:
            raise ConfigError(f"vitpipe {args.command}: --target expects NAME=DIR, got {option!r}")
        check_name(name, f"vitpipe {args.command}: --target {option!r}")
        if name in given:
            raise ConfigError(
                f"vitpipe {args.command}: --target {name} is given twice ({given[name]}, {directory})"
            )
        given[name] = directory
    if getattr(args, "name", None) is not None:
        check_name(args.name, f"vitpipe {args.command}: --name")
    if getattr(args, "data_only", False):
        if args.force:
            raise ConfigError("vitpipe pretrain: --data-only trains nothing; drop --force")
        if args.steps is not None and args.steps < 1:
            raise ConfigError(f"vitpipe pretrain: --steps must be at least 1 (got {args.steps})")
    elif getattr(args, "steps", None) is not None:
        raise ConfigError(
            "vitpipe pretrain: --steps goes with --data-only; the run's budget is pretrain.steps"
        )
    return StageOptions(
        data=getattr(args, "data", None),
        weights=getattr(args, "weights", None),
        storage=getattr(args, "storage", None),
        name=getattr(args, "name", None),
        overrides=Overrides(targets=given, out=getattr(args, "out", None)),
    )


def going_on(argv: list[str]) -> list[str]:
    """A stopped command's arguments less those that redo work (--from STAGE, --force), which would throw
    away the checkpoint it stopped at: following "continue with" resumes."""
    command = argv[0] if argv else ""
    takes_stage = command in ("run", "submit")  # `run --force STAGE`; `pretrain --force [pretrain]`
    kept, drop_next = [], False
    for arg in argv:
        name, equals, _ = arg.partition("=")
        if drop_next and (takes_stage or arg == command):
            drop_next = False
        elif name in ("--from", "--force"):
            drop_next = not equals
        else:
            drop_next = False
            kept.append(arg)
    return kept
