"""The shard writer: bad sample keys are refused and a failed write leaves no shard behind."""

from __future__ import annotations

import tarfile

import pytest

from pipeline.datasets.shards import brace_pattern, write_shard


@pytest.mark.parametrize("bad_key", ["", "a.b", "a/b"])
def test_bad_key_is_refused_and_no_shard_is_left(tmp_path, bad_key):
    path = tmp_path / "x-000000.tar"
    with pytest.raises(ValueError, match=r"x-000000\.tar: sample key"):
        write_shard(path, [("good", {"cls": b"1"}), (bad_key, {"cls": b"2"})])
    assert not path.exists()


def test_repeated_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="repeated"):
        write_shard(tmp_path / "x.tar", [("k", {"cls": b"1"}), ("k", {"cls": b"2"})])


def test_written_shard_is_a_plain_tar_with_fixed_metadata(tmp_path):
    path = tmp_path / "x.tar"
    assert write_shard(path, [("k0", {"png": b"p", "cls": b"3"})]) == (1, path.stat().st_size)
    with tarfile.open(path) as tar:
        assert tar.getnames() == ["k0.png", "k0.cls"]
        assert {(m.mtime, m.uid, m.mode) for m in tar.getmembers()} == {(0, 0, 0o444)}


def test_brace_pattern():
    assert brace_pattern("d", 1) == "d-000000.tar"
    assert brace_pattern("d", 12) == "d-{000000..000011}.tar"
