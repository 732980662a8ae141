"""dataset.json, the card beside the shards: splits, shard files, classes, counts, what was skipped."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.console import say
from pipeline.datasets.shards import ShardResult, brace_pattern, result_dicts
from pipeline.storage import remove_entries, write_atomic

CARD_FILE = "dataset.json"
CARD_FORMAT = "vitpipe.webdataset/1"


PREVIEW_FILE = "preview.png"


def check_output_dir(out: Path, overwrite: bool) -> set[str]:
    """Refuse an `out` that is a file, or not empty unless `overwrite` and it is a dataset; return that
    dataset's own entries (its card, preview and split folders), which a build replaces, if any."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the output must be a folder")
    if not (out.exists() and any(out.iterdir())):
        return set()
    if not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    if not (out / CARD_FILE).is_file():
        raise FileExistsError(
            f"{out} is not empty and holds no {CARD_FILE}: not a vitpipe dataset, so --overwrite "
            "will not delete it; choose another output directory"
        )
    try:
        return {
            CARD_FILE,
            PREVIEW_FILE,
            *parse_card((out / CARD_FILE).read_bytes(), str(out / CARD_FILE))["splits"],
        }
    except (ValueError, KeyError, TypeError) as error:
        raise FileExistsError(
            f"{error}; --overwrite will not guess which files are the dataset's: choose another output "
            "directory, or remove it yourself"
        ) from None


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create `out`, after check_output_dir; an earlier dataset there loses its own entries, and nothing
    else."""
    ours = check_output_dir(out, overwrite)
    if ours:
        kept = remove_entries(str(out), lambda name: name in ours)
        if kept:
            say(f"{out}: kept {', '.join(kept)} (not the dataset's)")
    out.mkdir(parents=True, exist_ok=True)


def split_entry(split: str, name: str, results: list[ShardResult]) -> dict[str, Any]:
    """The card's entry for one split: its brace pattern, shards, sample and per-class counts."""
    per_class: Counter[int] = Counter()
    for result in results:
        per_class.update(result.class_counts)
    return {
        "pattern": f"{split}/{brace_pattern(name, len(results))}",
        "samples": sum(r.samples for r in results),
        "bytes": sum(r.bytes for r in results),
        "per_class": {str(label): per_class[label] for label in sorted(per_class)},
        "shards": result_dicts(results),
    }


def write_card(out: Path, card: dict[str, Any]) -> Path:
    """Write dataset.json (after every shard is in place, so its presence means the dataset is whole)."""
    path = out / CARD_FILE
    write_atomic(str(path), json.dumps({"format": CARD_FORMAT, **card}, indent=2) + "\n")
    return path


def read_card(directory: str | Path) -> dict[str, Any]:
    """Read a dataset's card; a missing or foreign card is an error naming the directory."""
    path = Path(directory) / CARD_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no {CARD_FILE}; not a dataset written by vitpipe") from None
    return parse_card(text, str(path))


def parse_card(text: str | bytes, source: str) -> dict[str, Any]:
    """A card's JSON, checked to be vitpipe's; errors name `source` (the card's path or URL)."""
    try:
        card = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: not valid JSON: {error}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        found = card.get("format") if isinstance(card, dict) else None
        raise ValueError(f"{source}: format {found!r} is not {CARD_FORMAT!r}")
    return card


def shard_paths(directory: str | Path, split: str) -> list[Path]:
    """The shard files of one split, in order, as the card lists them."""
    card = read_card(directory)
    if split not in card["splits"]:
        raise KeyError(f"{directory}: no split {split!r}; it has {', '.join(card['splits'])}")
    return [Path(directory) / shard["file"] for shard in card["splits"][split]["shards"]]


def summarize(directory: str | Path) -> str:
    """A few human lines: what the dataset is, where, and how much of it."""
    card = read_card(directory)
    classes = card["classes"]
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    lines = [f"{card['name']} ({card['kind']}) at {directory}: {len(classes)} classes [{shown}]"]
    for split, entry in card["splits"].items():
        megabytes = entry["bytes"] / 1e6
        lines.append(
            f"  {split}: {entry['samples']:,} samples in {len(entry['shards'])} shard(s), "
            f"{megabytes:.1f} MB, {entry['pattern']}"
        )
    if card.get("skipped_count"):
        lines.append(f"  skipped: {card['skipped_count']} file(s), listed in {CARD_FILE}")
    return "\n".join(lines)
