"""A `class_name/image.ext` tree (ImageNet's layout) into WebDataset shards, so users bring their data.

Classes are the top-level folders, sorted; images are found at any depth below them. Anything that
is not a decodable image within the pixel limit is skipped, counted and listed with its reason in
dataset.json; the run fails only when no image is left at all.
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
from pipeline.datasets.card import prepare_output_dir, split_entry, write_card
from pipeline.datasets.shards import ShardResult, shard_name, write_shard
from pipeline.ray_tasks import run_shard_tasks

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others become PNG
JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Candidate:
    """An image file found in the tree, not yet decoded."""

    path: str  # relative to the source folder
    label: int
    size: int


@dataclass
class FolderScan:
    classes: list[str]
    candidates: list[Candidate]
    skipped: list[dict[str, str]]
    empty_classes: list[str]


def scan_image_folder(src: Path, extensions: tuple[str, ...]) -> FolderScan:
    """Walk the tree: class folders, candidate images, and every other file with why it is skipped."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: image folder does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: is not a folder of class folders")
    allowed = {e.lower().lstrip(".") for e in extensions}
    skipped: list[dict[str, str]] = []
    per_class: dict[str, list[tuple[str, int]]] = {}
    walk = _Walk(src, allowed, skipped)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if _is_junk(entry.name):
            skipped.append({"path": entry.name, "reason": "hidden or system file"})
        elif entry.is_dir():
            if walk.enter(Path(entry.path)):
                per_class[entry.name] = walk.images_below(Path(entry.path))
        else:
            skipped.append({"path": entry.name, "reason": "not inside a class folder"})
    empty = [name for name, files in per_class.items() if not files]
    for name in empty:
        skipped.append({"path": name + "/", "reason": "empty class folder: no image files"})
    classes = [name for name, files in per_class.items() if files]
    if not classes:
        raise ValueError(f"{src}: no class folder holds an image file ({', '.join(sorted(allowed))})")
    candidates = [
        Candidate(path, label, size) for label, name in enumerate(classes) for path, size in per_class[name]
    ]
    return FolderScan(classes, candidates, skipped, empty)


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

    def enter(self, folder: Path) -> bool:
        """Whether to walk `folder`; a loop or a second way into one folder is recorded as skipped."""
        real = os.path.realpath(folder)
        if real in self.folders or self.top.startswith(real + os.sep):
            reason = "a link to a folder already walked or above the input (a loop)"
            self.skipped.append({"path": str(folder.relative_to(self.src)) + "/", "reason": reason})
            return False
        self.folders.add(real)
        return True

    def images_below(self, folder: Path) -> list[tuple[str, int]]:
        found = []
        for root, dirs, files in os.walk(folder, followlinks=True):
            for name in [d for d in dirs if _is_junk(d)]:
                self.skipped.append(
                    {
                        "path": str(Path(root, name).relative_to(self.src)) + "/",
                        "reason": "hidden or system folder",
                    }
                )
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
    config: ImageFolderConfig, out: str, index: int, start: int, members: list[Candidate]
) -> ShardResult:
    """Ray task body: check and write one shard; keys number samples in the seeded global order."""
    Image.MAX_IMAGE_PIXELS = max(config.max_pixels, Image.MAX_IMAGE_PIXELS or 0)
    relative = f"{config.split}/{shard_name(config.name, index)}"
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


def build_imagefolder(config: ImageFolderConfig, out: Path, overwrite: bool = False) -> Path:
    """Shard the image tree at `config.src` into `out/{split}/`; return the dataset.json path."""
    src = Path(config.src)
    scan = scan_image_folder(src, config.extensions)  # fails on a missing/empty source before writing
    _refuse_nested(src, out)
    prepare_output_dir(out, overwrite)
    started = time.perf_counter()
    config = config.model_copy(update={"src": str(src.resolve())})
    shards = [
        (str(out), i, start, members)
        for i, (start, members) in enumerate(plan_shards(scan.candidates, config))
    ]
    results = run_shard_tasks(
        write_folder_shard, shards, label=f"{config.name}/{config.split}", shared=(config,)
    )
    skipped = scan.skipped + [item for result in results for item in result.skipped]
    kept = sum(r.samples for r in results)
    if kept == 0:
        raise ValueError(f"{src}: none of {len(scan.candidates)} image files could be decoded; see {out}")
    card: dict[str, Any] = {
        "name": config.name,
        "kind": "imagefolder",
        "classes": scan.classes,
        "image": None,
        "splits": {config.split: split_entry(config.split, config.name, results)},
        "config": config.model_dump(mode="json"),
        "config_hash": config.digest(),
        "source": str(src.resolve()),
        "empty_classes": scan.empty_classes,
        "skipped": skipped,
        "skipped_count": len(skipped),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return write_card(out, card)
