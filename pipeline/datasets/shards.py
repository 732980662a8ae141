"""Writing WebDataset tar shards: deterministic bytes, atomic files, one Ray task per shard.

A shard is a plain tar of `key.ext` members grouped by key, readable by `webdataset.WebDataset`
and by Python's `tarfile`. Members carry fixed metadata (mtime 0, root-owned, read-only) so the
same samples always give the same bytes, whichever worker or machine wrote them.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.storage import atomic_file

USTAR = tarfile.USTAR_FORMAT

Sample = tuple[str, dict[str, bytes]]  # key, {extension: bytes}


@dataclass
class ShardResult:
    """What one shard task wrote, and what it skipped."""

    file: str
    samples: int
    bytes: int
    class_counts: dict[int, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


def shard_name(name: str, index: int) -> str:
    """`{name}-{index:06d}.tar`, the numbering brace patterns such as `{000000..000012}` expand to."""
    return f"{name}-{index:06d}.tar"


def brace_pattern(name: str, count: int) -> str:
    """The brace pattern naming shards 0..count-1, as WebDataset and `vitpipe preprocess` accept."""
    if count == 1:
        return shard_name(name, 0)
    return f"{name}-{{{0:06d}..{count - 1:06d}}}.tar"


def write_shard(path: Path, samples: Iterable[Sample]) -> tuple[int, int]:
    """Write samples to `path` atomically (temporary name, then rename); return (samples, bytes)."""
    count = 0
    seen: set[str] = set()
    with atomic_file(str(path)) as (_, partial), tarfile.open(partial, "w", format=USTAR) as tar:
        for key, members in samples:
            if not key or "." in key or "/" in key or key in seen:
                raise ValueError(f"{path.name}: sample key {key!r} is empty, repeated or has '.' or '/'")
            seen.add(key)
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
            count += 1
    return count, path.stat().st_size


def result_dicts(results: Iterable[ShardResult]) -> list[dict[str, Any]]:
    """Per-shard entries for dataset.json (file, samples, bytes), without the per-sample details."""
    return [{k: v for k, v in asdict(r).items() if k in ("file", "samples", "bytes")} for r in results]
