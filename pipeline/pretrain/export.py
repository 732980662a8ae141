"""`vitpipe export RUN`: a checkpoint's consolidated fp32 weights as a vitpipe model folder (what
fine-tuning reads) and an HF transformers folder, from any number of ranks and any ZeRO stage."""

from __future__ import annotations

import json
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.pretrain.checkpoints import (
    EXPORT_DIR,
    VITPIPE_DIR,
    CheckpointInfo,
    newest,
    scan_checkpoints,
    step_of,
)
from pipeline.storage import local_folder, publish_folder
from vit.config import ViTConfig
from vit.engine import consolidated_state
from vit.hf import HF_DIR, export_hf
from vit.model import VisionTransformer
from vit.weights import load_state, save_pretrained


@dataclass(frozen=True)
class Export:
    step: int
    checkpoint: str
    vitpipe: str
    hf: str


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
        if name in (posixpath.basename(info.path), str(info.step)):
            return info
    for item in skipped:
        if name in (posixpath.basename(item.path), str(step_of(item.path))):
            raise FileNotFoundError(f"{item.path}: cannot be exported: {item.why}")
    known = ", ".join(str(info.step) for info in checkpoints) or "none"
    raise FileNotFoundError(f"{run_dir}: no checkpoint {name!r}; steps with a complete one: {known}")


def export_checkpoint(run_dir: str, checkpoint: str | None = None, out: str | None = None) -> Export:
    """Consolidate one checkpoint and write `OUT/vitpipe` and `OUT/hf` (OUT defaults to RUN/export)."""
    info = choose_checkpoint(run_dir, checkpoint)
    out = out or posixpath.join(run_dir, EXPORT_DIR)
    with tempfile.TemporaryDirectory(prefix="vitpipe-export-") as scratch:
        folder = local_folder(info.path, Path(scratch) / "checkpoint")
        model = VisionTransformer(ViTConfig.from_dict(info.meta["vit"], source=f"{info.path}/vitpipe.json"))
        load_state(model, consolidated_state(folder, info.tag), info.path)
        staged = Path(scratch) / "export"
        save_pretrained(model, staged / VITPIPE_DIR, labels=info.meta.get("classes"))
        export_hf(model, staged / HF_DIR, labels=info.meta.get("classes"))
        (staged / "export.json").write_text(
            json.dumps({"checkpoint": info.path, "step": info.step}, indent=2) + "\n"
        )
        publish_folder(staged, out)
    return Export(info.step, info.path, posixpath.join(out, VITPIPE_DIR), posixpath.join(out, HF_DIR))
