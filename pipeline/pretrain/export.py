"""`vitpipe export RUN`: a run's weights as a vitpipe model folder (what fine-tuning reads) and an HF
transformers folder: a checkpoint's consolidated fp32 weights (any number of ranks, any ZeRO stage) or its
EMA weights, of the last step or of the step the probes scored best; with EMA kept, the other kind is
exported beside them (`OUT/ema/` or `OUT/raw/`), so fine-tuning can start from either."""

from __future__ import annotations

import json
import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from pipeline.pretrain.card import CARD_FILE, card_facts, write_cards
from pipeline.pretrain.checkpoints import (
    BEST_RECORD,
    EMA_DIR,
    EXPORT_DIR,
    LAST_RAW,
    VITPIPE_DIR,
    CheckpointInfo,
    Kind,
    Selection,
    architecture_of,
    best_dir,
    checkpoint_dir_name,
    ema_files,
    newest,
    read_best,
    scan_checkpoints,
    step_of,
)
from pipeline.storage import join, local_folder, publish_folder, resolve, write_atomic
from vit.build import build_model
from vit.config import CONFIG_FILE
from vit.engine import consolidated_state
from vit.fragments import assemble, load_fragments
from vit.hf import HF_DIR
from vit.weights import export_hf_folder, load_state, read_checkpoint, save_pretrained

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Export:
    step: int
    checkpoint: str  # the checkpoint (or, for the best step, the folder) the weights came from
    vitpipe: str
    hf: str  # the HF transformers folder (ViTForImageClassification or BitForImageClassification)
    selection: Selection = LAST_RAW
    beside: dict[str, str] = field(default_factory=dict)  # the other kind's vitpipe folder, when exported

    def describe(self) -> str:
        which = f"{self.selection.weights} weights of step {self.step:,}"
        if self.selection.select == "best":
            which += " (the step the probes scored best)"
        others = "".join(f"; {kind} weights: {folder}" for kind, folder in self.beside.items())
        return f"weights: {self.vitpipe} (vitpipe), {self.hf} (HF transformers); {which}{others}"

    def described_files(self) -> list[str]:
        """The exported config and model card (what tracking keeps of an export); local folders only."""
        if "://" in self.vitpipe:
            return []
        return [posixpath.join(self.vitpipe, name) for name in (CONFIG_FILE, CARD_FILE)]


@dataclass(frozen=True)
class Weights:
    """One kind of weights chosen for an export: its step, where it came from, the full fp32 state, and
    for the best step the probes' record of it."""

    kind: Kind
    step: int
    source: str
    state: dict[str, torch.Tensor]
    probed: dict[str, Any] | None = None


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


def default_out(run_dir: str, info: CheckpointInfo, selection: Selection) -> str:
    """RUN/export for the newest checkpoint's raw weights; a name saying what else was chosen otherwise
    (`export-00000200`, `export-best`, `export-ema`, and `export-last` when RUN/export holds the job's
    best or EMA weights), so a look at other weights never replaces the export the run's fine-tuning
    reads (the pretrain stage names RUN/export for the job's own choice)."""
    name = EXPORT_DIR
    if selection.select == "best":
        name += "-best"
    elif info.step != scan_checkpoints(run_dir)[0][-1].step:
        name += f"-{info.step:08d}"
    elif selection == LAST_RAW and _holds_other_selection(join(run_dir, EXPORT_DIR)):
        name += "-last"  # the run's export is its job's choice (best, or EMA): left as it is
    if selection.weights == "ema":
        name += "-ema"
    return join(run_dir, name)


def _holds_other_selection(out: str) -> bool:
    """Whether the export in `out` holds other weights than the last step's raw ones."""
    filesystem, root = resolve(out)
    record = _previous_export(filesystem, root) or {}
    return (record.get("select", "last"), record.get("weights", "raw")) != ("last", "raw")


def export_checkpoint(
    run_dir: str,
    checkpoint: str | None = None,
    out: str | None = None,
    data: dict[str, Any] | None = None,
    selection: Selection = LAST_RAW,
    probe_key: str | None = None,
) -> Export:
    """Write the selected weights as `OUT/vitpipe` and `OUT/hf`, the other kind (when the run kept it) as
    `OUT/KIND/vitpipe` and `OUT/KIND/hf`, and `OUT/export.json`. OUT may hold other files; files under
    those names that this export did not write are refused, named, never replaced. Each folder gets a
    model card naming the step and how it was chosen; `data` describes the pretraining data for it. With
    `probe_key` (the run's probes), a best step scored by other probes is refused rather than exported."""
    if checkpoint is not None and selection.select == "best":
        raise ValueError("a checkpoint named and select best both choose the step: give one of them")
    info = choose_checkpoint(run_dir, checkpoint)
    out = out or default_out(run_dir, info, selection)
    with tempfile.TemporaryDirectory(prefix="vitpipe-export-") as scratch:
        staged = Path(scratch) / "export"
        chosen = _weights(run_dir, info, selection.select, selection.weights, Path(scratch), probe_key)
        if chosen is None:
            raise FileNotFoundError(_missing(run_dir, info, selection.select, selection.weights))
        cards = {"": _stage(staged, chosen, info, data, selection.select)}
        beside = _weights(run_dir, info, selection.select, selection.other, Path(scratch), probe_key)
        if beside is not None:
            cards[beside.kind] = _stage(staged / beside.kind, beside, info, data, selection.select)
        written = sorted(str(path.relative_to(staged)) for path in staged.rglob("*") if path.is_file())
        refuse_foreign_files(out, written)
        record = {
            "format": EXPORT_FORMAT,
            "checkpoint": chosen.source,
            "step": chosen.step,
            "select": selection.select,
            "weights": selection.weights,
            "files": written,
            "card": cards[""],
            "cards": {kind: facts for kind, facts in cards.items() if kind},
        }
        (staged / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        publish_folder(staged, out)
    folders = {kind: join(out, kind, VITPIPE_DIR) for kind in cards if kind}
    return Export(chosen.step, chosen.source, join(out, VITPIPE_DIR), join(out, HF_DIR), selection, folders)


def _weights(
    run_dir: str, info: CheckpointInfo, select: str, kind: Kind, scratch: Path, probe_key: str | None
) -> Weights | None:
    """The weights of one kind for an export, or None when the run did not keep them."""
    if select == "best":
        return _best(run_dir, kind, scratch, probe_key)
    folder = scratch / "checkpoint"
    if not folder.is_dir():  # a checkpoint in object storage is downloaded once, for both kinds
        folder = local_folder(info.path, folder)
    if kind == "raw":
        return Weights(kind, info.step, info.path, consolidated_state(folder, info.tag))
    files = ema_files(folder, info.meta)
    if not files:
        return None
    shapes = {
        name: tuple(t.shape)
        for name, t in build_model(architecture_of(info.meta, info.path)).named_parameters()
    }
    return Weights(kind, info.step, info.path, assemble(load_fragments(files), shapes))


def _best(run_dir: str, kind: Kind, scratch: Path, probe_key: str | None) -> Weights | None:
    """The weights the probes scored best of this kind (RUN/best/KIND), or None when none were probed;
    a best scored by probes other than `probe_key`'s (other targets or shots) is refused, said why."""
    location = best_dir(run_dir, kind)
    record = read_best(location)
    if record is None:
        return None
    if probe_key is not None and record.get("probe_key") != probe_key:
        raise ValueError(
            f"{join(location, BEST_RECORD)}: step {record.get('step')} was the best of other probes (key "
            f"{record.get('probe_key')}, the run's now {probe_key}: other targets, shots, seeds, l2, "
            "val_fraction or select_shots) and no probe of these has run since; train on (raise steps) to "
            "probe again, or export the last step"
        )
    weights = join(location, str(record.get("folder", "")))
    folder = local_folder(weights, scratch / f"best-{kind}")
    return Weights(kind, int(record["step"]), weights, read_checkpoint(folder).state, record)


def _missing(run_dir: str, info: CheckpointInfo, select: str, kind: Kind) -> str:
    if select == "best":
        return (
            f"{run_dir}: no {kind} weights were probed ({join(best_dir(run_dir, kind), BEST_RECORD)} is "
            "missing): probes run every pretrain.eval.every steps (set pretrain.eval"
            + (" and pretrain.ema" if kind == "ema" else "")
            + "), or export the last step"
        )
    return (
        f"{info.path}: holds no EMA weights ({EMA_DIR}/ is missing): the run kept none at step "
        f"{info.step:,}; set pretrain.ema and train on, or export the raw weights"
    )


def _stage(
    staged: Path, weights: Weights, info: CheckpointInfo, data: dict[str, Any] | None, select: str
) -> dict[str, Any]:
    """Write one kind's vitpipe and HF folders and their cards under `staged`; returns the card's facts."""
    model = build_model(architecture_of(info.meta, info.path))
    load_state(model, weights.state, weights.source)
    labels = info.meta.get("classes")
    save_pretrained(model, staged / VITPIPE_DIR, labels=labels)
    export_hf_folder(model, staged / HF_DIR, labels=labels)
    params = sum(parameter.numel() for parameter in model.parameters())
    facts = card_facts(info.meta, model.config, params, data)  # the run's steps; `weights`: which step
    facts["weights"] = _weights_facts(weights, info, select)
    write_cards(staged, facts)
    return facts


def _weights_facts(weights: Weights, info: CheckpointInfo, select: str) -> dict[str, Any]:
    """What the card says of which weights these are and why this step."""
    facts: dict[str, Any] = {"kind": weights.kind, "select": select, "step": weights.step}
    if weights.kind == "ema":
        facts["decay"] = (info.meta.get("ema") or {}).get("decay")
    if weights.probed is not None:
        facts |= {key: weights.probed.get(key) for key in ("score", "metric")}
    return facts


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
