"""Finished fine-tuning runs kept across commands. Each member of a sweep (a target, mode and rate) records
in its result.json a key of everything that defines that one run: the starting weights' bytes, the
target's manifest, the finetune section at its rate, the architecture, the evaluation settings. A later
command (`reuse`: not a forced redo) takes the result of a member whose key is its own instead of training
it again, so adding a rate to `lr_sweep` trains only that rate; any other change trains every rate. A rate
an extension of the grid added (`lr_extend`) is the run a sweep listing that rate trains, kept the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from pipeline.config import FINETUNE_OPERATIONAL, digest
from pipeline.preprocess.manifest import MANIFEST_FILE
from pipeline.storage import join, resolve
from pipeline.transfer.sweep import member_folder
from pipeline.transfer.task import CONFUSION_PLOT, MODEL_DIR, RESULT_FILE, RUN_KEY
from vit.config import CONFIG_FILE

if TYPE_CHECKING:
    from pipeline.config import EvaluateConfig
    from pipeline.transfer.plan import TransferPlan, TransferTask

# Settings of the whole command, not of one run: another target, mode or weights path retrains no run,
# nor does another lr_extend (how far the grid grows: a rate an extension added is the run a sweep
# listing that rate trains).
COMMAND_WIDE = frozenset({"targets", "weights", "modes", "lr_extend"})
CHUNK_BYTES = 16 * 1024**2
WEIGHT_FILES = (".json", ".safetensors", "pytorch_model.bin")  # what read_checkpoint reads of a folder


def files_fingerprint(folder: str, names: list[str]) -> str:
    """Hash of the bytes of the named files of `folder` (local or remote), read in chunks."""
    filesystem, root = resolve(folder)
    hasher = hashlib.sha256()
    for name in sorted(names):
        hasher.update(name.encode() + b"\0")
        with filesystem.open_input_stream(join(root, name)) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                hasher.update(chunk)
    return hasher.hexdigest()[:16]


def weights_fingerprint(weights: str) -> str:
    """Hash of what vitpipe reads of a weights folder (vitpipe's or HF's): its JSON configs and weight
    files, not its model card (which fine-tuning writes again with its results)."""
    filesystem, root = resolve(weights)
    listing = filesystem.get_file_info(pafs.FileSelector(root))
    names = [info.base_name for info in listing if info.type == pafs.FileType.File]
    return files_fingerprint(weights, [name for name in names if name.endswith(WEIGHT_FILES)])


def run_key(task: TransferTask, evaluate: EvaluateConfig | None, weights: str | None, data: str) -> str:
    """The key of one member: its target (`data`: its manifest's fingerprint), mode, architecture, starting
    weights (`weights`: their fingerprint; pretrained mode only), the section at its rate and its recipe,
    and the evaluation."""
    section = task.finetune.model_dump(mode="json", exclude=FINETUNE_OPERATIONAL | COMMAND_WIDE)
    target = task.target
    return digest(
        {
            "target": {"name": target.name, "manifest": data, "image_size": target.image_size},
            "mode": task.mode,
            "weights": weights if task.mode == "pretrained" else None,
            "architecture": task.architecture.to_dict(),
            "finetune": section,
            "recipe": dataclasses.asdict(task.recipe),
            "evaluate": evaluate.model_dump(mode="json") if evaluate is not None else None,
        }
    )


def run_keys(
    plan: TransferPlan, tasks: list[TransferTask] | None = None
) -> dict[tuple[str, str, float], str]:
    """The key of every fine-tuning member of `tasks` (default: the plan's), by (target, mode, rate); the
    weights are read once."""
    tasks = plan.tasks if tasks is None else tasks
    if not plan.train:
        return {}
    pretrained = any(task.mode == "pretrained" for task in tasks)
    weights = weights_fingerprint(plan.weights) if plan.weights is not None and pretrained else None
    data = {task.target.name: files_fingerprint(task.target.directory, [MANIFEST_FILE]) for task in tasks}
    return {
        (task.target.name, task.mode, task.lr): run_key(task, plan.evaluate, weights, data[task.target.name])
        for task in tasks
        if task.lr is not None
    }


def reusable(
    plan: TransferPlan, keys: dict[tuple[str, str, float], str], tasks: list[TransferTask] | None = None
) -> dict[tuple[str, str, float], Any]:
    """The finished members of `tasks` (default: the plan's) whose result.json holds their key and whose
    weights are still there, by (target, mode, rate); a member that did not probe few-shot only if it need
    not (not the lowest rate)."""
    kept = {}
    for task in plan.tasks if tasks is None else tasks:
        if task.lr is None:
            continue
        folder = member_folder(join(plan.out, task.target.name, task.mode), task.lr)
        result, key = _read_result(folder), keys.get((task.target.name, task.mode, task.lr))
        if key is None or result is None or result.get(RUN_KEY) != key:
            continue
        filesystem, model = resolve(join(folder, MODEL_DIR, CONFIG_FILE))
        if filesystem.get_file_info(model).type != pafs.FileType.File:
            continue
        if task.probe and plan.evaluate is not None and result.get("fewshot") is None:
            continue
        kept[task.target.name, task.mode, task.lr] = _in_folder(result, folder)
    return kept


def _read_result(folder: str) -> dict[str, Any] | None:
    """A member folder's result.json, or None when it has none or it is not a readable JSON object."""
    filesystem, path = resolve(join(folder, RESULT_FILE))
    try:
        with filesystem.open_input_stream(path) as stream:
            result = json.loads(stream.read())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def _in_folder(result: dict[str, Any], folder: str) -> dict[str, Any]:
    """A kept result with its files named where they are now (the run folder may have moved)."""
    moved = dict(result)
    for field, name in (("weights", MODEL_DIR), ("confusion_plot", CONFUSION_PLOT)):
        if moved.get(field) is not None:
            moved[field] = join(folder, name)
    return moved
