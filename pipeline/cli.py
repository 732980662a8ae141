"""The `vitpipe` command line. Every command validates its settings through pipeline.config first,
so a bad option fails before any Ray work starts."""

from __future__ import annotations

import argparse
import posixpath
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import (
    ConfigError,
    DigitsConfig,
    EvaluateConfig,
    FinetuneConfig,
    FractalsConfig,
    ImageFolderConfig,
    ModelConfig,
    PipelineConfig,
    PreprocessConfig,
    PretrainConfig,
    Section,
    load_config,
    load_yaml,
    validate,
)

EXIT_USAGE, EXIT_FAILED = 2, 1
DEMO_JOB = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitpipe", description="Pretrain, fine-tune and evaluate ViTs on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="versions, accelerator and the reachable Ray cluster")
    _add_address(info)

    check = commands.add_parser("validate", help="check a pipeline config file and print it resolved")
    check.add_argument("config", type=Path)

    demo = commands.add_parser("demo", help="build the datasets of the quickstart job (digits, fractals)")
    demo.add_argument("--job", type=Path, default=DEMO_JOB, help="job whose datasets to build")
    demo.add_argument("--out", type=Path, default=Path("data/demo"))
    demo.add_argument("--overwrite", action="store_true")
    _add_address(demo)

    datasets = commands.add_parser("datasets", help="write a dataset as WebDataset shards")
    kinds = datasets.add_subparsers(dest="kind", required=True, metavar="KIND")

    digits = kinds.add_parser("digits", help="scikit-learn's handwritten digits, train and test splits")
    digits.add_argument("out", type=Path)
    digits.add_argument("--test-fraction", type=float)
    digits.add_argument("--shard-size", type=int)

    fractals = kinds.add_parser("fractals", help="FractalDB-style synthetic pretraining corpus")
    fractals.add_argument("out", type=Path)
    fractals.add_argument("--classes", type=int)
    fractals.add_argument("--per-class", type=int)
    fractals.add_argument("--size", type=int, help="image side in pixels")
    fractals.add_argument("--shard-size", type=int)
    fractals.add_argument("--min-maps", type=int)
    fractals.add_argument("--max-maps", type=int)
    fractals.add_argument("--jitter", type=float, help="relative per-instance perturbation of the IFS")
    fractals.add_argument("--jpeg-quality", type=int)

    folder = kinds.add_parser("imagefolder", help="a class_name/image.ext tree of your own images")
    folder.add_argument("src", type=Path)
    folder.add_argument("out", type=Path)
    folder.add_argument("--split")
    folder.add_argument("--shard-samples", help="samples per shard ('none': no limit)")
    folder.add_argument("--shard-bytes", help="bytes per shard, e.g. 256MB ('none')")
    folder.add_argument("--max-pixels", type=int, help="larger images are skipped (decompression bombs)")

    prep = commands.add_parser(
        "preprocess", help="decode, resize and patchify WebDataset shards into Parquet patch shards"
    )
    prep.add_argument("input", help="a folder, a glob or a brace pattern of .tar shards; a path or a URL")
    prep.add_argument("output", help="folder (or URL) for the patch files and _manifest.json")
    prep.add_argument("--image-size", type=int)
    prep.add_argument("--patch-size", type=int)
    prep.add_argument("--channels", type=int, help="3 (RGB) or 1 (grayscale)")
    prep.add_argument("--resize", help="shorter-side-center-crop (default), squash or pad")
    prep.add_argument("--resample", help="bilinear (default) or bicubic; antialiased either way")
    prep.add_argument("--image-keys", help="comma-separated image extensions, first found wins")
    prep.add_argument("--label-key", help="'cls', 'json:FIELD', or 'none' for an unlabelled corpus")
    prep.add_argument("--max-pixels", type=int, help="larger images are skipped (decompression bombs)")
    prep.add_argument("--compression", help="Parquet compression: none (default), lz4, zstd or snappy")
    prep.add_argument("--max-failure-rate", type=float, help="exit non-zero above this fraction failed")
    prep.add_argument("--workers", type=int, help="shards processed at once (default: all cluster CPUs)")
    prep.add_argument("--overwrite", action="store_true", help="replace outputs made with another config")
    _add_address(prep)

    look = commands.add_parser("inspect", help="summarise a preprocessed folder and draw samples as a PNG")
    look.add_argument("directory")
    look.add_argument("--samples", type=int, default=32, help="how many samples to draw")
    look.add_argument("--split", help="which split to draw (default: the first)")
    look.add_argument("--out", help="PNG path (default: DIRECTORY/samples.png)")

    train = commands.add_parser(
        "pretrain",
        help="pretrain a ViT with DeepSpeed ZeRO on Ray Train (resumes a run that has checkpoints)",
    )
    train.add_argument(
        "config", type=Path, help="a pretrain config YAML, or a job YAML with a pretrain: section"
    )
    train.add_argument("--data", help="preprocessed patch directory (default: the config's data)")
    train.add_argument("--name", help="run name (default: the config file's stem, or the job's name)")
    train.add_argument(
        "--storage", help="where runs live, a path or URL (default: storage_path, else ./runs)"
    )
    _add_address(train)

    export = commands.add_parser(
        "export", help="consolidate a pretraining checkpoint into vitpipe + HF weights"
    )
    export.add_argument("run", help="the run directory (STORAGE/NAME)")
    export.add_argument("--checkpoint", help="checkpoint folder name or step (default: the newest)")
    export.add_argument("--out", help="output folder (default: RUN/export)")

    tune = commands.add_parser(
        "finetune",
        help="fine-tune on target datasets (pretrained and from scratch) as parallel Ray tasks; evaluate",
    )
    score = commands.add_parser(
        "evaluate", help="evaluate weights on target datasets without training: few-shot linear and test"
    )
    for sub in (tune, score):
        sub.add_argument("config", type=Path, help="a job YAML with a finetune: (and evaluate:) section")
        sub.add_argument(
            "--weights", help="pretrained weights, vitpipe or HF folder (default: finetune.weights, "
            "else the export of the job's pretraining run)",
        )  # fmt: skip
        sub.add_argument(
            "--target", action="append", default=[], metavar="NAME=DIR",
            help="a target's preprocessed directory (repeatable); adds to or replaces the config's targets",
        )  # fmt: skip
        sub.add_argument("--out", help="results folder, a path or URL (default: runs/NAME/transfer)")
        _add_address(sub)

    for sub in (digits, fractals, folder):
        sub.add_argument("--name", help="shard file prefix and dataset name")
        sub.add_argument("--seed", type=int)
        sub.add_argument("--overwrite", action="store_true", help="replace an existing dataset at OUT")
        sub.add_argument("--preview", action="store_true", help="also write OUT/preview.png")
        _add_address(sub)
    return parser


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray)")


DATASET_MODELS: dict[str, type[Section]] = {
    "digits": DigitsConfig,
    "fractals": FractalsConfig,
    "imagefolder": ImageFolderConfig,
}
NOT_SETTINGS = {"command", "kind", "out", "overwrite", "preview", "address"}


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
    return validate(values, PreprocessConfig, source="vitpipe preprocess", key_style="cli")


def pretrain_config(path: Path, data_dir: str | None = None) -> tuple[PretrainConfig, str]:
    """A pretrain config file, or a job file's pretrain section; with the run name it implies."""
    data = load_yaml(path)
    if isinstance(data, dict) and "pretrain" in data:
        job = validate(data, PipelineConfig, str(path))
        if job.pretrain is None:
            raise ConfigError(f"{path}: pretrain: is empty")
        if data_dir is None and job.pretrain.data in job.preprocess:
            raise ConfigError(
                f"{path}: pretrain.data {job.pretrain.data!r} names the job's preprocess entry; pass "
                f"its preprocessed directory with --data (after `make demo`: "
                f"data/demo/{job.pretrain.data}-patches)"
            )
        return job.pretrain, job.name
    return validate(data, PretrainConfig, str(path)), path.stem


@dataclass(frozen=True)
class TransferInputs:
    """Everything `vitpipe finetune`/`evaluate` resolved from the job file and the options."""

    finetune: FinetuneConfig
    evaluate: EvaluateConfig | None
    targets: dict[str, str]
    weights: str | None
    model: ModelConfig | None
    out: str
    name: str


def transfer_inputs(args: argparse.Namespace, train: bool) -> TransferInputs:
    """Resolve targets, weights and the output folder; every problem is a ConfigError, before Ray starts."""
    from pipeline.pretrain.export import EXPORT_DIR, VITPIPE_DIR
    from pipeline.pretrain.launch import DEFAULT_STORAGE, run_location

    command = "finetune" if train else "evaluate"
    job = load_config(args.config, PipelineConfig)
    given: dict[str, str] = {}
    for option in args.target:
        name, separator, directory = option.partition("=")
        if not separator or not name or not directory:
            raise ConfigError(f"vitpipe {command}: --target expects NAME=DIR, got {option!r}")
        given[name] = directory
    finetune = job.finetune
    if finetune is None:
        if train or not given:
            raise ConfigError(f"{args.config}: no finetune: section (and no --target NAME=DIR)")
        finetune = FinetuneConfig(targets=list(given))
    targets: dict[str, str] = {}
    for entry in finetune.targets:
        if entry in given:
            targets[entry] = given[entry]
        elif entry in job.preprocess or entry in job.datasets:
            raise ConfigError(
                f"{args.config}: finetune target {entry!r} names the job's preprocess entry; pass its "
                f"preprocessed directory with --target {entry}=DIR (after `make demo`: "
                f"--target {entry}=data/demo/{entry}-patches)"
            )
        else:
            targets[Path(entry.rstrip("/")).name or entry] = entry
    targets |= {name: directory for name, directory in given.items() if name not in targets}
    run_dir = (
        run_location(job.pretrain, job.name)[1] if job.pretrain else posixpath.join(DEFAULT_STORAGE, job.name)
    )
    weights = args.weights or finetune.weights
    if weights is None and job.pretrain is not None:
        weights = posixpath.join(run_dir, EXPORT_DIR, VITPIPE_DIR)
        if "://" not in weights and not Path(weights).is_dir():
            raise ConfigError(
                f"{args.config}: no pretrained weights at {weights} (the export of the job's pretraining "
                f"run); run `vitpipe pretrain {args.config}` first, or pass --weights"
            )
    if weights is None and (not train or "pretrained" in finetune.modes):
        raise ConfigError(f"{args.config}: no weights to {command}; set finetune.weights or pass --weights")
    evaluate = job.evaluate if job.evaluate is not None or train else EvaluateConfig()
    out = args.out or posixpath.join(run_dir, "transfer" if train else "evaluate")
    model = job.pretrain.model if job.pretrain else None
    return TransferInputs(finetune, evaluate, targets, weights, model, out, job.name)


def _as_int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option}: expected a whole number or 'none', got {text!r}") from None


def build_dataset(config: Section, out: Path, overwrite: bool, preview: bool) -> None:
    """Build one dataset with the builder for its kind; print its summary."""
    from pipeline.datasets.card import summarize
    from pipeline.datasets.digits import build_digits
    from pipeline.datasets.fractals import build_fractals
    from pipeline.datasets.imagefolder import build_imagefolder
    from pipeline.datasets.preview import write_preview

    builders: dict[str, Callable[..., Path]] = {
        "digits": build_digits,
        "fractals": build_fractals,
        "imagefolder": build_imagefolder,
    }
    builders[config.kind](config, out, overwrite=overwrite)  # type: ignore[attr-defined]
    print(summarize(out))
    if preview:
        print(f"  preview: {write_preview(out)}")


def run_demo(job: PipelineConfig, out: Path, overwrite: bool) -> None:
    """Build every dataset of `job` under `out/{name}` with previews, then preprocess each one the job
    preprocesses into `out/{name}-patches` with a sample grid: the quickstart's A and B, ready to train."""
    from pipeline.preprocess.inspect import describe, write_grid
    from pipeline.preprocess.run import preprocess

    started = time.perf_counter()
    for name, dataset in job.datasets.items():
        build_dataset(dataset, out / name, overwrite, preview=True)
    for name, config in job.preprocess.items():
        patches = out / f"{name}-patches"
        result = preprocess(str(out / name), str(patches), config, overwrite=overwrite)
        print(result.summary())
        print(describe(str(patches)))
        print(f"  samples: {write_grid(str(patches))}")
    seconds = time.perf_counter() - started
    print(
        f"{len(job.datasets)} datasets and {len(job.preprocess)} patch sets of job {job.name!r} "
        f"ready under {out} in {seconds:.1f}s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as error:
        print(f"vitpipe: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (
        FileExistsError, FileNotFoundError, NotADirectoryError, ValueError, ConnectionError, RuntimeError
    ) as error:  # fmt: skip
        print(f"vitpipe: error: {error}", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline.ray_session import init_ray

    if args.command == "info":
        from pipeline.info import report

        print(report(args.address))
    elif args.command == "validate":
        config = load_config(args.config, PipelineConfig)
        print(f"{args.config}: valid (config hash {config.digest()})")
        print(config.model_dump_json(indent=2))
    elif args.command == "demo":
        job = load_config(args.job, PipelineConfig)
        print(init_ray(args.address), file=sys.stderr)
        run_demo(job, args.out, args.overwrite)
    elif args.command == "preprocess":
        from pipeline.preprocess.run import preprocess

        config = preprocess_config(args)  # validate before Ray starts
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"vitpipe preprocess: --workers must be at least 1 (got {args.workers})")
        print(init_ray(args.address), file=sys.stderr)
        result = preprocess(args.input, args.output, config, overwrite=args.overwrite, workers=args.workers)
        print(result.summary())
        return EXIT_FAILED if result.exceeded else 0
    elif args.command == "pretrain":
        from pipeline.pretrain.launch import pretrain

        config, name = pretrain_config(args.config, args.data)  # validate before Ray starts
        result = pretrain(config, name=args.name or name, data=args.data, storage_path=args.storage,
                          address=args.address)  # fmt: skip
        print(result.summary())
    elif args.command in ("finetune", "evaluate"):
        from pipeline.transfer.launch import transfer

        train = args.command == "finetune"
        inputs = transfer_inputs(args, train)  # validate before Ray starts
        result = transfer(
            inputs.finetune, inputs.evaluate, inputs.targets, out=inputs.out, weights=inputs.weights,
            model=inputs.model, train=train, name=inputs.name, address=args.address,
        )  # fmt: skip
        print(result.summary())
        for failure in result.failures:
            where = failure["target"] + (f"/{failure['mode']}" if failure.get("mode") else "")
            print(f"vitpipe: {where} failed: {failure['error']}", file=sys.stderr)
        return EXIT_FAILED if result.failures else 0
    elif args.command == "export":
        from pipeline.pretrain.export import export_checkpoint

        exported = export_checkpoint(args.run, args.checkpoint, args.out)
        print(f"exported step {exported.step} of {exported.checkpoint}")
        print(f"  weights: {exported.vitpipe} (vitpipe), {exported.hf} (HF transformers)")
    elif args.command == "inspect":
        from pipeline.preprocess.inspect import describe, write_grid

        print(describe(args.directory))
        print(f"  samples: {write_grid(args.directory, args.out, args.samples, split=args.split)}")
    elif args.command == "datasets":
        config = dataset_config(args)  # validate before Ray starts
        print(init_ray(args.address), file=sys.stderr)
        build_dataset(config, args.out, args.overwrite, args.preview)
    return 0


if __name__ == "__main__":
    sys.exit(main())
