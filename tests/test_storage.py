"""Folders on local disk and on a non-local filesystem (fsspec's in-memory one stands in for a bucket)."""

from __future__ import annotations

from pathlib import Path

import fsspec

from pipeline.storage import local_folder, publish_folder, remove_folder


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
