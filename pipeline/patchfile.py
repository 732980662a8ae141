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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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
