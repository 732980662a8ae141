"""`_manifest.json`: what a patch directory holds, written last, from the shards' own footers.

It has no timestamps or paths of the machine that wrote it, so a run that was killed and resumed
writes the same bytes as one that was not.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from pipeline.config import PreprocessConfig
from pipeline.patchfile import PATCHES_FORMAT
from pipeline.storage import atomic_file, resolve, url_of
from vit.patches import PatchGeometry

if TYPE_CHECKING:  # the shard worker imports torch; reading a manifest must not
    from pipeline.preprocess.shard import ShardReport

MANIFEST_FILE = "_manifest.json"
ROOT_SPLIT = "."  # the split name of shards that sit directly in the input folder


def build_manifest(
    config: PreprocessConfig, input_spec: str, classes: list[str] | None, reports: list[ShardReport]
) -> dict[str, Any]:
    per_class: Counter[str] = Counter()
    splits: dict[str, dict[str, Any]] = {}
    for report in reports:
        per_class.update(report.per_class)
        if report.file is not None:
            split = splits.setdefault(split_of(report.file), {"samples": 0, "files": []})
            split["samples"] += report.samples
            split["files"].append(report.file)
    samples = sum(r.samples for r in reports)
    failed = sum(r.failed for r in reports)
    return {
        "format": PATCHES_FORMAT,
        "input": input_spec,
        "config": config.model_dump(mode="json"),
        "config_hash": config.output_hash(),
        "patches": config.geometry().to_dict(),
        "classes": classes,
        "totals": {
            "shards": len(reports),
            "unreadable_shards": sum(1 for r in reports if r.file is None),
            "samples": samples,
            "failed": failed,
            "failure_rate": failed / (samples + failed) if samples + failed else 0.0,
            "per_class": {label: per_class[label] for label in sorted(per_class, key=int)},
        },
        "splits": dict(sorted(splits.items())),
        "shards": [
            {"source": r.source, "file": r.file, "samples": r.samples, "failed": r.failed} for r in reports
        ],
        "failures": [failure for r in reports for failure in r.failures],
    }


def failure_kinds(failures: list[dict[str, Any]]) -> str:
    """`corrupt image 3, duplicate key 1`: failures counted by the kind their reason starts with."""
    kinds = Counter(failure["reason"].split(":")[0] for failure in failures)
    return ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())


def failure_advice(failures: list[dict[str, Any]], examples: bool = True) -> list[str]:
    """The way on for the failures whose cause is the settings or the names, not the pixels: unlabelled
    samples read with a label key, and (with `examples`, the first in full) images a second dot joined."""
    lines = []
    unlabelled = next((f for f in failures if f["reason"].startswith("missing label:")), None)
    if unlabelled is not None:
        lines.append(
            f"{unlabelled['reason']}: an unlabelled corpus takes --label-key none (in a job: label_key: none "
            "in its preprocess entry); labels kept elsewhere: --label-key EXT or json:FIELD"
        )
    dotted = next((f for f in failures if f["reason"].startswith("dots in member names:")), None)
    if dotted is not None and examples:
        lines.append(f"{dotted['shard']}: {dotted['reason']}")
    return lines


def split_of(file: str) -> str:
    """`train/x-000001.parquet` is in split `train`; a file at the top level is in split `.`."""
    return posixpath.dirname(file) or ROOT_SPLIT


def write_manifest(filesystem: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> str:
    path = posixpath.join(root, MANIFEST_FILE)
    with atomic_file(path, filesystem) as (_, partial), filesystem.open_output_stream(partial) as stream:
        stream.write((json.dumps(manifest, indent=2) + "\n").encode())
    return path


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a patch directory (local path or URL); errors name the directory."""
    filesystem, root = resolve(directory)
    path = posixpath.join(root, MANIFEST_FILE)
    try:
        with filesystem.open_input_stream(path) as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError:
        if filesystem.get_file_info(root).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{directory}: no such directory") from None
        raise FileNotFoundError(
            f"{directory}: no {MANIFEST_FILE}; not a finished `vitpipe preprocess` output"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    except OSError:
        if filesystem.get_file_info(root).type == pafs.FileType.File:
            raise ValueError(f"{directory}: is a file, not a patch directory") from None
        raise
    if manifest.get("format") != PATCHES_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {PATCHES_FORMAT!r}")
    return manifest


def manifest_geometry(manifest: dict[str, Any], directory: str) -> PatchGeometry:
    """The patch geometry a preprocessed folder's manifest records."""
    source = posixpath.join(directory, MANIFEST_FILE)
    return PatchGeometry.from_dict(manifest.get("patches") or {}, source=source)


def manifest_classes(manifest: dict[str, Any], directory: str) -> list[str]:
    """The class names of a labelled patch directory; labels as names when the input had none."""
    names = manifest.get("classes")
    if names:
        return list(names)
    labels = [int(label) for label in manifest["totals"]["per_class"]]
    if not labels:
        raise ValueError(f"{directory}: no labelled samples")
    return [str(label) for label in range(max(labels) + 1)]


def patch_files(directory: str, split: str | None = None) -> list[str]:
    """The patch files of one split (or all), in order: local paths, or URLs when `directory` is one."""
    manifest = read_manifest(directory)
    _, root = resolve(directory)
    if split is not None and split not in manifest["splits"]:
        known = ", ".join(manifest["splits"]) or "none"
        raise KeyError(f"{directory}: no split {split!r}; it has {known}")
    names = [split] if split is not None else list(manifest["splits"])
    files = (posixpath.join(root, file) for name in names for file in manifest["splits"][name]["files"])
    return [url_of(directory, path) for path in files]
