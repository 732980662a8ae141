"""Where shards are: a directory, a glob or a brace pattern, on local disk or any pyarrow/fsspec filesystem.

Each input shard gets a name relative to the input's root directory (`train/corpus-000003.tar`), which
becomes its output's name (`train/corpus-000003.parquet`), so splits and sub-folders carry over.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from dataclasses import dataclass, field

import braceexpand
import pyarrow.fs as pafs

from pipeline.storage import resolve, walk_files

# The tars the reader opens, matched in any case: Python's streaming tar reader (`r|*`) detects gzip, bzip2
# and xz itself; zstd and lz4 pyarrow decompresses on the way (ShardSource.compression). A folder's other
# files are not shards (`x.tar.md5`), but a tar compressed otherwise (`.tar.lzma`, `.tar.br`) is refused.
SHARD_SUFFIXES = (
    ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst", ".tar.lz4",
)  # fmt: skip
_CODECS = {".tar.zst": "zstd", ".tzst": "zstd", ".tar.lz4": "lz4"}  # what pyarrow decompresses
_OTHER_COMPRESSION = re.compile(r"\.tar(\.(zstd|lz|lzma|lzo|br|z|sz|7z))$|\.t(lz)$")
_BRACE = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class ShardSource:
    """One input shard: the path its filesystem opens, its name under the input root, its size."""

    path: str
    name: str
    size: int | None  # None when it does not exist (an unreadable shard, found out by the worker)

    @property
    def compression(self) -> str | None:
        """The codec pyarrow reads the shard through (zstd, lz4), by its name in any case; None: the tar
        reader takes its bytes as they are (and detects gzip, bzip2 and xz itself)."""
        lower = self.name.lower()
        return next((codec for suffix, codec in _CODECS.items() if lower.endswith(suffix)), None)

    @property
    def output_name(self) -> str:
        """`train/x-000001.tar` -> `train/x-000001.parquet`."""
        lower = self.name.lower()
        stem = next((self.name[: -len(s)] for s in SHARD_SUFFIXES if lower.endswith(s)), self.name)
        return stem + ".parquet"


@dataclass(frozen=True)
class ShardListing:
    filesystem: pafs.FileSystem
    root: str
    shards: list[ShardSource]
    skipped: list[str] = field(default_factory=list)  # links not followed, a line each (see walk_files)


def list_shards(location: str) -> ShardListing:
    """Expand INPUT into its shards, sorted by name; an input that names no shard is an error."""
    filesystem, path = resolve(location)
    skipped: list[str] = []
    if _BRACE.search(path):
        paths = list(braceexpand.braceexpand(path))
        root = _common_dir(paths)
        infos = filesystem.get_file_info(paths)
        shards = [
            _source(p, root, info.size if info.type == pafs.FileType.File else None)
            for p, info in zip(paths, infos, strict=True)
        ]
    elif _GLOB_CHARS.search(path):
        root = _static_prefix_dir(path)
        files, skipped = _walk(filesystem, root)
        shards = [
            _source(info.path, root, info.size) for info in files if fnmatch.fnmatchcase(info.path, path)
        ]
    else:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{location}: no such file or directory")
        if info.type == pafs.FileType.File:
            root = posixpath.dirname(path)
            shards = [_source(path, root, info.size)]
        else:
            root = path
            files, skipped = _walk(filesystem, root)
            shards = [_source(i.path, root, i.size) for i in files if _is_shard(i.path) or _other(i.path)]
    _refuse_other_compressions(shards)
    if not shards:
        raise FileNotFoundError(
            f"{location}: no shards found (looking for {', '.join(SHARD_SUFFIXES)} files, in any case)"
        )
    shards.sort(key=lambda shard: shard.name)
    outputs = [shard.output_name for shard in shards]
    if len(set(outputs)) != len(outputs):
        clash = next(name for name in outputs if outputs.count(name) > 1)
        raise ValueError(f"{location}: two input shards would both be written to {clash}; rename one")
    return ShardListing(filesystem, root, shards, skipped)


def _walk(filesystem: pafs.FileSystem, root: str) -> tuple[list[pafs.FileInfo], list[str]]:
    """Regular files below `root`, each real file once, skipping hidden files and folders (`.partial`,
    `.git`, ...); and the links not followed (a loop, a broken link), a line each."""
    walk = walk_files(filesystem, root)
    visible = [info for info in walk.files if not _hidden(posixpath.relpath(info.path, root))]
    skipped = [f"{path} {why}; skipped" for path, why in walk.skipped if not _hidden(path)]
    return visible, skipped


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _is_shard(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def _other(path: str) -> str | None:
    """The compression suffix of a tar the reader cannot open (`.tar.zst` -> `.zst`), else None."""
    if _is_shard(path):
        return None
    found = _OTHER_COMPRESSION.search(posixpath.basename(path).lower())
    if found is None:
        return None
    return found.group(1) or f".{found.group(3)}"  # `.tzst` is a `.tar.zst`


def _refuse_other_compressions(shards: list[ShardSource]) -> None:
    """A tar compressed as the reader cannot read is named, never skipped: skipping it loses its samples."""
    other = [shard for shard in shards if _other(shard.path)]
    if other:
        more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        raise ValueError(
            f"{other[0].path}: a tar compressed as {_other(other[0].path)}, which the tar reader cannot open"
            f"{more}; it reads {', '.join(SHARD_SUFFIXES)}: decompress it to .tar, or name the shards to "
            "read with a glob or brace pattern"
        )


def _source(path: str, root: str, size: int | None) -> ShardSource:
    return ShardSource(path=path, name=posixpath.relpath(path, root), size=size)


def _common_dir(paths: list[str]) -> str:
    return posixpath.commonpath([posixpath.dirname(p) for p in paths]) if paths else ""


def _static_prefix_dir(pattern: str) -> str:
    """The deepest directory of a glob before its first wildcard: `/d/train/*.tar` -> `/d/train`."""
    parts = pattern.split("/")
    static = []
    for part in parts[:-1]:
        if _GLOB_CHARS.search(part):
            break
        static.append(part)
    return "/".join(static) or "/"
