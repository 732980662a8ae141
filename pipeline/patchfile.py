"""The patch-shard file: one Parquet file per input shard, readable with plain pyarrow and numpy.

Columns: `key` (string), `label` (int64, null when unlabelled), `patches` (fixed-size binary of
N * P*P*C uint8 bytes: the image's patches in `vit.patches.patchify` layout), `source` (the input
shard's name). The patches are one fixed-size binary value per row rather than a nested list:
Parquet encodes a list element by element, 8x slower to write and 15x slower to read for 224px
photo patches (benchmarks/bench_preprocess.py). The file's footer holds `vitpipe.shard`: the
config hash, the source shard's size, counts and every failed sample, so a rerun can trust a
finished file without reading its rows.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.storage import resolve_all
from vit.patches import PatchGeometry

PATCHES_FORMAT = "vitpipe.patches/1"
SHARD_METADATA_KEY = "vitpipe.shard"
ROW_GROUP_BYTES = 32 * 1024**2


def patch_schema(geometry: PatchGeometry) -> pa.Schema:
    shape = json.dumps([geometry.num_patches, geometry.patch_dim])
    patches = pa.field(
        "patches",
        pa.binary(geometry.sample_bytes),
        nullable=False,
        metadata={"vitpipe.shape": shape, "vitpipe.dtype": "uint8"},
    )
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("label", pa.int64()),
        patches,
        pa.field("source", pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata={"vitpipe.format": PATCHES_FORMAT, **_geometry_metadata(geometry)})


def _geometry_metadata(geometry: PatchGeometry) -> dict[str, str]:
    return {f"vitpipe.{k}": json.dumps(v) for k, v in geometry.to_dict().items() if k != "layout"}


class PatchShardWriter:
    """Writes rows in row groups of about 32 MiB, so a worker holds one group, never a whole shard."""

    def __init__(
        self,
        filesystem: pafs.FileSystem,
        path: str,
        geometry: PatchGeometry,
        source: str,
        compression: str,
    ) -> None:
        self.geometry, self.source = geometry, source
        self.rows_per_group = max(1, ROW_GROUP_BYTES // geometry.sample_bytes)
        self.schema = patch_schema(geometry)
        self._stream = filesystem.open_output_stream(path)
        self._writer = pq.ParquetWriter(
            self._stream,
            self.schema,
            compression=compression,
            use_dictionary=["source"],
            write_statistics=["key", "label"],
        )
        self._keys: list[str] = []
        self._labels: list[int | None] = []
        self._patches = bytearray()

    def add(self, key: str, label: int | None, patches: np.ndarray) -> None:
        if patches.nbytes != self.geometry.sample_bytes or patches.dtype != np.uint8:
            raise ValueError(
                f"{key}: patches are {patches.dtype} x {patches.nbytes} bytes, not the geometry's"
            )
        self._keys.append(key)
        self._labels.append(label)
        self._patches += patches.tobytes()
        if len(self._keys) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if not self._keys:
            return
        rows = len(self._keys)
        patches = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(self.geometry.sample_bytes), rows, [None, pa.py_buffer(bytes(self._patches))]
        )
        columns = [pa.array(self._keys, pa.string()), pa.array(self._labels, pa.int64()), patches]
        columns.append(pa.array([self.source] * rows, pa.string()))
        self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._keys, self._labels, self._patches = [], [], bytearray()

    def close(self, shard_metadata: dict[str, Any]) -> None:
        """Write the last rows and the footer carrying `shard_metadata`."""
        self._flush()
        self._writer.add_key_value_metadata({SHARD_METADATA_KEY: json.dumps(shard_metadata, sort_keys=True)})
        self._writer.close()
        self._stream.close()

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._stream.close()


def read_shard_metadata(filesystem: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The footer's `vitpipe.shard` entry, or None when the file is missing, incomplete or not ours."""
    try:
        with filesystem.open_input_file(path) as handle:
            metadata = pq.read_metadata(handle).metadata or {}
        footer = json.loads(metadata[SHARD_METADATA_KEY.encode()])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None
    return footer if isinstance(footer, dict) and "config_hash" in footer else None


def patches_array(column: pa.Array | pa.ChunkedArray, geometry: PatchGeometry | None = None) -> np.ndarray:
    """The `patches` column as a `[rows, num_patches, patch_dim]` uint8 array (no copy for one chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    width = column.type.byte_width
    parts = [
        np.frombuffer(chunk.buffers()[1], np.uint8, count=len(chunk) * width, offset=chunk.offset * width)
        for chunk in chunks
        if len(chunk)
    ]
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, np.uint8)
    if geometry is not None:
        return flat.reshape(-1, geometry.num_patches, geometry.patch_dim)
    return flat.reshape(len(column), -1) if len(column) else flat.reshape(0, width)


def geometry_of(schema: pa.Schema) -> PatchGeometry:
    """Read a patch file's geometry back from its schema metadata."""
    metadata = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if metadata.get("vitpipe.format") != PATCHES_FORMAT:
        raise ValueError(f"not a vitpipe patch file (format {metadata.get('vitpipe.format')!r})")
    return PatchGeometry.from_dict({key.removeprefix("vitpipe."): value for key, value in metadata.items()})


# --- reading rows: the pretraining feed's reader ----------------------------------------------------

READ_BYTES = 32 * 2**20  # one read: about one row group of the patch files (ROW_GROUP_BYTES)
READ_ROWS = 4096  # and at most this many rows (small images: a first batch soon, files opened in steps)
COLUMNS = ["patches", "label"]


@dataclass
class _Group:
    patches: np.ndarray  # [rows, sample_bytes] uint8, a view of Arrow's buffer
    labels: np.ndarray  # [rows] int64


class RowReader:
    """Reads rows of patch files (each expected to hold `counts` rows) by row group, keeping the most recent
    groups (a shuffle window draws its rows from a few groups, read once): thread-safe, each group read by
    one thread at a time."""

    def __init__(
        self, files: Sequence[str], counts: Sequence[int], geometry: PatchGeometry, cache_bytes: int
    ) -> None:
        self.files, self.counts, self.geometry, self.cache_bytes = files, counts, geometry, cache_bytes
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple[int, int], Future[_Group]] = OrderedDict()
        self._footers: dict[int, Any] = {}
        self._held = 0  # bytes of the groups read and kept
        # One filesystem for all the files, built once (an s3:// filesystem per read would cost each read
        # a client and its credential lookup).
        self._filesystem, self._paths = resolve_all(list(files))

    def read(self, files: np.ndarray, rows: np.ndarray, patches: np.ndarray, labels: np.ndarray) -> None:
        """Rows `rows` of files `files` (indices into the reader's files), in that order, into `patches`
        (uint8 [n, sample_bytes]) and `labels` (int64 [n]): the caller's buffers, pinned memory on a GPU."""
        n = len(rows)
        by_group = self._locate(files, rows)
        staged = np.empty((n, self.geometry.sample_bytes), np.uint8)
        staged_labels = np.empty(n, np.int64)
        order = np.empty(n, np.int64)  # staged row of each position
        at = 0
        for key, (positions, group_rows) in by_group.items():
            group = self._group(*key)
            stop = at + len(group_rows)
            np.take(group.patches, group_rows, axis=0, out=staged[at:stop])
            np.take(group.labels, group_rows, out=staged_labels[at:stop])
            order[positions] = np.arange(at, stop)
            at = stop
        np.take(staged, order, axis=0, out=patches)
        np.take(staged_labels, order, out=labels)

    def _locate(
        self, files: np.ndarray, rows_of: np.ndarray
    ) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        """Positions grouped by (file, row group), with each one's row within its group."""
        out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for file in np.unique(files).tolist():
            positions = np.flatnonzero(files == file)
            rows = rows_of[positions]
            ends = self._footer(file)[1]
            if len(rows) and rows.max() >= (ends[-1] if len(ends) else 0):
                held = int(ends[-1]) if len(ends) else 0
                raise ValueError(
                    f"{self.files[file]}: holds {held} rows, fewer than the run's plan reads of it "
                    f"({self.counts[file]}, from the manifest); the file changed after preprocessing: "
                    "preprocess the split again"
                )
            group = np.searchsorted(ends, rows, side="right")
            starts = np.concatenate([[0], ends[:-1]])
            for index in np.unique(group).tolist():
                mine = group == index
                out[(file, index)] = (positions[mine], rows[mine] - starts[index])
        return out

    def _footer(self, file: int) -> tuple[Any, np.ndarray]:
        """The file's Parquet metadata and the cumulative row count at the end of each row group."""
        footer = self._footers.get(file)
        if footer is None:
            try:
                with self._filesystem.open_input_file(self._paths[file]) as stream:
                    metadata = pq.ParquetFile(stream).metadata
            except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
                raise OSError(f"{self.files[file]}: not a readable patch file: {error}") from error
            ends = np.cumsum([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
            footer = self._footers[file] = (metadata, ends)
        return footer

    def _group(self, file: int, index: int) -> _Group:
        key = (file, index)
        with self._lock:
            future = self._groups.get(key)
            mine = future is None
            if mine:
                future = self._groups[key] = Future()
            self._groups.move_to_end(key)
        if mine:
            try:
                group = self._read_group(file, index)
            except BaseException as error:
                with self._lock:
                    self._groups.pop(key, None)
                future.set_exception(error)
                raise
            future.set_result(group)
            self._keep(group.patches.nbytes)
        return future.result()

    def _read_group(self, file: int, index: int) -> _Group:
        metadata = self._footer(file)[0]
        try:
            with self._filesystem.open_input_file(self._paths[file]) as stream:
                table = pq.ParquetFile(stream, metadata=metadata).read_row_group(index, columns=COLUMNS)
        except (OSError, ValueError) as error:
            raise OSError(f"{self.files[file]}: row group {index} cannot be read: {error}") from error
        return _Group(patches_array(table.column("patches")), table.column("label").to_numpy())

    def _keep(self, size: int) -> None:
        """Count a group just read, and drop the least recently used read ones beyond the budget."""
        with self._lock:
            self._held += size
            while self._held > self.cache_bytes and len(self._groups) > 1:
                key, oldest = next(iter(self._groups.items()))
                if not oldest.done():
                    break
                self._groups.pop(key)
                self._held -= oldest.result().patches.nbytes
