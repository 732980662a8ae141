"""Folders on local disk and on a non-local filesystem (fsspec's in-memory one stands in for a bucket)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline.storage import URL_OPTIONS, check_location, local_folder, publish_folder, remove_folder, resolve


def staged(root: Path, **files: str) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_publishing_replaces_entries_of_the_same_name_and_keeps_the_rest(tmp_path):
    out = tmp_path / "out"
    publish_folder(staged(tmp_path / "a", **{"result.json": "old", "keep.txt": "kept"}), str(out))
    publish_folder(staged(tmp_path / "b", **{"result.json": "new"}), str(out))
    assert (out / "result.json").read_text() == "new"
    assert (out / "keep.txt").read_text() == "kept"
    assert local_folder(str(out), tmp_path / "unused") == out
    remove_folder(str(out))
    assert not out.exists()
    remove_folder(str(out))  # nothing there: nothing to do


def test_a_remote_folder_is_uploaded_downloaded_and_removed(tmp_path):
    publish_folder(staged(tmp_path / "a", **{"result.json": "remote"}), "memory://bucket/run")
    memory = fsspec.filesystem("memory")
    assert memory.cat("/bucket/run/result.json") == b"remote"
    copy = local_folder("memory://bucket/run", tmp_path / "download")
    assert (copy / "result.json").read_text() == "remote"
    remove_folder("memory://bucket/run")
    assert not memory.exists("/bucket/run/result.json")


def test_url_options_are_checked_against_what_pyarrow_reads_before_anything_connects():
    region = "region=us-east-1&"  # so that pyarrow asks no bucket for its region
    for key in URL_OPTIONS["s3"]:  # every key named as known is one the installed pyarrow reads
        value = {"scheme": "http"}.get(
            key, "true" if key.startswith(("allow", "tls_verify", "smart")) else "x"
        )
        resolve(f"s3://b/p?{'' if key == 'region' else region}{key}={value}")
    for key in URL_OPTIONS["gs"]:
        resolve(f"gs://b/p?{key}={'http' if key == 'scheme' else '1'}")
    with pytest.raises(pa.ArrowInvalid, match="Unexpected query parameter"):
        pafs.FileSystem.from_uri(f"s3://b/p?{region}bogus=1")  # and pyarrow still refuses the others

    with pytest.raises(
        ValueError, match=r"unknown s3:// URL option 'bogus' \(known: region, scheme, endpoint"
    ):
        resolve("s3://b/p?bogus=1")
    with pytest.raises(ValueError, match="URL option 'region' is given 2 times"):
        resolve("s3://b/p?region=a&region=b")
    with pytest.raises(ValueError, match="not KEY=VALUE pairs"):
        resolve("s3://b/p?region")
    with pytest.raises(ValueError, match=r"s3://b/p.*String is not a valid boolean value: 'maybe'"):
        resolve(f"s3://b/p?{region}allow_bucket_creation=maybe")  # pyarrow's word, not fsspec's detour
    with pytest.raises(ValueError, match="unknown gs:// URL option 'bogus'"):
        resolve("gs://b/p?bogus=1")


def test_an_unreachable_endpoint_is_one_line_naming_it_and_what_was_tried():
    url = "s3://bucket/path?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"
    with pytest.raises(ValueError, match="cannot reach") as refused:
        check_location(url)
    assert str(refused.value) == (
        f"{url}: cannot reach the S3 endpoint 127.0.0.1:1: a TCP connection to 127.0.0.1:1 failed "
        "(Connection refused)"
    )  # refused at once, not after the S3 client's seconds of retries
    with pytest.raises(ValueError, match=r"endpoint_override '127\.0\.0\.1:port' has no valid port"):
        check_location("s3://bucket/path?endpoint_override=127.0.0.1:port&region=us-east-1")
    check_location(str(Path("/nonexistent/folder")))  # a local path needs no check, not even existence
