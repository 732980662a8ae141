"""The checkpoints of a run in its storage: `checkpoint_NNNNNNNN/` folders holding one DeepSpeed tag
folder (every rank's shards) and `vitpipe.json`, which says what the checkpoint is without unpickling it;
and where the run's export goes (`export/vitpipe`, `export/hf`).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline.storage import resolve

META_FILE = "vitpipe.json"
CHECKPOINT_PREFIX = "checkpoint_"
EXPORT_DIR = "export"
VITPIPE_DIR = "vitpipe"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def step_of(path: str) -> int:
    """The step of a `checkpoint_NNNNNNNN` folder, from its name."""
    return int(path.rstrip("/").rsplit("_", 1)[-1])


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


def list_checkpoints(run_dir: str) -> list[CheckpointInfo]:
    """The run's complete checkpoints (those with a `vitpipe.json`), oldest first."""
    filesystem, root = resolve(run_dir)
    selector = pafs.FileSelector(root, allow_not_found=True)
    found = []
    for entry in filesystem.get_file_info(selector):
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            with filesystem.open_input_stream(posixpath.join(entry.path, META_FILE)) as stream:
                meta = json.loads(stream.read())
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # an upload that did not finish
        prefix = run_dir.split("://", 1)[0] + "://" if "://" in run_dir else ""
        found.append(CheckpointInfo(prefix + entry.path, meta))
    return sorted(found, key=lambda info: info.step)


def latest_checkpoint(run_dir: str) -> CheckpointInfo | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None
