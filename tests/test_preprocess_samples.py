"""A tar shard as a stream of samples: grouping by key, duplicates, truncation, labels."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile

import pytest
import webdataset

from pipeline.preprocess.samples import (
    Failure,
    LabelError,
    Sample,
    UnreadableShardError,
    dotted_images,
    parse_label,
    read_samples,
)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def read(data: bytes) -> list[Sample | Failure]:
    return list(read_samples(io.BytesIO(data)))


def test_members_group_by_key_as_webdataset_does():
    """The same keys and member names as webdataset's own reader on the same bytes (extensions are
    lower-cased here, which webdataset leaves as they are)."""
    members = [("dir/a.jpg", b"A"), ("dir/a.cls", b"1"), ("dir/a.seg.PNG", b"S"), ("b.jpg", b"B")]
    items = read(tar_bytes(members))
    assert items == [
        Sample("dir/a", {"jpg": b"A", "cls": b"1", "seg.png": b"S"}),
        Sample("b", {"jpg": b"B"}),
    ]
    shard = [{"url": "shard.tar", "stream": io.BytesIO(tar_bytes(members))}]
    reference = list(webdataset.tariterators.tar_file_expander(shard))
    grouped = list(webdataset.tariterators.group_by_keys(iter(reference)))
    assert [sample["__key__"] for sample in grouped] == [item.key for item in items]
    assert [sorted(k.lower() for k in s if not k.startswith("__")) for s in grouped] == [
        sorted(item.members) for item in items
    ]


def test_a_webdataset_meta_member_is_not_a_sample():
    """webdataset groups a top-level `__meta__.json` into a sample of its own; vitpipe skips it."""
    items = read(tar_bytes([("a.jpg", b"A"), ("__meta__.json", b"{}"), ("b.jpg", b"B")]))
    assert [item.key for item in items] == ["a", "b"]


def test_duplicate_keys_keep_the_first_sample_and_report_the_rest():
    items = read(
        tar_bytes([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.jpg", b"3"), ("c.jpg", b"4"), ("c.jpg", b"5")])
    )
    assert items[:2] == [Sample("a", {"jpg": b"1"}), Sample("b", {"jpg": b"2"})]
    assert items[2] == Failure("a", "duplicate key: an earlier sample in this shard has the same key")
    assert items[3] == Failure("c", "duplicate key: member c.jpg appears twice")


def test_truncated_tar_keeps_the_samples_before_the_break():
    data = tar_bytes([("a.jpg", b"x" * 600), ("b.jpg", b"y" * 5000), ("c.jpg", b"z" * 600)])
    items = read(data[:2500])  # inside b's data
    assert items[0] == Sample("a", {"jpg": b"x" * 600})
    assert isinstance(items[1], Failure)
    assert items[1].key == "b"
    assert items[1].reason.startswith("truncated shard: the tar breaks off after 1 members")
    assert len(items) == 2


@pytest.mark.parametrize("data", [b"", b"this is not a tar file at all" * 40], ids=["empty", "text"])
def test_bytes_that_are_not_a_tar_are_an_unreadable_shard(data):
    with pytest.raises(UnreadableShardError, match=r"^unreadable shard: not a tar file"):
        read(data)


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gz", "bz2", "xz"])
def test_compressed_tars_are_read_as_webdataset_reads_them(compress):
    items = read(compress(tar_bytes([("a.jpg", b"1")])))
    assert items == [Sample("a", {"jpg": b"1"})]


def test_images_named_with_a_second_dot_are_found_under_webdataset_key_rule():
    """webdataset's key is the name up to the first dot: `cat.0.png` is key `cat`, extension `0.png`."""
    members = [("cat.0.png", b"A"), ("cat.0.cls", b"1"), ("cat.1.png", b"B"), ("dog.jpg", b"C")]
    items = read(tar_bytes(members))
    assert [item.key for item in items] == ["cat", "dog"]
    assert dotted_images(items[0].members, ("jpg", "png")) == ["0.png", "1.png"]
    assert dotted_images(items[1].members, ("jpg", "png")) == []
    assert dotted_images({"jpg": b"", "seg.png": b""}, ("jpg",)) == []  # an image is found: extras are fine


@pytest.mark.parametrize(
    ("members", "key", "label"),
    [
        ({"cls": b"7\n"}, "cls", 7),
        ({"json": b'{"label": 3}'}, "json:label", 3),
        ({"json": b'{"meta": {"class": 12}}'}, "json:meta.class", 12),
        ({"txt": b" 0 "}, "txt", 0),
    ],
)
def test_label_sources(members, key, label):
    assert parse_label(members, key) == label


@pytest.mark.parametrize(
    ("members", "key", "reason"),
    [
        ({"jpg": b""}, "cls", "missing label: the sample has no .cls member"),
        ({"cls": b"cat"}, "cls", "malformed label: .cls holds 'cat', not an integer"),
        ({"cls": b"-2"}, "cls", "malformed label: cls is -2, a class index cannot be negative"),
        ({"json": b"{not json"}, "json:label", "malformed label: .json is not valid JSON"),
        ({"json": b'{"other": 1}'}, "json:label", "missing label: .json has no field 'label'"),
        ({"json": b'{"label": true}'}, "json:label", "malformed label: json:label is True, not an integer"),
        ({"json": b'{"label": "3"}'}, "json:label", "malformed label: json:label is '3', not an integer"),
    ],
)
def test_bad_labels_name_the_problem(members, key, reason):
    with pytest.raises(LabelError) as raised:
        parse_label(members, key)
    assert str(raised.value).startswith(reason)
