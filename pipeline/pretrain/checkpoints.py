"""The checkpoints of a run in its storage: `checkpoint_NNNNNNNN/` folders holding one DeepSpeed tag
folder (every rank's shards), `vitpipe.json`, which says what the checkpoint is without unpickling it,
and one `vitpipe.rank-KKKKK.json` per rank, which lists the files that rank uploaded (it is uploaded
after them: a rank killed before its upload ended leaves none); and where the run's export goes
(`export/vitpipe`, `export/hf`).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs

from pipeline.console import say
from pipeline.storage import basename, join, read_json, resolve, url_of
from vit.config import FAMILIES, Architecture, architecture_from_record

META_FILE = "vitpipe.json"
RANK_RECORD = "vitpipe.rank-{rank:05d}.json"
CHECKPOINT_PREFIX = "checkpoint_"
EXPORT_DIR = "export"
VITPIPE_DIR = "vitpipe"
EMA_DIR = "ema"  # in a checkpoint folder: each rank's EMA weights (vit.fragments files)
BEST_DIR = "best"  # in a run folder: best/KIND/, the weights the probes scored best, as a vitpipe model
BEST_RECORD = "best.json"  # in best/KIND/: the step, its score, what was probed, and its weights' folder


Kind = Literal["raw", "ema"]  # the weights a run keeps: as trained, or their EMA (pretrain.ema)


@dataclass(frozen=True)
class Selection:
    """Which weights of a run an export holds: the last step's or the best-probed step's, raw or EMA."""

    select: Literal["last", "best"] = "last"
    weights: Kind = "raw"

    @property
    def other(self) -> Kind:
        return "ema" if self.weights == "raw" else "raw"


LAST_RAW = Selection()  # what an export holds unless asked otherwise


def best_dir(run_dir: str, kind: str) -> str:
    """RUN/best/KIND: where the best-scored weights of a kind are kept (best.json, and the weights in the
    step folder it names)."""
    return join(run_dir, BEST_DIR, kind)


def read_best(folder: str) -> dict[str, Any] | None:
    """A kind's best.json (in RUN/best/KIND), or None when there is none; one that is not what the probes
    write (step, score, the weights' folder, the probes' key) is named, with the way on."""
    location = join(folder, BEST_RECORD)
    record = read_json(location)
    if record is None:
        return None
    fields = {"step": int, "score": int | float, "folder": str, "probe_key": str}
    wrong = [
        name
        for name, kind in fields.items()
        if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool)
    ]
    if wrong:
        raise ValueError(
            f"{location}: damaged ({', '.join(wrong)} missing or not what the probes write); delete {folder} "
            "for the probes to find the best again, or export the last step"
        )
    return record


def best_weights_name(step: int) -> str:
    """The folder in RUN/best/KIND holding the weights of a best step: each best its own, so the record
    switches from one whole folder to the next."""
    return f"step-{step:08d}"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def rank_record(rank: int) -> str:
    """The name of the record rank `rank` writes last into a checkpoint folder: its files and sizes."""
    return RANK_RECORD.format(rank=rank)


def step_of(path: str) -> int:
    """The step of a `checkpoint_NNNNNNNN` folder (a path or URL), from its name."""
    return int(basename(path).rsplit("_", 1)[-1])


@dataclass(frozen=True)
class CheckpointInfo:
    """A finished checkpoint: where it is and its `vitpipe.json`."""

    path: str  # path or URL of the checkpoint_NNNNNNNN folder
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def tag(self) -> str:
        return str(self.meta["tag"])


@dataclass(frozen=True)
class Skipped:
    """A checkpoint folder that cannot be resumed or exported, and why."""

    path: str
    why: str


def scan_checkpoints(run_dir: str) -> tuple[list[CheckpointInfo], list[Skipped]]:
    """The run's complete checkpoints, oldest first, and the folders skipped: no `vitpipe.json` (an upload
    that did not finish), a damaged one, a rank's record missing or damaged, or a file a record lists
    missing or of another size (truncated)."""
    filesystem, root = resolve(run_dir)
    found, skipped = [], []
    for entry in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = entry.base_name
        if entry.type != pafs.FileType.Directory or not _CHECKPOINT_NAME.fullmatch(name):
            continue
        meta, why = _read_meta(filesystem, entry.path)
        why = why or _missing_files(filesystem, entry.path, meta)
        if why:
            skipped.append(Skipped(url_of(run_dir, entry.path), why))
        else:
            found.append(CheckpointInfo(url_of(run_dir, entry.path), meta))
    return sorted(found, key=lambda info: info.step), sorted(skipped, key=lambda item: item.path)


_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}[0-9]+")


def _read_meta(filesystem: pafs.FileSystem, folder: str) -> tuple[dict[str, Any], str]:
    try:
        with filesystem.open_input_stream(posixpath.join(folder, META_FILE)) as stream:
            meta = json.loads(stream.read())
    except FileNotFoundError:
        return {}, f"no {META_FILE} (an upload that did not finish)"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return {}, f"{META_FILE} is damaged ({error})"
    if not isinstance(meta, dict) or not {"step", "tag"} <= set(meta) or not set(FAMILIES) & set(meta):
        return {}, f"{META_FILE} is damaged (it lacks step, tag or the model: {' or '.join(FAMILIES)})"
    return meta, ""


def _missing_files(filesystem: pafs.FileSystem, folder: str, meta: dict[str, Any]) -> str:
    """'' when every file the checkpoint's records list is there at its recorded size, else the first
    that is not. `parts` (written by ranks that each record their own files) asks for every rank's record;
    checkpoints before it list all files in `files`, or none (the oldest)."""
    if "parts" not in meta and not meta.get("files"):
        return ""
    sizes = {
        posixpath.relpath(info.path, folder): info.size
        for info in filesystem.get_file_info(pafs.FileSelector(folder, recursive=True))
        if info.type == pafs.FileType.File
    }
    if "parts" not in meta:
        return _unlike(meta["files"], sizes, META_FILE)
    parts = meta["parts"]
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        return f"{META_FILE} is damaged (parts {parts!r} is no number of ranks)"
    for rank in range(parts):
        record = rank_record(rank)
        if record not in sizes:
            return f"rank {rank} did not finish its upload (no {record})"
        listed, why = _read_record(filesystem, posixpath.join(folder, record))
        if not why and listed.get("attempt") != meta.get("attempt"):
            why = f"{record} is of another attempt at this step (a save stopped part-way, then made again)"
        why = why or _unlike(listed["files"], sizes, record)
        if why:
            return why
    return ""


def _read_record(filesystem: pafs.FileSystem, path: str) -> tuple[dict[str, Any], str]:
    """A rank record (its `files` and their sizes, and the save's `attempt`), or why it cannot be read."""
    name = posixpath.basename(path)
    try:
        with filesystem.open_input_stream(path) as stream:
            record = json.loads(stream.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return {}, f"{name} is damaged ({error})"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return {}, f"{name} is damaged (it lists no files)"
    return record, ""


def ema_files(folder: Path, meta: dict[str, Any]) -> list[Path]:
    """The EMA part files of a complete checkpoint (a local copy of it): those its ranks' records list,
    so a file left by an earlier, unfinished attempt at the same step on more ranks is not read."""
    found = sorted((folder / EMA_DIR).glob("*.safetensors"))
    if "parts" not in meta:
        return found
    listed: set[str] = set()
    for rank in range(int(meta["parts"])):
        record, why = _read_record(pafs.LocalFileSystem(), str(folder / rank_record(rank)))
        if why:
            raise ValueError(f"{folder}: {why}")
        listed |= set(record["files"])
    return [path for path in found if str(path.relative_to(folder)) in listed]


def _unlike(listed: dict[str, int], sizes: dict[str, int], record: str) -> str:
    """The first file of `listed` missing from `sizes` or of another size, said; '' when none is."""
    for name, size in sorted(listed.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} is {sizes[name]:,} bytes, {record} records {size:,} (truncated or replaced)"
    return ""


def list_checkpoints(run_dir: str) -> list[CheckpointInfo]:
    """The run's complete checkpoints, oldest first."""
    return scan_checkpoints(run_dir)[0]


def latest_checkpoint(run_dir: str) -> CheckpointInfo | None:
    """The newest complete checkpoint; each newer folder skipped is named on stderr, with why."""
    return newest(*scan_checkpoints(run_dir))


_NAMED: set[tuple[str, str]] = set()  # the skipped folders this process has named: each once a command


def newest(checkpoints: list[CheckpointInfo], skipped: list[Skipped]) -> CheckpointInfo | None:
    """The last of `checkpoints` (from scan_checkpoints), after naming each newer skipped folder (once,
    though a launch looks for the newest checkpoint several times: preflight, resume, export)."""
    latest = checkpoints[-1] if checkpoints else None
    for item in skipped:
        if (latest is None or step_of(item.path) > latest.step) and (item.path, item.why) not in _NAMED:
            _NAMED.add((item.path, item.why))
            fallback = f"using step {latest.step:,}" if latest else "no complete checkpoint before it"
            say(f"vitpipe: skipping {item.path}: {item.why}; {fallback}", err=True)
    return latest


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under a local folder, by relative path, with its size: what a checkpoint records."""
    files = (path for path in folder.rglob("*") if path.is_file())
    return {str(path.relative_to(folder)): path.stat().st_size for path in files}


# What a pretraining run writes into its folder (vitpipe's workers and driver, and Ray Train itself):
# `--force pretrain` deletes these and nothing else the folder may hold.
RUN_OUTPUTS = re.compile(
    rf"({CHECKPOINT_PREFIX}[0-9]+|{EXPORT_DIR}(-[0-9]+|-best|-last)?(-ema)?|{BEST_DIR}|metrics\.jsonl|tensorboard|loss\.png"
    r"|checkpoint_manager_snapshot\.json|\..*\.partial)"
)


def is_run_output(name: str) -> bool:
    return RUN_OUTPUTS.fullmatch(name) is not None


def architecture_of(meta: dict[str, Any], checkpoint: str) -> Architecture:
    """The model a checkpoint's vitpipe.json records (a ViT or a BiT), errors naming the checkpoint."""
    return architecture_from_record(meta, source=posixpath.join(checkpoint, META_FILE))
