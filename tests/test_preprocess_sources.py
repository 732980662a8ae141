"""INPUT to shards: folders, globs, brace patterns, URLs, and the errors for inputs that name none."""

from __future__ import annotations

import threading

import pytest

from pipeline.preprocess.sources import list_shards


def touch(path, size: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_a_folder_gives_every_shard_below_it_named_relative_to_it(tmp_path):
    for name in (
        "train/a-000000.tar",
        "train/a-000001.tar.gz",
        "test/a-000000.tgz",
        "notes.txt",
        ".hidden/b.tar",
    ):
        touch(tmp_path / name)
    listing = list_shards(str(tmp_path))
    assert [s.name for s in listing.shards] == [
        "test/a-000000.tgz",
        "train/a-000000.tar",
        "train/a-000001.tar.gz",
    ]
    assert [s.output_name for s in listing.shards] == [
        "test/a-000000.parquet",
        "train/a-000000.parquet",
        "train/a-000001.parquet",
    ]


def test_glob_and_brace_patterns_are_relative_to_their_fixed_prefix(tmp_path):
    for index in range(3):
        touch(tmp_path / "train" / f"a-{index:06d}.tar", size=index + 1)
    globbed = list_shards(str(tmp_path / "train" / "a-00000[01].tar"))
    assert [s.name for s in globbed.shards] == ["a-000000.tar", "a-000001.tar"]
    braced = list_shards(f"file://{tmp_path}/train/a-{{000001..000003}}.tar")
    assert [(s.name, s.size) for s in braced.shards] == [
        ("a-000001.tar", 2),
        ("a-000002.tar", 3),
        ("a-000003.tar", None),  # missing: the worker records it as an unreadable shard
    ]


def test_urls_pyarrow_does_not_know_go_through_fsspec():
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    memory.pipe("/corpus/train/x-000000.tar", b"0123")
    listing = list_shards("memory://corpus")
    assert [(s.name, s.size) for s in listing.shards] == [("train/x-000000.tar", 4)]
    with listing.filesystem.open_input_stream(listing.shards[0].path) as stream:
        assert stream.read() == b"0123"


def test_inputs_that_name_no_shard_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        list_shards(str(tmp_path / "absent"))
    touch(tmp_path / "readme.txt")
    looking = r"no shards found \(looking for .tar, .tar.gz, .tgz, .tar.bz2, .tbz2, .tar.xz, .txz, .tar.zst"
    with pytest.raises(FileNotFoundError, match=looking):
        list_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no shards found"):
        list_shards(str(tmp_path / "*.tar"))


def test_two_inputs_for_one_output_name_are_refused(tmp_path):
    touch(tmp_path / "a.tar")
    touch(tmp_path / "a.tgz")
    with pytest.raises(ValueError, match=r"would both be written to a.parquet"):
        list_shards(str(tmp_path))


def _list_within(location: str, seconds: float):
    """list_shards in a thread that may not finish: a walk that loops forever fails the test, not CI."""
    done: list = []
    thread = threading.Thread(target=lambda: done.append(list_shards(location)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert done, f"listing {location} did not finish in {seconds} s"
    return done[0]


def test_symlink_loops_are_walked_once_and_each_named(tmp_path):
    corpus = tmp_path / "corpus"
    for name in ("train/a-000000.tar", "train/a-000001.tar"):
        touch(corpus / name)
    touch(tmp_path / "elsewhere" / "b-000000.tar")
    (corpus / "loop").symlink_to(".")
    (corpus / "again").symlink_to(corpus)
    (corpus / "d").mkdir()
    (corpus / "d" / "up").symlink_to("..")
    (corpus / "extra").symlink_to(tmp_path / "elsewhere")  # a folder outside: followed, once
    (corpus / "twice").symlink_to(tmp_path / "elsewhere")
    (corpus / "train" / "copy.tar").symlink_to("a-000000.tar")  # a second name for one shard
    (corpus / "train" / "gone.tar").symlink_to(tmp_path / "moved" / "a-000002.tar")  # a broken link
    (corpus / ".cache").mkdir()
    (corpus / ".cache" / "old.tar").symlink_to(tmp_path / "nowhere")  # hidden: ignored, not named

    listing = _list_within(str(corpus), 20)
    assert [s.name for s in listing.shards] == [
        "extra/b-000000.tar",
        "train/a-000000.tar",
        "train/a-000001.tar",
    ]
    assert sorted(line.split(" ->")[0] for line in listing.skipped) == [
        "again",
        "d/up",
        "loop",
        "train/copy.tar",
        "train/gone.tar",
        "twice",
    ]
    assert (
        f"train/gone.tar -> {tmp_path / 'moved' / 'a-000002.tar'}: a broken link; skipped" in listing.skipped
    )
    assert sum("already walked" in line for line in listing.skipped) == 5
    globbed = _list_within(str(corpus / "*" / "*.tar"), 20)  # a glob walks the same way
    assert [s.name for s in globbed.shards] == [
        "extra/b-000000.tar",
        "train/a-000000.tar",
        "train/a-000001.tar",
    ]


def test_a_folder_lists_tars_in_any_case_and_every_compression_the_reader_opens(tmp_path):
    names = ["A.TAR", "b.tar.xz", "c.tar.bz2", "d.TGZ", "e.Tar.Gz", "f.tbz2", "g.txz", "h.TAR.ZST", "i.tzst"]
    names += ["j.tar.lz4"]
    for name in [*names, "notes.TXT"]:
        touch(tmp_path / name)
    listing = list_shards(str(tmp_path))
    assert [s.name for s in listing.shards] == names
    assert [s.output_name for s in listing.shards] == [f"{name[0]}.parquet" for name in names]
    assert [s.compression for s in listing.shards] == [None] * 7 + ["zstd", "zstd", "lz4"]


def test_a_tar_compressed_as_the_reader_cannot_open_is_named_not_skipped(tmp_path):
    touch(tmp_path / "train" / "a-000000.tar")
    touch(tmp_path / "train" / "a-000001.tar.lzma")
    touch(tmp_path / "train" / "a-000000.tar.md5")  # not a tar: not a shard, and no reason to refuse
    refused = r"train/a-000001.tar.lzma: a tar compressed as .lzma, which .*decompress it"
    with pytest.raises(ValueError, match=refused):
        list_shards(str(tmp_path))
    with pytest.raises(ValueError, match=r"a-000001.tar.lzma: a tar compressed as .lzma"):
        list_shards(str(tmp_path / "train" / "a-000001.tar.lzma"))  # named by path: refused up front too
    globbed = list_shards(str(tmp_path / "train" / "*.tar"))  # a pattern naming the readable ones: the way on
    assert [s.name for s in globbed.shards] == ["a-000000.tar"]
    (tmp_path / "train" / "a-000000.tar").unlink()
    with pytest.raises(ValueError, match=r"a-000001.tar.lzma: a tar compressed as .lzma"):
        list_shards(str(tmp_path))  # alone, it is named too, not "no shards found"
    (tmp_path / "train" / "a-000001.tar.lzma").rename(tmp_path / "train" / "a-000001.TAR.BR")
    with pytest.raises(ValueError, match=r"a-000001.TAR.BR: a tar compressed as .br"):
        list_shards(str(tmp_path))
