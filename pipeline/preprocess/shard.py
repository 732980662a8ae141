"""One input shard to one patch file: the body of each Ray task, with no Ray in it.

The output is written under a hidden temporary name and renamed when complete, so a file with the
final name is always whole. Nothing a sample holds can stop the shard: each problem is recorded.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch

from pipeline.config import PreprocessConfig
from pipeline.patchfile import PatchShardWriter
from pipeline.preprocess.decode import decode_image
from pipeline.preprocess.samples import (
    Failure,
    SampleError,
    UnreadableShardError,
    dotted_images,
    dotted_reason,
    parse_label,
    read_samples,
)
from pipeline.preprocess.sources import ShardSource
from pipeline.storage import partial_name
from vit.patches import patchify


@dataclass
class ShardReport:
    """What became of one input shard; `reused` when a finished output from an earlier run was kept."""

    source: str
    file: str | None  # the output's name under OUTPUT; None when the shard could not be read at all
    samples: int = 0
    failed: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    reused: bool = False

    def footer(self, config_hash: str, source_size: int | None) -> dict[str, Any]:
        """What the output file's footer records, enough to rebuild this report without the rows."""
        return {
            "config_hash": config_hash,
            "source": self.source,
            "source_size": source_size,
            "samples": self.samples,
            "failed": self.failed,
            "per_class": self.per_class,
            "failures": self.failures,
        }

    @classmethod
    def from_footer(cls, footer: dict[str, Any], file: str) -> ShardReport:
        fields = ("source", "samples", "failed", "per_class", "failures")
        return cls(file=file, reused=True, **{name: footer[name] for name in fields})


def preprocess_shard(
    in_fs: pafs.FileSystem,
    out_fs: pafs.FileSystem,
    out_root: str,
    config: PreprocessConfig,
    num_classes: int | None,
    source: ShardSource,
) -> ShardReport:
    """Decode, resize and patchify every sample of `source` into `out_root/<source's output name>`."""
    torch.set_num_threads(1)  # one core per task; Ray schedules the parallelism
    started = time.perf_counter()
    report = ShardReport(source=source.name, file=source.output_name)
    geometry = config.geometry()
    final = posixpath.join(out_root, source.output_name)
    partial = partial_name(final)
    try:
        stream = in_fs.open_input_stream(source.path, compression=source.compression)
    except (OSError, ValueError) as error:
        return _unreadable(report, f"unreadable shard: cannot open {source.path} ({error})", started)
    per_class: Counter[int] = Counter()
    out_fs.create_dir(posixpath.dirname(final), recursive=True)
    writer = PatchShardWriter(out_fs, partial, geometry, source.name, config.compression)
    try:
        with stream:
            for item in read_samples(stream):
                if isinstance(item, Failure):
                    _record(report, item.key, item.reason)
                    continue
                if dotted := dotted_images(item.members, config.image_keys):
                    _record(report, item.key, dotted_reason(item.key, dotted), count=len(dotted))
                    continue
                try:
                    label = _label(item.members, config, num_classes)
                    image = _image_bytes(item.members, config)
                    patches = patchify(decode_image(image, config), config.patch_size)
                except SampleError as error:
                    _record(report, item.key, str(error))
                    continue
                except Exception as error:  # a decoder bug on odd bytes must not stop the shard either
                    _record(report, item.key, f"unexpected error: {type(error).__name__}: {error}")
                    continue
                writer.add(item.key, label, patches)
                report.samples += 1
                if label is not None:
                    per_class[label] += 1
        report.per_class = {str(label): per_class[label] for label in sorted(per_class)}
        writer.close(report.footer(config.output_hash(), source.size))
    except UnreadableShardError as error:  # raised before any sample, so nothing is lost
        writer.abort()
        _delete_quietly(out_fs, partial)
        return _unreadable(report, str(error), started)
    except BaseException:
        writer.abort()
        _delete_quietly(out_fs, partial)
        raise
    out_fs.move(partial, final)
    report.seconds = time.perf_counter() - started
    return report


def _label(members: dict[str, bytes], config: PreprocessConfig, num_classes: int | None) -> int | None:
    if config.label_key is None:
        return None
    label = parse_label(members, config.label_key)
    if num_classes is not None and label >= num_classes:
        raise SampleError(f"label out of range: {label} is not one of the dataset's {num_classes} classes")
    return label


def _image_bytes(members: dict[str, bytes], config: PreprocessConfig) -> bytes:
    for extension in config.image_keys:
        if extension in members:
            return members[extension]
    present = ", ".join(f".{e}" for e in sorted(members)) or "nothing"
    wanted = ", ".join(f".{e}" for e in config.image_keys)
    raise SampleError(f"no image: the sample has {present}, none of {wanted}")


def _record(report: ShardReport, key: str | None, reason: str, count: int = 1) -> None:
    """One failure listed; `count` samples lost by it (images that webdataset's key rule joined)."""
    report.failed += count
    report.failures.append({"shard": report.source, "key": key, "reason": reason})


def _unreadable(report: ShardReport, reason: str, started: float) -> ShardReport:
    report.file = None
    _record(report, None, reason)
    report.seconds = time.perf_counter() - started
    return report


def _delete_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):
        filesystem.delete_file(path)
