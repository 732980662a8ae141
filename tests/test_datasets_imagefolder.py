"""Image folders: good images sharded, every bad file skipped, counted and listed with its reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from PIL import Image

from pipeline.config import ImageFolderConfig
from pipeline.datasets.card import read_card, shard_paths
from pipeline.datasets.imagefolder import build_imagefolder, check_imagefolder, scan_image_folder


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


def split_tree(root: Path, layout: dict[str, list[str]]) -> Path:
    """`SRC/<split>/<class>/<n>.png` with two small images per class; returns SRC."""
    for split, classes in layout.items():
        for index, name in enumerate(classes):
            for n in range(2):
                path = root / split / name / f"{n}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(image_bytes("RGB", (8, 8), "PNG", seed=10 * index + n))
    return root


def test_split_folders_become_one_dataset_with_one_class_list_and_the_same_labels(tmp_path, ray_local):
    src = split_tree(tmp_path / "src", {"train": ["cat", "dog", "eel"], "test": ["cat", "dog", "eel"]})
    (src / "notes.txt").write_text("not a split")
    out = tmp_path / "out"
    build_imagefolder(ImageFolderConfig(src=str(src), splits=("train", "test"), shard_samples=4), out)
    card = read_card(out)
    assert card["classes"] == ["cat", "dog", "eel"]
    assert list(card["splits"]) == ["train", "test"]
    assert {split: entry["per_class"] for split, entry in card["splits"].items()} == {
        "train": {"0": 2, "1": 2, "2": 2},
        "test": {"0": 2, "1": 2, "2": 2},
    }
    assert card["splits"]["test"]["pattern"] == "test/images-{000000..000001}.tar"
    for split in ("train", "test"):
        urls = [str(p) for p in shard_paths(out, split)]
        for label, source in wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("cls", "json"):
            folder, name, _ = source["path"].split("/")
            assert (folder, card["classes"][int(label)]) == (split, name)
    assert {"path": "notes.txt", "reason": "not inside a split folder"} in card["skipped"]


def test_splits_whose_classes_differ_are_refused_naming_the_classes(tmp_path):
    """Each split's own class list would label test's `fox` as train's `eel`; refused, before any file is
    written, naming what each split lacks."""
    src = split_tree(tmp_path / "src", {"train": ["cat", "dog", "eel"], "test": ["cat", "dog", "fox"]})
    config = ImageFolderConfig(src=str(src), splits=("train", "test"))
    differ = "the splits' class folders differ: train has no images of fox; test has no images of eel"
    with pytest.raises(ValueError, match=differ):
        build_imagefolder(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (src / "test" / "eel").mkdir()  # a class folder without images is no class of the split
    with pytest.raises(ValueError, match="test has no images of eel"):
        build_imagefolder(config, tmp_path / "out")


def test_a_file_linked_into_two_splits_is_read_once(tmp_path):
    """An image in both train and test would be tested on what was trained on: the second is skipped."""
    src = split_tree(tmp_path / "src", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    (src / "test" / "cat" / "leak.png").symlink_to(src / "train" / "cat" / "0.png")
    scan = scan_image_folder(src, ("png",), splits=("train", "test"))
    reasons = {item["path"]: item["reason"] for item in scan.skipped}
    assert reasons["test/cat/leak.png"] == "the same file as train/cat/0.png (a link)"
    assert sorted(c.path for c in scan.splits["test"]) == [
        f"test/{c}/{n}.png" for c in ("cat", "dog") for n in (0, 1)
    ]


def test_split_settings_are_checked_and_the_one_split_form_keeps_its_digest():
    with pytest.raises(ValueError, match=r"set split .* or splits .*, not both"):
        ImageFolderConfig(src="x", split="val", splits=("train", "test"))
    with pytest.raises(ValueError, match=r"splits listed twice: \['train'\]"):
        ImageFolderConfig(src="x", splits=("train", "train"))
    one = ImageFolderConfig(src="x")
    assert "splits" not in one.model_dump()  # a job's existing dataset keeps its cache key
    both = ImageFolderConfig(src="x", splits=["train", "test"]).model_dump()
    assert (both["splits"], "split" in both) == (("train", "test"), False)  # shown as it is read
    assert ImageFolderConfig(**both) == ImageFolderConfig(src="x", splits=["train", "test"])


def test_every_imagefolder_refusal_comes_before_ray(cli_before_ray, tmp_path):
    src = split_tree(tmp_path / "src", {"train": ["cat", "dog"], "test": ["cat", "fox"]})
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "nothing"), str(out)], 1, "nothing: image folder does not exist"),
        ([str(src / "train" / "cat"), str(out)], 1, "cat: no class folder holds an image file"),
        (
            [str(src), str(out), "--splits", "train,test"],
            1,
            "train has no images of fox; test has no images of",
        ),
        ([str(src), str(out), "--splits", "train,val"], 1, "no split folder val; it holds test, train"),
        (
            [str(src), str(out), "--split", "train,test"],
            2,
            "--split: is the one split src becomes; for src/train, src/test ... set splits: train,test",
        ),
    ]
    for args, code, message in cases:
        got, stderr = cli_before_ray("datasets", "imagefolder", *args)
        assert (got, message in stderr) == (code, True), stderr
    good = split_tree(tmp_path / "good", {"train": ["cat"], "test": ["cat"]})
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    got, stderr = cli_before_ray("datasets", "imagefolder", str(good), str(out), "--splits", "train,test")
    assert (got, "already exists and is not empty; pass --overwrite" in stderr) == (1, True), stderr
    assert (out / "mine.txt").read_text() == "kept"

    # the same refusal in a job's datasets step
    job = {"name": "mine", "run_dir": str(tmp_path / "run")}
    job["datasets"] = {"mine": {"kind": "imagefolder", "src": str(src), "splits": ["train", "test"]}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    got, stderr = cli_before_ray("run", str(tmp_path / "job.yaml"))
    assert (got, "train has no images of fox; test has no images of" in stderr) == (1, True), stderr


def test_split_folders_taken_as_classes_are_warned_of(tmp_path, capsys):
    src = split_tree(tmp_path / "src", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    scan = check_imagefolder(ImageFolderConfig(src=str(src)), tmp_path / "out", overwrite=False)
    assert scan.classes == ["test", "train"]
    warned = capsys.readouterr().err
    assert "its folders test, train look like splits, each holding class folders" in warned
    assert "--splits test,train" in warned
