"""`vitpipe preprocess`: plan which shards need work, run one Ray task per shard, write the manifest.

Resuming is free: a patch file with the final name is complete (it was renamed into place), and
its footer says which config and which source size made it, so a rerun skips it and only
missing, incomplete or stale shards are processed again.
"""

from __future__ import annotations

import json
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import OUTPUT_NEUTRAL, PreprocessConfig
from pipeline.console import say
from pipeline.datasets.card import CARD_FILE, CARD_FORMAT
from pipeline.patchfile import read_shard_metadata
from pipeline.preprocess.manifest import (
    MANIFEST_FILE,
    build_manifest,
    failure_advice,
    failure_kinds,
    write_manifest,
)
from pipeline.preprocess.shard import ShardReport, preprocess_shard
from pipeline.preprocess.sources import ShardListing, ShardSource, list_shards
from pipeline.ray_session import connect_ray
from pipeline.ray_tasks import run_shard_tasks
from pipeline.storage import check_not_a_file, is_partial, resolve

FOOTER_READERS = 16


@dataclass
class PreprocessResult:
    manifest: dict[str, Any]
    manifest_path: str
    reused: int  # shards whose output an earlier run had finished
    processed: int
    processed_samples: int
    seconds: float

    @property
    def failure_rate(self) -> float:
        return self.manifest["totals"]["failure_rate"]

    @property
    def unreadable_rate(self) -> float:
        totals = self.manifest["totals"]
        return totals["unreadable_shards"] / totals["shards"]

    @property
    def exceeded(self) -> bool:
        """Whether failures went past `max_failure_rate` (samples, or whole unreadable shards)."""
        limit = self.manifest["config"]["max_failure_rate"]
        return self.failure_rate > limit or self.unreadable_rate > limit

    def summary(self) -> str:
        manifest, totals = self.manifest, self.manifest["totals"]
        geometry = manifest["patches"]
        limit = manifest["config"]["max_failure_rate"]
        lines = [
            f"preprocessed {totals['shards']} shard(s): {self.processed} now, {self.reused} already done",
            f"  samples: {totals['samples']:,} written, {totals['failed']:,} failed "
            f"({self.failure_rate:.2%}; limit {limit:.2%})",
        ]
        if totals["unreadable_shards"]:
            lines.append(f"  unreadable shards: {totals['unreadable_shards']} (rerun to retry them)")
        if manifest["failures"]:
            lines.append(f"  failures: {failure_kinds(manifest['failures'])}")
            lines += [f"  {line}" for line in failure_advice(manifest["failures"])]
        lines.append(
            f"  patches: {geometry['num_patches']} x {geometry['patch_dim']} uint8 per image "
            f"({geometry['image_size']}px, patch {geometry['patch_size']}, {geometry['channels']} channel(s))"
        )
        if self.processed:
            rate = self.processed_samples / self.seconds if self.seconds > 0 else 0.0
            lines.append(
                f"  this run: {self.processed_samples:,} images in {self.seconds:.1f}s, {rate:,.0f} images/s"
            )
        lines.append(f"  manifest: {self.manifest_path}")
        if self.exceeded:
            lines.append(f"  FAILED: more than {limit:.2%} of the input could not be used")
        return "\n".join(lines)


def preprocess(
    input_spec: str,
    output: str,
    config: PreprocessConfig,
    *,
    overwrite: bool = False,
    workers: int | None = None,
    address: str | None = None,
) -> PreprocessResult:
    """Turn the shards INPUT names into patch files under OUTPUT; see the module docstring for resuming.

    `workers` caps how many shards are processed at once (default: two tasks per cluster CPU queued).
    Refuses, before any work, an OUTPUT that holds files of another config unless `overwrite`. Ray
    (`address`, else a local one) starts only when there is a shard to process.
    """
    started = time.perf_counter()
    listing = list_shards(input_spec)
    for line in listing.skipped:
        say(f"{input_spec}: {line}")
    check_not_a_file(output)
    out_fs, out_root = resolve(output)
    config_hash = config.output_hash()
    _refuse_other_config(out_fs, out_root, output, config, overwrite)
    classes = class_names(listing)
    reports: dict[str, ShardReport] = {}
    todo: list[ShardSource] = []
    for shard, footer in zip(listing.shards, _footers(out_fs, out_root, listing.shards), strict=True):
        made_here = footer is not None and footer["config_hash"] == config_hash
        if footer is not None and not made_here and not overwrite:
            raise FileExistsError(
                f"{output}: {shard.output_name} was made with another preprocessing config "
                f"(hash {footer['config_hash']}, this run's is {config_hash}); choose another OUTPUT "
                "or pass --overwrite to replace it"
            )
        if made_here and footer["source_size"] == shard.size:
            reports[shard.name] = ShardReport.from_footer(footer, shard.output_name)
        else:
            todo.append(shard)
    _remove_partials(out_fs, out_root)
    processed_samples = 0
    if todo:
        connect_ray(address)
        shared = (listing.filesystem, out_fs, out_root, config, len(classes) if classes else None)
        results = run_shard_tasks(
            preprocess_shard,
            [(shard,) for shard in todo],
            label=f"preprocess ({len(reports)} of {len(listing.shards)} shards already done)",
            shared=shared,
            max_in_flight=workers,
        )
        for report in results:
            reports[report.source] = report
            processed_samples += report.samples
    ordered = [reports[shard.name] for shard in listing.shards]
    manifest = build_manifest(config, input_spec, classes, ordered)
    manifest_path = write_manifest(out_fs, out_root, manifest)
    return PreprocessResult(
        manifest=manifest,
        manifest_path=manifest_path,
        reused=len(listing.shards) - len(todo),
        processed=len(todo),
        processed_samples=processed_samples,
        seconds=time.perf_counter() - started,
    )


def _footers(
    filesystem: pafs.FileSystem, root: str, shards: list[ShardSource]
) -> list[dict[str, Any] | None]:
    """Every planned output's footer, read concurrently: on object storage each one is a request."""
    paths = [posixpath.join(root, shard.output_name) for shard in shards]
    with ThreadPoolExecutor(max_workers=FOOTER_READERS) as pool:
        return list(pool.map(lambda path: read_shard_metadata(filesystem, path), paths))


def _refuse_other_config(
    filesystem: pafs.FileSystem, root: str, output: str, config: PreprocessConfig, overwrite: bool
) -> None:
    """An OUTPUT whose manifest records another config is refused, naming the settings that differ."""
    try:
        with filesystem.open_input_stream(posixpath.join(root, MANIFEST_FILE)) as stream:
            previous = json.loads(stream.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return
    if overwrite or previous.get("config_hash") == config.output_hash():
        return
    old, new = previous.get("config", {}), config.model_dump(mode="json", exclude=OUTPUT_NEUTRAL)
    changes = [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in new if old.get(key) != new[key]]
    raise FileExistsError(
        f"{output}: already holds patches preprocessed with another config ({'; '.join(changes)}); "
        "choose another OUTPUT or pass --overwrite to replace them"
    )


def _remove_partials(filesystem: pafs.FileSystem, root: str) -> None:
    """Delete temporary files a killed run left behind (`.name.parquet.<id>.partial`)."""
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        if info.type == pafs.FileType.File and is_partial(info.path):
            filesystem.delete_file(info.path)


def class_names(listing: ShardListing) -> list[str] | None:
    """Class names from the vitpipe `dataset.json` beside the shards or one folder up, if there is one.

    A `dataset.json` that is not vitpipe's is someone else's file, and ignored; a damaged one is named
    (the labels stay numbers), not passed over in silence.
    """
    for folder in (listing.root, posixpath.dirname(listing.root)):
        path = posixpath.join(folder, CARD_FILE)
        try:
            with listing.filesystem.open_input_stream(path) as stream:
                card = json.loads(stream.read())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as error:
            say(f"vitpipe: warning: {path} cannot be read ({error}); no class names taken from it", err=True)
            continue
        if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
            continue
        classes = card.get("classes")
        if isinstance(classes, list) and all(isinstance(name, str) for name in classes):
            return classes
        say(
            f"vitpipe: warning: {path}: 'classes' is not a list of names; no class names taken from it",
            err=True,
        )
    return None
