"""Image folders: good images sharded, every bad file skipped, counted and listed with its reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import ImageFolderConfig
from pipeline.datasets.card import read_card, shard_paths
from pipeline.datasets.imagefolder import build_imagefolder, scan_image_folder


def image_bytes(mode: str, size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    array = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def messy_tree(tmp_path) -> Path:
    """Three usable classes of mixed formats, one empty class and every kind of junk."""
    src = tmp_path / "src"
    good = {
        "cat/a.jpg": image_bytes("RGB", (40, 30), "JPEG", 1),
        "cat/b.JPEG": image_bytes("L", (20, 20), "JPEG", 2),
        "cat/nested/deeper/c.png": image_bytes("RGBA", (16, 24), "PNG", 3),
        "dog/a.png": image_bytes("RGB", (32, 32), "PNG", 4),
        "dog/b.bmp": image_bytes("RGB", (12, 12), "BMP", 5),
        "dog/c.tif": image_bytes("CMYK", (10, 10), "TIFF", 6),
        "eel/a.webp": image_bytes("RGB", (18, 18), "WEBP", 7),
        "eel/b.jpg": image_bytes("RGB", (30, 30), "JPEG", 8),
    }
    jpeg = image_bytes("RGB", (64, 64), "JPEG", 9)
    bad = {
        "cat/corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "cat/truncated.jpg": jpeg[: len(jpeg) // 2],
        "dog/zero.png": b"",
        "dog/text.png": b"this is not an image at all\n",
        "dog/notes.txt": b"labels are folders",
        "eel/huge.png": image_bytes("RGB", (300, 300), "PNG", 10),
        "eel/.hidden.jpg": jpeg,
        "eel/.cache/x.jpg": jpeg,
        "__MACOSX/cat/._a.jpg": b"junk",
        "README.md": b"# my images",
    }
    for relative, payload in {**good, **bad}.items():
        path = src / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    (src / "empty_class").mkdir()
    return src


def config_for(src: Path, **overrides) -> ImageFolderConfig:
    return ImageFolderConfig(**{"src": str(src), "max_pixels": 50_000, "shard_samples": 3, **overrides})


def test_good_images_sharded_and_bad_ones_listed(messy_tree, tmp_path, ray_local):
    out = tmp_path / "out"
    build_imagefolder(config_for(messy_tree), out)
    card = read_card(out)
    assert card["classes"] == ["cat", "dog", "eel"]
    assert card["empty_classes"] == ["empty_class"]
    split = card["splits"]["train"]
    assert split["samples"] == 8
    assert split["per_class"] == {"0": 3, "1": 3, "2": 2}
    assert len(split["shards"]) == 4  # 12 candidate image files, 3 per shard, 4 of them unusable
    reasons = {item["path"]: item["reason"] for item in card["skipped"]}
    assert reasons["cat/corrupt.jpg"].startswith("cannot decode")
    assert reasons["cat/truncated.jpg"].startswith("cannot decode")
    assert reasons["dog/zero.png"] == "empty file (0 bytes)"
    assert reasons["dog/text.png"].startswith("cannot decode")
    assert reasons["dog/notes.txt"] == "not an image extension (txt)"
    assert "over the limit of 50,000" in reasons["eel/huge.png"]
    assert reasons["eel/.hidden.jpg"] == "hidden or system file"
    assert reasons["eel/.cache/"] == "hidden or system folder"
    assert reasons["__MACOSX"] == "hidden or system file"
    assert reasons["README.md"] == "not inside a class folder"
    assert reasons["empty_class/"].startswith("empty class folder")
    assert card["skipped_count"] == len(card["skipped"]) == 11


def test_shards_hold_decodable_images_labels_and_source_paths(messy_tree, tmp_path, ray_local):
    out = tmp_path / "out"
    build_imagefolder(config_for(messy_tree), out)
    urls = [str(p) for p in shard_paths(out, "train")]
    samples = list(
        wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "cls", "json")
    )
    assert len(samples) == 8
    sources = {}
    for image, label, source in samples:
        assert image.size[0] > 0
        assert int(label) == source["label"]
        sources[source["path"]] = image.size
    assert sources["cat/nested/deeper/c.png"] == (16, 24)
    assert sources["dog/b.bmp"] == (12, 12)  # re-encoded as PNG
    assert sources["dog/c.tif"] == (10, 10)  # CMYK TIFF, re-encoded as RGB PNG
    with tarfile.open(shard_paths(out, "train")[0]) as tar:
        extensions = {name.rsplit(".", 1)[1] for name in tar.getnames()}
    assert extensions <= {"jpg", "png", "webp", "cls", "json"}


def test_jpeg_bytes_are_kept_unchanged(messy_tree, tmp_path, ray_local):
    out = tmp_path / "out"
    build_imagefolder(config_for(messy_tree), out)
    original = (messy_tree / "cat/a.jpg").read_bytes()
    found = []
    for path in shard_paths(out, "train"):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    source = json.loads(tar.extractfile(member).read())
                    if source["path"] == "cat/a.jpg":
                        key = member.name.removesuffix(".json")
                        found.append(tar.extractfile(f"{key}.jpg").read())
    assert found == [original]


def test_shard_bytes_limit_cuts_shards(messy_tree, tmp_path, ray_local):
    out = tmp_path / "out"
    build_imagefolder(config_for(messy_tree, shard_samples=None, shard_bytes=4000, split="val"), out)
    split = read_card(out)["splits"]["val"]
    assert split["samples"] == 8
    assert len(split["shards"]) >= 3
    assert split["pattern"].startswith("val/images-{000000..")


def test_scan_of_missing_or_empty_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing: image folder does not exist"):
        scan_image_folder(tmp_path / "missing", ("jpg",))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty: no class folder holds an image file"):
        scan_image_folder(tmp_path / "empty", ("jpg", "png"))


def test_all_images_undecodable_is_an_error(tmp_path, ray_local):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="none of 1 image files could be decoded"):
        build_imagefolder(ImageFolderConfig(src=str(src)), tmp_path / "out")


def test_overwrite_refuses_to_delete_a_foreign_directory(messy_tree, tmp_path, ray_local):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a vitpipe dataset, so --overwrite will not delete it"):
        build_imagefolder(config_for(messy_tree), foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    out = tmp_path / "out"
    build_imagefolder(config_for(messy_tree), out)
    build_imagefolder(config_for(messy_tree, shard_samples=100), out, overwrite=True)
    assert len(read_card(out)["splits"]["train"]["shards"]) == 1


def test_an_output_inside_the_image_folder_or_around_it_is_refused(messy_tree, tmp_path):
    for out in (messy_tree / "shards", messy_tree, tmp_path):
        with pytest.raises(ValueError, match="one inside the other; choose an OUT apart"):
            build_imagefolder(config_for(messy_tree), out, overwrite=True)
    assert not (messy_tree / "shards").exists()
    assert (messy_tree / "cat").is_dir()


def test_links_are_followed_but_each_real_file_is_read_once_and_loops_are_skipped(tmp_path):
    src = tmp_path / "train"
    for name in ("cat/a.png", "dog/b.png"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(image_bytes("RGB", (8, 8), "PNG"))
    (src / "self").symlink_to("..")  # a class folder that is the input's parent: a loop
    (src / "cat" / "again").symlink_to("..")  # inside a class: back up to the input
    (src / "dog" / "z-link.png").symlink_to("b.png")  # a second name of one file
    elsewhere = tmp_path / "elsewhere" / "bird"
    elsewhere.mkdir(parents=True)
    (elsewhere / "c.png").write_bytes(image_bytes("RGB", (8, 8), "PNG", 1))
    (src / "bird").symlink_to(elsewhere)  # a class kept on other storage: followed
    scan = scan_image_folder(src, ("png",))
    assert scan.classes == ["bird", "cat", "dog"]
    assert sorted(c.path for c in scan.candidates) == ["bird/c.png", "cat/a.png", "dog/b.png"]
    reasons = {item["path"]: item["reason"] for item in scan.skipped}
    assert reasons["self/"].startswith("a link to a folder already walked or above the input")
    assert reasons["cat/again/"].startswith("a link to a folder already walked or above the input")
    assert reasons["dog/z-link.png"] == "the same file as dog/b.png (a link)"
