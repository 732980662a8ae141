"""`vitpipe export RUN`: a checkpoint's consolidated fp32 weights as a vitpipe model folder (what
fine-tuning reads) and, for a ViT, an HF transformers folder, from any number of ranks and any ZeRO stage."""

from __future__ import annotations

import json
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.pretrain.card import CARD_FILE, card_facts, write_cards
from pipeline.pretrain.checkpoints import (
    EXPORT_DIR,
    VITPIPE_DIR,
    CheckpointInfo,
    architecture_of,
    checkpoint_dir_name,
    newest,
    scan_checkpoints,
    step_of,
)
from pipeline.storage import join, local_folder, publish_folder, resolve, write_atomic
from vit.build import build_model
from vit.config import CONFIG_FILE
from vit.engine import consolidated_state
from vit.hf import HF_DIR
from vit.weights import export_hf_folder, load_state, save_pretrained


@dataclass(frozen=True)
class Export:
    step: int
    checkpoint: str
    vitpipe: str
    hf: str  # the HF transformers folder (ViTForImageClassification or BitForImageClassification)

    def describe(self) -> str:
        return f"weights: {self.vitpipe} (vitpipe), {self.hf} (HF transformers)"

    def described_files(self) -> list[str]:
        """The exported config and model card (what tracking keeps of an export); local folders only."""
        if "://" in self.vitpipe:
            return []
        return [posixpath.join(self.vitpipe, name) for name in (CONFIG_FILE, CARD_FILE)]


def choose_checkpoint(run_dir: str, name: str | None = None) -> CheckpointInfo:
    """The newest complete checkpoint of a run (newer damaged ones are named and skipped), or the one
    named (`checkpoint_00000200` or its step, `200`), which must be complete."""
    checkpoints, skipped = scan_checkpoints(run_dir)
    if name is None:
        latest = newest(checkpoints, skipped)
        if latest is None:
            damaged = "".join(f"; {item.path}: {item.why}" for item in skipped)
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint (checkpoint_*/vitpipe.json){damaged}")
        return latest
    for info in checkpoints:
        if name in (checkpoint_dir_name(info.step), str(info.step)):
            return info
    for item in skipped:
        if name in (checkpoint_dir_name(step_of(item.path)), str(step_of(item.path))):
            raise FileNotFoundError(f"{item.path}: cannot be exported: {item.why}")
    known = ", ".join(str(info.step) for info in checkpoints) or "none"
    raise FileNotFoundError(f"{run_dir}: no checkpoint {name!r}; steps with a complete one: {known}")


def export_checkpoint(
    run_dir: str, checkpoint: str | None = None, out: str | None = None, data: dict[str, Any] | None = None
) -> Export:
    """Consolidate one checkpoint and write `OUT/vitpipe`, `OUT/hf` and `OUT/export.json`. OUT defaults to
    RUN/export for the newest checkpoint (what the run's fine-tuning reads) and RUN/export-NNNNNNNN for an
    older one. OUT may hold other files; files under those names that this export did not write are
    refused, named, never replaced. Each folder gets a model card; `data` describes the pretraining data
    for it (name, directory, split, images, classes)."""
    info = choose_checkpoint(run_dir, checkpoint)
    if out is None:
        newest_step = scan_checkpoints(run_dir)[0][-1].step
        name = EXPORT_DIR if info.step == newest_step else f"{EXPORT_DIR}-{info.step:08d}"
        out = join(run_dir, name)
    with tempfile.TemporaryDirectory(prefix="vitpipe-export-") as scratch:
        folder = local_folder(info.path, Path(scratch) / "checkpoint")
        model = build_model(architecture_of(info.meta, info.path))
        load_state(model, consolidated_state(folder, info.tag), info.path)
        staged = Path(scratch) / "export"
        save_pretrained(model, staged / VITPIPE_DIR, labels=info.meta.get("classes"))
        export_hf_folder(model, staged / HF_DIR, labels=info.meta.get("classes"))
        params = sum(parameter.numel() for parameter in model.parameters())
        facts = card_facts(info.meta, model.config, params, data)
        write_cards(staged, facts)
        written = sorted(str(path.relative_to(staged)) for path in staged.rglob("*") if path.is_file())
        refuse_foreign_files(out, written)
        record = {
            "format": EXPORT_FORMAT,
            "checkpoint": info.path,
            "step": info.step,
            "files": written,
            "card": facts,
        }
        (staged / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        publish_folder(staged, out)
    return Export(info.step, info.path, join(out, VITPIPE_DIR), join(out, HF_DIR))


EXPORT_RECORD = "export.json"  # what an export wrote: the proof that replacing it later touches only ours
EXPORT_FORMAT = "vitpipe.export/1"


def add_transfer_results(out: str, results: list[dict[str, Any]]) -> bool:
    """Write the model cards of the export in `out` again, with the transfer results of its weights;
    False when `out` is no export of this vitpipe (nothing is touched then)."""
    filesystem, root = resolve(out)
    previous = _previous_export(filesystem, root)
    if previous is None or "card" not in previous:
        return False
    with tempfile.TemporaryDirectory(prefix="vitpipe-card-") as scratch:
        staged = Path(scratch)
        for name in (VITPIPE_DIR, HF_DIR):
            if filesystem.get_file_info(posixpath.join(root, name)).type == pafs.FileType.Directory:
                (staged / name).mkdir()
        for name in write_cards(staged, previous["card"], results):
            write_atomic(join(out, name), (staged / name).read_text())
    return True


def refuse_foreign_files(out: str, written: list[str]) -> None:
    """Refuse to export into OUT when `vitpipe/`, `hf/` or `export.json` there hold a file the previous
    export into OUT did not write (its export.json lists them; one of before that list names the files of
    the same names as this export's)."""
    filesystem, root = resolve(out)
    previous = _previous_export(filesystem, root)
    if previous is None:
        ours: set[str] = set()
    else:
        ours = set(previous.get("files", written)) | {EXPORT_RECORD}
    foreign = [
        name
        for name in _files_under(filesystem, root, (VITPIPE_DIR, HF_DIR, EXPORT_RECORD))
        if name not in ours
    ]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out}: already holds files a vitpipe export did not write there ({shown}); vitpipe replaces "
            "only its own. Export elsewhere (--out DIR) or move them"
        )


def _previous_export(filesystem: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    try:
        with filesystem.open_input_stream(posixpath.join(root, EXPORT_RECORD)) as stream:
            record = json.loads(stream.read())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    ours = isinstance(record, dict) and (
        record.get("format") == EXPORT_FORMAT or {"checkpoint", "step"} <= set(record)
    )
    return record if ours else None


def _files_under(filesystem: pafs.FileSystem, root: str, names: tuple[str, ...]) -> list[str]:
    """Every file at or under ROOT/NAME for each of `names`, relative to ROOT."""
    found = []
    for name in names:
        path = posixpath.join(root, name)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            found.append(name)
        elif info.type == pafs.FileType.Directory:
            found += [
                posixpath.relpath(entry.path, root)
                for entry in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                if entry.type == pafs.FileType.File
            ]
    return sorted(found)
