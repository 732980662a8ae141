"""A `class_name/image.ext` tree (ImageNet's layout) into WebDataset shards, so users bring their data.

Classes are the top-level folders, sorted; images are found at any depth below them. With `splits`,
each named subfolder (`SRC/train`, `SRC/test`) is such a tree, and all must hold the same classes, so
one class list labels every split alike. Anything that is not a decodable image within the pixel limit
is skipped, counted and listed with its reason in dataset.json; the run fails only when a split is
left without any image.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import ImageFolderConfig
from pipeline.console import say
from pipeline.datasets.card import check_output_dir, prepare_output_dir, split_entry, write_card
from pipeline.datasets.shards import ShardResult, shard_name, write_shard
from pipeline.ray_tasks import run_shard_tasks

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others become PNG
JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


ClassFolders = dict[str, list[tuple[str, int]]]  # class name -> its images (path under SRC, size)


@dataclass(frozen=True)
class Candidate:
    """An image file found in the tree, not yet decoded."""

    path: str  # relative to the source folder
    label: int
    size: int


@dataclass
class FolderScan:
    """The images of every split, labelled by one class list, and every file skipped with why."""

    classes: list[str]
    splits: dict[str, list[Candidate]]
    skipped: list[dict[str, str]]
    empty_classes: list[str]

    @property
    def candidates(self) -> list[Candidate]:
        return [candidate for members in self.splits.values() for candidate in members]


# Folder names that mean a split: SRC holding only these (each with class folders) is warned of.
SPLIT_NAMES = {"train", "training", "test", "testing", "val", "valid", "validation", "dev", "eval"}


def scan_image_folder(
    src: Path, extensions: tuple[str, ...], splits: tuple[str, ...] | None = None, split: str = "train"
) -> FolderScan:
    """Walk the tree: SRC's class folders (the one split `split`), or those of each SRC/<split> in `splits`,
    their candidate images, and every other file with why it is skipped. Splits must hold the same classes."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: image folder does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: is not a folder of class folders")
    allowed = {e.lower().lstrip(".") for e in extensions}
    walk = _Walk(src, allowed, [])  # one walk for all splits: a file linked into two of them is read once
    per_split = {split: _class_folders(walk, src)} if splits is None else _split_folders(walk, src, splits)
    classes = _one_class_list(src, per_split, sorted(allowed))
    label = {name: index for index, name in enumerate(classes)}
    candidates = {
        name: [Candidate(path, label[cls], size) for cls in classes for path, size in folders[cls]]
        for name, folders in per_split.items()
    }
    empty = sorted({name for folders in per_split.values() for name, files in folders.items() if not files})
    return FolderScan(classes, candidates, walk.skipped, empty)


def _class_folders(walk: _Walk, folder: Path) -> ClassFolders:
    """Each class folder of `folder` with its images; other entries and empty class folders are skipped."""
    per_class: ClassFolders = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _is_junk(entry.name):
            walk.skip(entry.path, "hidden or system file")
        elif entry.is_dir():
            if walk.enter(Path(entry.path)):
                per_class[entry.name] = walk.images_below(Path(entry.path))
        else:
            walk.skip(entry.path, "not inside a class folder")
    for name in [name for name, files in per_class.items() if not files]:
        walk.skip(os.path.join(folder, name, ""), "empty class folder: no image files")
    return per_class


def _split_folders(walk: _Walk, src: Path, splits: tuple[str, ...]) -> dict[str, ClassFolders]:
    """The class folders of each SRC/<split>; a missing split folder is an error, other entries skipped."""
    entries = sorted(os.scandir(src), key=lambda e: e.name)
    folders = [e.name for e in entries if e.is_dir() and not _is_junk(e.name)]
    missing = [name for name in splits if name not in folders]
    if missing:
        raise FileNotFoundError(
            f"{src}: no split folder {', '.join(missing)}; it holds {', '.join(folders) or 'no folder'}"
        )
    for entry in (e for e in entries if e.name not in splits):
        if _is_junk(entry.name):
            walk.skip(entry.path, "hidden or system file")
        elif entry.is_dir():
            walk.skip(os.path.join(entry.path, ""), f"not one of the splits ({', '.join(splits)})")
        else:
            walk.skip(entry.path, "not inside a split folder")
    per_split = {}
    for name in splits:
        if not walk.enter(src / name, record=False):
            raise ValueError(
                f"{src / name}: a link to a folder already read or above it; each split needs its own folder"
            )
        per_split[name] = _class_folders(walk, src / name)
    return per_split


def _one_class_list(src: Path, per_split: dict[str, ClassFolders], allowed: list[str]) -> list[str]:
    """The classes, sorted: those with images, which must be the same in every split (a label is one class
    in all of them; each split's own list would label one split's `fox` as another's `eel`)."""
    having = {
        split: {name for name, files in folders.items() if files} for split, folders in per_split.items()
    }
    classes = sorted(set().union(*having.values()))
    if not classes:
        raise ValueError(f"{src}: no class folder holds an image file ({', '.join(allowed)})")
    lacking = {split: [name for name in classes if name not in held] for split, held in having.items()}
    if any(lacking.values()):
        parts = [f"{split} has no images of {_listed(names)}" for split, names in lacking.items() if names]
        raise ValueError(
            f"{src}: the splits' class folders differ: {'; '.join(parts)}. Every split needs images of every "
            "class, so that a label means one class in all of them: add those images, or remove the class "
            "folders"
        )
    return classes


def _listed(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name in JUNK_NAMES


class _Walk:
    """The tree's images, each real file once: links are followed, but a link back into a folder already
    walked or to one above the input (a loop) is skipped, and so is a second link to one file."""

    def __init__(self, src: Path, allowed: set[str], skipped: list[dict[str, str]]) -> None:
        self.src, self.allowed, self.skipped = src, allowed, skipped
        self.top = os.path.realpath(src)
        self.folders: set[str] = {self.top}
        self.files: dict[str, str] = {}  # real path -> the relative path it was first found under

    def enter(self, folder: Path, record: bool = True) -> bool:
        """Whether to walk `folder`; a loop or a second way into one folder is recorded as skipped."""
        real = os.path.realpath(folder)
        if real in self.folders or self.top.startswith(real + os.sep):
            if record:
                self.skip(
                    os.path.join(folder, ""), "a link to a folder already walked or above the input (a loop)"
                )
            return False
        self.folders.add(real)
        return True

    def skip(self, path: str | Path, reason: str) -> None:
        """Record a file or folder (a path ending in `/`) of the tree as skipped, relative to the input."""
        relative = os.path.relpath(path, self.src) + ("/" if str(path).endswith(os.sep) else "")
        self.skipped.append({"path": relative, "reason": reason})

    def images_below(self, folder: Path) -> list[tuple[str, int]]:
        found = []
        for root, dirs, files in os.walk(folder, followlinks=True):
            for name in [d for d in dirs if _is_junk(d)]:
                self.skip(os.path.join(root, name, ""), "hidden or system folder")
            dirs[:] = sorted(d for d in dirs if not _is_junk(d) and self.enter(Path(root, d)))
            for name in sorted(files):
                candidate = self._candidate(Path(root, name))
                if candidate is not None:
                    found.append(candidate)
        return found

    def _candidate(self, path: Path) -> tuple[str, int] | None:
        relative = str(path.relative_to(self.src))
        extension = path.suffix.lower().lstrip(".")
        real = os.path.realpath(path)
        if _is_junk(path.name):
            reason = "hidden or system file"
        elif extension not in self.allowed:
            reason = f"not an image extension ({extension or 'none'})"
        elif real in self.files:
            reason = f"the same file as {self.files[real]} (a link)"
        elif not os.path.isfile(real):
            reason = "a broken link"
        elif (size := os.path.getsize(real)) == 0:
            reason = "empty file (0 bytes)"
        else:
            self.files[real] = relative
            return relative, size
        self.skipped.append({"path": relative, "reason": reason})
        return None


class UnusableImageError(ValueError):
    """An image file that cannot be used; the message is the reason recorded for it."""


def checked_image_bytes(payload: bytes, max_pixels: int) -> tuple[str, bytes]:
    """Decode fully to prove the file is a whole image within the pixel limit; return (extension, bytes).

    JPEG, PNG and WebP keep their original bytes; other formats are re-encoded as lossless PNG.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload))
            width, height = image.size
            if width * height > max_pixels:
                raise UnusableImageError(
                    f"{width}x{height} pixels is over the limit of {max_pixels:,} (decompression bomb?)"
                )
            image.load()
    except UnusableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnusableImageError(f"over the pixel limit: {error}") from None
    except Exception as error:  # PIL raises many kinds for bad bytes; each one means skip
        raise UnusableImageError(f"cannot decode: {type(error).__name__}: {error}") from None
    if image.format in KEPT_FORMATS:
        return KEPT_FORMATS[image.format], payload
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_folder_shard(
    config: ImageFolderConfig, out: str, split: str, index: int, start: int, members: list[Candidate]
) -> ShardResult:
    """Ray task body: check and write one shard of `split`; keys number its samples in its seeded order."""
    Image.MAX_IMAGE_PIXELS = max(config.max_pixels, Image.MAX_IMAGE_PIXELS or 0)
    relative = f"{split}/{shard_name(config.name, index)}"
    skipped: list[dict[str, str]] = []
    labels: Counter[int] = Counter()

    def samples():
        for offset, candidate in enumerate(members):
            try:
                payload = Path(config.src, candidate.path).read_bytes()
                extension, stored = checked_image_bytes(payload, config.max_pixels)
            except (OSError, UnusableImageError) as error:
                reason = str(error) if isinstance(error, UnusableImageError) else f"cannot read: {error}"
                skipped.append({"path": candidate.path, "reason": reason})
                continue
            labels[candidate.label] += 1
            source = json.dumps({"path": candidate.path, "label": candidate.label}).encode()
            yield (
                f"{start + offset:09d}",
                {extension: stored, "cls": str(candidate.label).encode(), "json": source},
            )

    count, size = write_shard(Path(out) / relative, samples())
    return ShardResult(relative, count, size, dict(labels), skipped)


def plan_shards(candidates: list[Candidate], config: ImageFolderConfig) -> list[tuple[int, list[Candidate]]]:
    """Seeded shuffle (so shards mix classes), then cut by sample count and by bytes: (start, members)."""
    order = np.random.default_rng(config.seed).permutation(len(candidates))
    max_samples = config.shard_samples or len(candidates)
    max_bytes = int(config.shard_bytes) if config.shard_bytes else None
    shards: list[tuple[int, list[Candidate]]] = []
    current: list[Candidate] = []
    current_bytes = 0
    start = 0
    for position, i in enumerate(order):
        candidate = candidates[int(i)]
        too_big = max_bytes is not None and current and current_bytes + candidate.size > max_bytes
        if len(current) >= max_samples or too_big:
            shards.append((start, current))
            current, current_bytes, start = [], 0, position
        current.append(candidate)
        current_bytes += candidate.size
    if current:
        shards.append((start, current))
    return shards


def _refuse_nested(src: Path, out: Path) -> None:
    """OUT inside SRC would be read as images next time (its preview a class of its own); SRC inside OUT
    could go with OUT's --overwrite."""
    source, target = src.resolve(), out.resolve()
    if source == target or source in target.parents or target in source.parents:
        raise ValueError(
            f"{out}: the output and the image folder {src} are one inside the other; choose an OUT apart"
        )


def check_imagefolder(config: ImageFolderConfig, out: Path, overwrite: bool) -> FolderScan:
    """Every refusal of the build, before Ray starts or a file is written: a source missing or without
    classes, splits whose classes differ, an OUT inside it or around it, an OUT taken; returns the scan."""
    src = Path(config.src)
    scan = scan_image_folder(src, config.extensions, config.splits, config.split)
    if config.splits is None:
        _warn_if_splits(src, scan.classes)
    _refuse_nested(src, out)
    check_output_dir(out, overwrite)
    return scan


def _warn_if_splits(src: Path, classes: list[str]) -> None:
    """SRC/train/CLASS/... read as one split has the classes `test` and `train`: said, with the way on."""
    if len(classes) < 2 or any(name.lower() not in SPLIT_NAMES for name in classes):
        return
    if all(any(entry.is_dir() for entry in os.scandir(src / name)) for name in classes):
        say(
            f"vitpipe: warning: {src}: its folders {', '.join(classes)} look like splits, each holding class "
            f"folders, but are taken as {len(classes)} classes of one split; to build them as splits with "
            f"one class list, pass --splits {','.join(classes)} (in a job: splits: [{', '.join(classes)}])",
            err=True,
        )


def build_imagefolder(
    config: ImageFolderConfig, out: Path, overwrite: bool = False, scan: FolderScan | None = None
) -> Path:
    """Shard the image tree at `config.src` (or one per split below it) into `out/{split}/`; return the
    dataset.json path. `scan`: check_imagefolder's, where the caller checked before starting Ray."""
    src = Path(config.src)
    scan = scan or check_imagefolder(config, out, overwrite)
    prepare_output_dir(out, overwrite)
    started = time.perf_counter()
    config = config.model_copy(update={"src": str(src.resolve())})
    shards = [
        (str(out), split, i, start, members)
        for split, candidates in scan.splits.items()
        for i, (start, members) in enumerate(plan_shards(candidates, config))
    ]
    label = f"{config.name}/{'+'.join(scan.splits)}"
    results = run_shard_tasks(write_folder_shard, shards, label=label, shared=(config,))
    by_split: dict[str, list[ShardResult]] = {split: [] for split in scan.splits}
    for shard, result in zip(shards, results, strict=True):
        by_split[shard[1]].append(result)
    for split, written in by_split.items():
        if not sum(r.samples for r in written):
            files = f"{len(scan.splits[split])} image files" + (f" of split {split}" if config.splits else "")
            raise ValueError(f"{src}: none of {files} could be decoded; see {out}")
    skipped = scan.skipped + [item for result in results for item in result.skipped]
    card: dict[str, Any] = {
        "name": config.name,
        "kind": "imagefolder",
        "classes": scan.classes,
        "image": None,
        "splits": {split: split_entry(split, config.name, written) for split, written in by_split.items()},
        "config": config.model_dump(mode="json"),
        "config_hash": config.digest(),
        "source": str(src.resolve()),
        "empty_classes": scan.empty_classes,
        "skipped": skipped,
        "skipped_count": len(skipped),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return write_card(out, card)
