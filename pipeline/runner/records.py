"""Step records (RUN/stages/STEP.json) and the fingerprints that make up cache keys.

A step's key hashes its settings, the fingerprints of the steps it reads and of any input from outside
the run. A finished step records its key and the fingerprint of what it wrote; a rerun whose key
matches skips it. A step that writes the same bytes every time (datasets, preprocessing) is
fingerprinted by its descriptor file, so redoing it does not invalidate what follows; a training step
gets a new fingerprint every time it runs.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from pipeline.config import ConfigError, digest
from pipeline.console import say
from pipeline.preprocess.manifest import MANIFEST_FILE, read_manifest
from pipeline.preprocess.sources import list_shards
from pipeline.storage import check_location, join, resolve, walk_files, write_atomic

if TYPE_CHECKING:
    from pipeline.runner.plan import JobPlan, Step

FORMAT = "vitpipe.step/1"


SIDE_PREFIX = "out-"  # the item of a side step: results of other weights or targets, beside the run's own


def side_item(out: str) -> str:
    """The item of the side step writing to `out` (its own key and record, never one of the job's steps)."""
    return SIDE_PREFIX + digest(out)[:8]


def is_side(step_id: str) -> bool:
    """Whether a step (`finetune:out-1a2b3c4d`) is a side command's, not one of the job's own (whose finetune
    and evaluate steps have no item: an item of another stage is a name the job chose, `out-` or not)."""
    stage, _, item = step_id.partition(":")
    return stage in ("finetune", "evaluate") and item.startswith(SIDE_PREFIX)


def step_key(settings: dict[str, Any], upstream: dict[str, str], external: dict[str, str], root: str) -> str:
    """The step's cache key, with every path inside the run folder `root` written relative to it: a run
    folder moved or copied elsewhere keeps its keys, and so every step it finished."""
    document = {"settings": settings, "upstream": upstream, "external": external}
    return digest(_in_run(document, root.rstrip("/")))


def key_matches(
    record: dict[str, Any],
    settings: dict[str, Any],
    upstream: dict[str, str],
    external: dict[str, str],
    root: str,
) -> bool:
    """Whether a record was made with these settings: its key is this one, or (a record written before
    keys were made folder-free) the key of the same settings with absolute paths."""
    legacy = digest({"settings": settings, "upstream": upstream, "external": external})
    return record.get("key") in (step_key(settings, upstream, external, root), legacy)


def _in_run(value: Any, root: str) -> Any:
    """`value` with each string that is `root` or a path below it (in values and keys) as RUN or RUN/..."""
    if isinstance(value, dict):
        return {_in_run(key, root): _in_run(item, root) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_in_run(item, root) for item in value]
    if isinstance(value, str):
        head, separator, tail = value.partition(root)
        if separator and (not tail or tail.startswith("/")) and (not head or head.endswith(":")):
            return f"{head}RUN{tail}"  # a path (`/r/x`) or a key naming one (`patches:/r/x`)
    return value


def fresh_fingerprint() -> str:
    """The fingerprint of a step whose outputs differ run to run (training)."""
    return uuid.uuid4().hex[:16]


def file_fingerprint(location: str) -> str:
    """Hash of a (small) file's bytes, local or remote; FileNotFoundError names it."""
    filesystem, path = resolve(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return hashlib.sha256(stream.read()).hexdigest()[:16]
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such file") from None


def tree_fingerprint(location: str) -> str:
    """Hash of a folder's listing: every file's relative path, size and modification time."""
    filesystem, root = resolve(location)
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location}: no such folder")
    entries = sorted(
        (posixpath.relpath(info.path, root), info.size, info.mtime_ns)
        for info in walk_files(filesystem, root).files
    )
    return digest(entries)


def shards_fingerprint(location: str) -> str:
    """Hash of the shards a preprocess input names: their names and sizes."""
    listing = list_shards(location)
    return digest([(shard.name, shard.size) for shard in listing.shards])


def external_fingerprint(kind: str, location: str) -> str:
    """The fingerprint of an input from outside the run: a patch directory (its manifest), a folder
    (its listing) or WebDataset shards (their sizes)."""
    if kind == "patches":
        read_manifest(location)  # a missing folder or manifest is named as such
        return file_fingerprint(join(location, MANIFEST_FILE))
    if kind == "shards":
        return shards_fingerprint(location)
    return tree_fingerprint(location)


def external_fingerprints(plan: JobPlan, step: Step) -> dict[str, str]:
    """The fingerprints of every input of `step` from outside the run; one that is missing or unusable
    is a ConfigError naming the job file, the step and the location (before anything runs)."""
    fingerprints = {}
    for kind, where in step.external:
        try:
            check_location(where)  # a URL's options and endpoint, in one line
            fingerprints[f"{kind}:{where}"] = external_fingerprint(kind, where)
        except (FileNotFoundError, ValueError) as error:
            message = f"{plan.source}: {step.id} reads {where!r}, which is unusable: {error}"
            raise ConfigError(message) from None
    return fingerprints


def read_record(stages_dir: str, step_id: str) -> dict[str, Any] | None:
    """The step's record, or None when there is none or it is unusable (torn, hand-edited, of another
    format, a "done" without its key or fingerprint): the step then runs again, and says why."""
    path = Path(stages_dir) / record_path_name(step_id)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _unusable(path, "not valid JSON")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return _unusable(path, f"not a {FORMAT} record")
    missing = [key for key in RECORD_KEYS[record.get("status")] if not isinstance(record.get(key), str)]
    if missing:
        return _unusable(path, f"status {record.get('status')!r} without {', '.join(missing)}")
    return record


# What a record of each status must hold to be used (a "done" record's fingerprint feeds the keys after it).
RECORD_KEYS: dict[Any, tuple[str, ...]] = defaultdict(lambda: ("status",))
RECORD_KEYS.update({"done": ("key", "fingerprint"), "running": ("key",), "failed": ("key",)})


def _unusable(path: Path, why: str) -> None:
    say(f"[run] {path}: {why}; the step is treated as not run", err=True)
    return None


def write_record(stages_dir: str, step_id: str, record: dict[str, Any]) -> None:
    """Write a record whole (temporary name, then rename), so a killed run never leaves half of one."""
    document = json.dumps({"format": FORMAT, "step": step_id, **record}, indent=2) + "\n"
    write_atomic(str(Path(stages_dir) / record_path_name(step_id)), document)


def record_path_name(step_id: str) -> str:
    """The file name of a step's record in RUN/stages."""
    return step_id.replace(":", ".") + ".json"
