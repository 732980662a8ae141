"""`vitpipe preprocess` on real Ray: embedded and third-party shards, bad input, resuming, inspect."""

from __future__ import annotations

import bz2
import io
import json
import lzma
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_sample_image

from pipeline.cli import main
from pipeline.config import PreprocessConfig
from pipeline.datasets.card import CARD_FORMAT, read_card, shard_paths
from pipeline.datasets.shards import write_shard
from pipeline.patchfile import PatchGeometry, patches_array
from pipeline.preprocess import shard as shard_module
from pipeline.preprocess.manifest import patch_files, read_manifest
from pipeline.preprocess.run import class_names, preprocess
from pipeline.preprocess.sources import list_shards
from tests.conftest import VITPIPE
from tests.test_preprocess_decode import corrupt_jpeg, encode, png_bomb, reference, truncated_jpeg
from vit.patches import patchify, unpatchify

pytestmark = pytest.mark.usefixtures("ray_local")


def read_rows(directory: Path, split: str | None = None) -> tuple[list[str], list[int | None], np.ndarray]:
    """Every row of a patch directory with plain pyarrow: keys, labels, patches [rows, N, D]."""
    manifest = read_manifest(str(directory))
    geometry = PatchGeometry(**{k: manifest["patches"][k] for k in ("image_size", "patch_size", "channels")})
    keys, labels, patches = [], [], []
    for path in patch_files(str(directory), split):
        table = pq.read_table(path)
        keys += table.column("key").to_pylist()
        labels += table.column("label").to_pylist()
        patches.append(patches_array(table.column("patches"), geometry))
    return keys, labels, np.concatenate(patches)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_digits_counts_labels_pixels_and_layout(digits_dir, tmp_path):
    config = PreprocessConfig(image_size=16, patch_size=4)
    result = preprocess(str(digits_dir), str(tmp_path / "out"), config)
    manifest = result.manifest
    card = read_card(digits_dir)
    assert manifest["classes"] == card["classes"]
    assert manifest["totals"]["samples"] == 1797
    assert manifest["totals"]["failed"] == 0
    assert {split: entry["samples"] for split, entry in manifest["splits"].items()} == {
        "test": 360,
        "train": 1437,
    }
    assert manifest["totals"]["per_class"] == {
        str(k): v for k, v in enumerate([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    }

    keys, labels, patches = read_rows(tmp_path / "out", "test")
    originals = {
        sample["__key__"]: sample
        for sample in wds.WebDataset([str(p) for p in shard_paths(digits_dir, "test")], shardshuffle=False)
    }
    assert sorted(keys) == sorted(originals)
    assert patches.shape == (360, 16, 4 * 4 * 3)
    for key, label, sample_patches in zip(keys, labels, patches, strict=True):
        assert label == int(originals[key]["cls"])
        image = Image.open(io.BytesIO(originals[key]["png"]))
        expected = reference(image, 16)
        rebuilt = unpatchify(sample_patches, 4, 3)
        assert np.abs(rebuilt.astype(int) - expected).max() <= 2  # torch vs Pillow bilinear upsampling
        assert np.array_equal(sample_patches, patchify(rebuilt, 4))  # the one layout, both ways


def photo_crops(count: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    crops = []
    for index in range(count):
        photo = photos[index % 2]
        top, left = rng.integers(0, 100), rng.integers(0, 200)
        crops.append(Image.fromarray(photo[top : top + 300, left : left + 400]).resize(size))
    return crops


def test_webdataset_shardwriter_shards_by_brace_pattern_and_file_url(tmp_path):
    source = tmp_path / "wds"
    source.mkdir()
    images = photo_crops(12, (400, 300))
    with wds.ShardWriter(str(source / "part-%06d.tar"), maxcount=5, verbose=0) as sink:
        for index, image in enumerate(images):
            sink.write(
                {
                    "__key__": f"img{index:03d}",
                    "jpg": encode(image, "JPEG", quality=90),
                    "json": {"label": index % 4},
                }
            )
    (source / "dataset.json").write_text('{"classes": ["not", "ours"]}')  # a foreign card: ignored
    pattern = f"file://{source}/part-{{000000..000003}}.tar"  # part-000003.tar does not exist
    config = PreprocessConfig(image_size=32, patch_size=8, label_key="json:label")
    result = preprocess(pattern, f"file://{tmp_path / 'out'}", config)
    assert result.manifest["totals"]["samples"] == 12
    assert result.manifest["classes"] is None
    written = [f"part-{i:06d}.parquet" for i in range(3)]
    assert [s["file"] for s in result.manifest["shards"]] == [*written, None]
    (missing,) = result.manifest["failures"]
    assert missing["shard"] == "part-000003.tar"
    assert missing["reason"].startswith("unreadable shard: cannot open")
    assert result.exceeded  # 1 of 4 shards lost is over the 1% limit
    keys, labels, patches = read_rows(tmp_path / "out")
    assert keys == [f"img{i:03d}" for i in range(12)]
    assert labels == [i % 4 for i in range(12)]
    for index, sample_patches in enumerate(patches):
        stored = Image.open(io.BytesIO(encode(images[index], "JPEG", quality=90)))
        difference = np.abs(unpatchify(sample_patches, 8, 3).astype(int) - reference(stored, 32))
        assert difference.mean() < 0.5  # decoded at half scale (DCT), vs a full decode


def test_plain_tar_of_files_by_glob_unlabelled_grayscale(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for index, image in enumerate(photo_crops(4, (120, 90))):
        image.save(files / f"photo{index}.png")
    (files / "notes.txt").write_text("not part of any sample's image")
    subprocess.run(["tar", "-cf", str(tmp_path / "photos.tar"), "-C", str(files), "."], check=True)
    config = PreprocessConfig(image_size=24, patch_size=8, channels=1, label_key=None, image_keys=("png",))
    result = preprocess(str(tmp_path / "*.tar"), str(tmp_path / "out"), config)
    totals = result.manifest["totals"]
    assert (totals["samples"], totals["failed"]) == (4, 1)  # ./notes has no image
    assert result.manifest["failures"][0]["key"] == "./notes"
    assert result.manifest["failures"][0]["reason"].startswith("no image: the sample has .txt")
    keys, labels, patches = read_rows(tmp_path / "out")
    assert sorted(keys) == [f"./photo{i}" for i in range(4)]
    assert labels == [None] * 4
    assert patches.shape == (4, 9, 64)


def good_png(value: int) -> bytes:
    return encode(Image.new("RGB", (20, 12), (value, 255 - value, 0)))


@pytest.fixture
def bad_input(tmp_path) -> Path:
    """Four shards: clean; every bad sample between good ones; truncated; not a tar."""
    root = tmp_path / "bad"
    write_shard(root / "clean-000000.tar", [(f"ok{i}", {"png": good_png(i), "cls": b"1"}) for i in range(4)])
    samples = [
        ("good0", {"png": good_png(10), "cls": b"0"}),
        ("corrupt", {"jpg": corrupt_jpeg(), "cls": b"0"}),
        ("truncated", {"jpg": truncated_jpeg(), "cls": b"0"}),
        ("zero", {"png": b"", "cls": b"0"}),
        ("html", {"jpg": b"<html>404 not found</html>", "cls": b"0"}),
        ("nolabel", {"png": good_png(20)}),
        ("badlabel", {"png": good_png(30), "cls": b"seven"}),
        ("range", {"png": good_png(30), "cls": b"9"}),
        ("bomb", {"png": png_bomb(50_000, 50_000), "cls": b"0"}),
        ("noimage", {"txt": b"caption only", "cls": b"0"}),
        ("good1", {"png": good_png(40), "cls": b"1"}),
    ]
    write_shard(root / "mixed-000001.tar", samples)
    _append_duplicate(root / "mixed-000001.tar", "good0")
    write_shard(
        root / "whole.tar", [(f"t{i}", {"png": good_png(5) + b"\0" * 2000, "cls": b"1"}) for i in range(3)]
    )
    whole = (root / "whole.tar").read_bytes()
    (root / "whole.tar").unlink()
    (root / "cut-000002.tar").write_bytes(whole[:5500])  # breaks off inside t1.png's data (from 4608)
    (root / "junk-000003.tar").write_bytes(b"GIF89a this is no tar" * 100)
    (root / "dataset.json").write_text(json.dumps({"format": CARD_FORMAT, "classes": ["zero", "one"]}))
    return root


def _append_duplicate(path: Path, key: str) -> None:
    """Rewrite the tar with one more member group repeating `key` at the end."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for info, payload in [*members, (tarfile.TarInfo(f"{key}.png"), good_png(99))]:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


EXPECTED_FAILURES = {
    ("mixed-000001.tar", "corrupt", "corrupt image"),
    ("mixed-000001.tar", "truncated", "corrupt image"),
    ("mixed-000001.tar", "zero", "empty file"),
    ("mixed-000001.tar", "html", "not an image"),
    ("mixed-000001.tar", "nolabel", "missing label"),
    ("mixed-000001.tar", "badlabel", "malformed label"),
    ("mixed-000001.tar", "range", "label out of range"),
    ("mixed-000001.tar", "bomb", "too many pixels"),
    ("mixed-000001.tar", "noimage", "no image"),
    ("mixed-000001.tar", "good0", "duplicate key"),
    ("cut-000002.tar", "t1", "truncated shard"),
    ("junk-000003.tar", None, "unreadable shard"),
}


def test_bad_input_is_recorded_and_good_samples_survive(bad_input, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["preprocess", str(bad_input), str(out), "--image-size", "8", "--patch-size", "4"])
    assert code == 1  # far above the 1% default failure rate, but everything usable was written
    assert "FAILED: more than 1.00% of the input could not be used" in capsys.readouterr().out
    manifest = read_manifest(str(out))
    found = {(f["shard"], f["key"], f["reason"].split(":")[0]) for f in manifest["failures"]}
    assert found == EXPECTED_FAILURES
    assert [(s["source"], s["samples"]) for s in manifest["shards"]] == [
        ("clean-000000.tar", 4),
        ("cut-000002.tar", 1),
        ("junk-000003.tar", 0),
        ("mixed-000001.tar", 2),
    ]
    assert manifest["shards"][2]["file"] is None
    assert manifest["totals"]["unreadable_shards"] == 1
    keys, labels, _ = read_rows(out)
    assert keys == ["ok0", "ok1", "ok2", "ok3", "t0", "good0", "good1"]
    assert labels == [1, 1, 1, 1, 1, 0, 1]


def test_rerun_skips_finished_shards_and_resumes_incomplete_ones(digits_dir, tmp_path):
    config = PreprocessConfig(image_size=16, patch_size=4)
    out = tmp_path / "out"
    first = preprocess(str(digits_dir), str(out), config)
    assert (first.processed, first.reused) == (5, 0)
    finished = tree_bytes(out)
    again = preprocess(str(digits_dir), str(out), config)
    assert (again.processed, again.reused) == (0, 5)
    assert tree_bytes(out) == finished
    # A killed run can leave a temporary file, and a damaged file with a final name must be redone.
    (out / "train" / ".digits-000001.parquet.deadbeef.partial").write_bytes(b"half a file")
    victim = out / "train" / "digits-000002.parquet"
    victim.write_bytes(victim.read_bytes()[:1000])
    resumed = preprocess(str(digits_dir), str(out), config)
    assert (resumed.processed, resumed.reused) == (1, 4)
    assert tree_bytes(out) == finished


def test_another_config_is_refused_unless_overwrite(digits_dir, tmp_path):
    out = tmp_path / "out"
    preprocess(str(digits_dir), str(out), PreprocessConfig(image_size=16, patch_size=4))
    other = PreprocessConfig(image_size=24, patch_size=4, resample="bicubic")
    with pytest.raises(FileExistsError, match=r"image_size 16 -> 24; resample 'bilinear' -> 'bicubic'"):
        preprocess(str(digits_dir), str(out), other)
    (out / "_manifest.json").unlink()  # a killed first run has no manifest; the files still tell
    with pytest.raises(FileExistsError, match=r"test/digits-000000.parquet was made with another"):
        preprocess(str(digits_dir), str(out), other)
    replaced = preprocess(str(digits_dir), str(out), other, overwrite=True)
    assert replaced.processed == 5
    assert read_rows(out, "test")[2].shape == (360, 36, 48)


def test_failure_threshold_is_not_part_of_the_output_identity(digits_dir, tmp_path):
    out = tmp_path / "out"
    preprocess(str(digits_dir), str(out), PreprocessConfig(image_size=8, patch_size=4))
    relaxed = preprocess(
        str(digits_dir), str(out), PreprocessConfig(image_size=8, patch_size=4, max_failure_rate=0.5)
    )
    assert relaxed.reused == 5


def test_missing_input_and_bad_options_fail_before_any_work(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "nothing: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["preprocess", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "empty: no shards found" in err
    assert "node(s)" not in err  # refused before Ray was started or joined
    (tmp_path / "empty" / "a.tar").write_bytes(b"")
    (tmp_path / "afile").write_text("mine")
    assert main(["preprocess", str(tmp_path / "empty"), str(tmp_path / "afile")]) == 1
    assert (
        f"{tmp_path / 'afile'}: {tmp_path / 'afile'} is a file; a folder is needed here"
        in capsys.readouterr().err
    )
    assert (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "empty" / "a.tar").unlink()
    assert (
        main(["preprocess", str(tmp_path), str(tmp_path / "out"), "--image-size", "30", "--patch-size", "4"])
        == 2
    )
    assert "image_size 30 is not a multiple of patch_size 4" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path), str(tmp_path / "out"), "--resize", "stretch"]) == 2
    assert "--resize" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path), str(tmp_path / "out"), "--workers", "0"]) == 2
    assert "--workers must be at least 1 (got 0)" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path), str(tmp_path / "out"), "--image-keys", "jpg,PNG"]) == 2
    assert "--image-keys[1]: String should match pattern" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_with_symlink_loops_is_preprocessed_once_with_a_line_per_link(digits_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(digits_dir, corpus)
    (corpus / "loop").symlink_to(".")
    (corpus / "again").symlink_to(corpus)
    (corpus / "train" / "up").symlink_to("..")
    out = tmp_path / "out"
    assert main(["preprocess", str(corpus), str(out), "--image-size", "16", "--patch-size", "4"]) == 0
    printed = capsys.readouterr().out
    for link in ("loop -> .", f"again -> {corpus}", "train/up -> .."):
        assert printed.count(link) == 1, printed
    manifest = read_manifest(str(out))
    assert manifest["totals"]["samples"] == 1797  # not 1797 once per way into the folder
    assert sorted(manifest["splits"]) == ["test", "train"]


def test_a_damaged_dataset_card_is_named_and_a_foreign_one_ignored(tmp_path, capsys):
    (tmp_path / "a-000000.tar").write_bytes(b"")
    card = tmp_path / "dataset.json"
    listing = list_shards(str(tmp_path))
    for text, warned in (
        ('{"format": "' + CARD_FORMAT + '", "classes": ["cat", "d', "cannot be read"),  # truncated
        (json.dumps({"format": CARD_FORMAT, "classes": 5}), "'classes' is not a list of names"),
        (json.dumps({"classes": ["not", "ours"]}), None),  # someone else's file
    ):
        card.write_text(text)
        assert class_names(listing) is None
        err = capsys.readouterr().err
        assert (f"{card}" in err and warned in err) if warned else err == ""
    card.write_text(json.dumps({"format": CARD_FORMAT, "classes": ["cat", "dog"]}))
    assert class_names(listing) == ["cat", "dog"]


def test_inspect_prints_the_summary_and_draws_samples(digits_dir, tmp_path, capsys):
    out = tmp_path / "out"
    preprocess(str(digits_dir), str(out), PreprocessConfig(image_size=16, patch_size=4))
    assert main(["inspect", str(out), "--samples", "10", "--split", "test"]) == 0
    text = capsys.readouterr().out
    assert "split train: 1,437 samples in 4 file(s)" in text
    assert "16px, shorter-side-center-crop (bilinear), patch 4, 3 channel(s): 16 x 48 uint8 per image" in text
    grid = Image.open(out / "samples.png")
    assert grid.size == (8 * 68, 2 * (64 + 14 + 4))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes(ray_local, tmp_path):
    """SIGKILL the CLI (a driver on the session's Ray) after its first finished shard, rerun, and compare
    with an uninterrupted run."""
    photo = encode(photo_crops(1, (1600, 1200))[0], "JPEG", quality=90)
    corpus = tmp_path / "corpus"
    for shard in range(24):
        write_shard(
            corpus / f"c-{shard:06d}.tar", [(f"s{shard}_{i}", {"jpg": photo, "cls": b"0"}) for i in range(10)]
        )
    address = ray.get_runtime_context().gcs_address
    args = [
        "preprocess",
        str(corpus),
        "--image-size",
        "64",
        "--patch-size",
        "16",
        "--workers",
        "1",
        "--address",
        address,
    ]
    killed = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ""}
    process = subprocess.Popen([*VITPIPE, *args[:2], str(killed), *args[2:]], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not list(killed.rglob("*.parquet")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(killed.rglob("*.parquet")))
    assert 0 < done < 24, done
    assert not (killed / "_manifest.json").exists()
    rerun = subprocess.run(
        [*VITPIPE, *args[:2], str(killed), *args[2:]],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"{24 - done} now" in rerun.stdout or "already done" in rerun.stdout
    clean = tmp_path / "clean"
    preprocess(str(corpus), str(clean), PreprocessConfig(image_size=64, patch_size=16))
    assert tree_bytes(killed) == tree_bytes(clean)


def test_an_unexpected_decoder_exception_is_recorded_not_raised(tmp_path, monkeypatch):
    """The shard task itself (no Ray): a bug-like exception on one sample costs that sample only."""
    write_shard(
        tmp_path / "in" / "s.tar", [(k, {"png": good_png(i), "cls": b"0"}) for i, k in enumerate("abc")]
    )
    real_decode = shard_module.decode_image

    def flaky_decode(data, config):
        if data == good_png(1):
            raise RuntimeError("decoder crashed")
        return real_decode(data, config)

    monkeypatch.setattr(shard_module, "decode_image", flaky_decode)
    (source,) = list_shards(str(tmp_path / "in")).shards
    local = pafs.LocalFileSystem()
    report = shard_module.preprocess_shard(
        local, local, str(tmp_path / "out"), PreprocessConfig(image_size=8, patch_size=4), None, source
    )
    assert (report.samples, report.failed) == (2, 1)
    assert report.failures == [
        {"shard": "s.tar", "key": "b", "reason": "unexpected error: RuntimeError: decoder crashed"}
    ]


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of exactly these member names (write_shard refuses dotted keys, as it should)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_dotted_member_names_fail_once_per_image_naming_the_member_and_the_key_rule(tmp_path):
    """`cat.0.png`, `cat.1.png` are one webdataset sample (key `cat`): each image is a failure, and the
    reason names the shard's member, the rule and the names to use; it is not one vague failure."""
    cats = [("cat.0.png", good_png(1)), ("cat.0.cls", b"0"), ("cat.1.png", good_png(2)), ("cat.1.cls", b"0")]
    raw_tar(tmp_path / "in" / "s.tar", [*cats, ("ok.png", good_png(3)), ("ok.cls", b"1")])
    (source,) = list_shards(str(tmp_path / "in")).shards
    local = pafs.LocalFileSystem()
    report = shard_module.preprocess_shard(
        local, local, str(tmp_path / "out"), PreprocessConfig(image_size=8, patch_size=4), None, source
    )
    assert (report.samples, report.failed) == (1, 2)
    (failure,) = report.failures
    assert (failure["shard"], failure["key"]) == ("s.tar", "cat")
    assert failure["reason"].startswith("dots in member names: cat.0.png, cat.1.png are one sample")
    assert "the name up to the first dot" in failure["reason"]
    assert "cat_0.png or cat/0.png" in failure["reason"]


def test_compressed_and_upper_case_shards_in_a_folder_are_preprocessed(tmp_path):
    shard = tmp_path / "plain.tar"
    write_shard(shard, [(k, {"png": good_png(i), "cls": b"0"}) for i, k in enumerate("ab")])
    data = shard.read_bytes()
    shard.unlink()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "A.TAR").write_bytes(data)
    (tmp_path / "in" / "b.tar.xz").write_bytes(lzma.compress(data))
    (tmp_path / "in" / "c.tar.bz2").write_bytes(bz2.compress(data))
    for name, codec in (("d.TAR.ZST", "zstd"), ("e.tar.lz4", "lz4")):  # pyarrow's codecs, any case
        with pa.CompressedOutputStream(str(tmp_path / "in" / name), codec) as stream:
            stream.write(data)
    config = PreprocessConfig(image_size=8, patch_size=4)
    result = preprocess(str(tmp_path / "in"), str(tmp_path / "out"), config)
    assert [(s["source"], s["file"], s["samples"]) for s in result.manifest["shards"]] == [
        ("A.TAR", "A.parquet", 2),
        ("b.tar.xz", "b.parquet", 2),
        ("c.tar.bz2", "c.parquet", 2),
        ("d.TAR.ZST", "d.parquet", 2),
        ("e.tar.lz4", "e.parquet", 2),
    ]


def test_samples_without_labels_name_the_way_on(tmp_path, capsys):
    write_shard(tmp_path / "in" / "s.tar", [(k, {"png": good_png(i)}) for i, k in enumerate("ab")])
    out = tmp_path / "out"
    assert main(["preprocess", str(tmp_path / "in"), str(out), "--image-size", "8", "--patch-size", "4"]) == 1
    printed = capsys.readouterr().out
    assert "failures: missing label 2" in printed
    assert "no .cls member: an unlabelled corpus takes --label-key none (in a job: label_key: none" in printed
    job_config = PreprocessConfig(image_size=8, patch_size=4, label_key="none")  # as a job file writes it
    assert job_config.label_key is None
