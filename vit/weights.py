"""Weights on disk without pickle: a folder with `model.safetensors` + `config.json`.

`load_pretrained` reads vitpipe folders (a ViT or a BiT ResNet) and HF transformers ViT and BiT folders
alike, and adapts the weights to the model asked for: position embeddings resampled to a new resolution,
a new zero head for a new class count, the pre-logits layer dropped for fine-tuning as the paper does.
Anything else that does not fit is a ValueError naming the file, the key and both shapes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.build import build_model
from vit.config import (
    CONFIG_FILE,
    FAMILIES,
    Architecture,
    ViTConfig,
    architecture_from_record,
    architecture_record,
)
from vit.files import (
    WEIGHTS_FILE,
    Checkpoint,
    read_config_json,
    read_safetensors,
    write_model_folder,
)
from vit.hf import export_hf, read_hf_checkpoint
from vit.hf_bit import export_hf_bit, read_hf_bit_checkpoint
from vit.posemb import resample_posemb

log = logging.getLogger(__name__)

FORMATS = {family: f"vitpipe.{family}/1" for family in FAMILIES}  # config.json's "format", per family
HEAD_KEYS = ("head.weight", "head.bias")
PRE_LOGITS_KEYS = ("pre_logits.0.weight", "pre_logits.0.bias")


def save_pretrained(model: nn.Module, directory: str | Path, *, labels: list[str] | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (architecture, normalisation, optional class names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if labels is not None and len(labels) != model.config.num_classes:
        raise ValueError(f"{len(labels)} labels given for a model with {model.config.num_classes} classes")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    form = FORMATS[model.config.family]
    config: dict[str, Any] = {"format": form, **architecture_record(model.config)}
    if labels is not None:
        config["labels"] = list(labels)
    write_model_folder(directory, state, {"format": "pt", "vitpipe": form}, {CONFIG_FILE: config})
    return directory


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a vitpipe folder (ViT or BiT), or an HF transformers ViT or BiT folder (in vitpipe's naming)."""
    directory = Path(directory)
    data = read_config_json(directory)
    if data.get("format") in FORMATS.values():
        config = architecture_from_record(data, source=str(directory / CONFIG_FILE))
        state = read_safetensors(directory / WEIGHTS_FILE)
        return Checkpoint(config, state, data.get("labels"), str(directory / WEIGHTS_FILE))
    if data.get("model_type") == "vit":
        return read_hf_checkpoint(directory)
    if data.get("model_type") == "bit":
        return read_hf_bit_checkpoint(directory)
    raise ValueError(
        f"{directory / CONFIG_FILE}: neither a vitpipe model (format {' or '.join(FORMATS.values())}) "
        f"nor an HF ViT or BiT (model_type 'vit' or 'bit'); got format={data.get('format')!r}, "
        f"model_type={data.get('model_type')!r}"
    )


def export_hf_folder(model: nn.Module, directory: str | Path, *, labels: list[str] | None = None) -> Path:
    """Write the HF transformers folder of a ViT (`ViTForImageClassification`) or a BiT
    (`BitForImageClassification`)."""
    export = export_hf if isinstance(model.config, ViTConfig) else export_hf_bit
    return export(model, Path(directory), labels=labels)


def _refuse_fixed_changes(source: Architecture, changes: dict[str, Any], source_name: str) -> None:
    """Raise naming every field the checkpoint's family cannot adapt whose requested value differs."""
    known = source.to_dict()
    unknown = sorted(set(changes) - set(known))
    if unknown:
        raise ValueError(f"{source_name}: unknown {source.label} config field(s) {unknown}")
    fixed = [
        f"{name}: the checkpoint has {getattr(source, name)!r}, the model asks for {value!r}"
        for name, value in changes.items()
        if name not in source.adaptable
        and (tuple(value) if isinstance(value, list) else value) != getattr(source, name)
    ]
    if fixed:
        raise ValueError(f"{source_name} cannot be loaded into this model: " + "; ".join(fixed))


def adapt_state_dict(
    state: dict[str, torch.Tensor],
    source: Architecture,
    target: Architecture,
    source_name: str = "checkpoint",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit weights saved under `source` to a model built from `target`; returns them and what changed."""
    _refuse_fixed_changes(source, {name: getattr(target, name) for name in target.to_dict()}, source_name)
    state = dict(state)
    notes: list[str] = []
    old, new = source.geometry.grid, target.geometry.grid
    if old != new and "pos_embed" in state:
        prefix = target.num_prefix_tokens
        state["pos_embed"] = resample_posemb(state["pos_embed"], (new, new), num_prefix_tokens=prefix)
        notes.append(f"position embeddings resampled from {old}x{old} to {new}x{new}")
    if getattr(source, "representation_size", None) != getattr(target, "representation_size", None):
        for key in PRE_LOGITS_KEYS:
            state.pop(key, None)
        if target.representation_size:  # type: ignore[union-attr]
            notes.append(f"new pre-logits layer of size {target.representation_size}")  # type: ignore[union-attr]
        else:
            notes.append("pre-logits layer dropped")
    if source.num_classes != target.num_classes or source.feature_dim != target.feature_dim:
        for key in HEAD_KEYS:
            state.pop(key, None)
        notes.append(f"new zero-initialised head for {target.num_classes} classes")
    return state, notes


def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    fresh: frozenset[str] = frozenset(),
) -> None:
    """Copy weights into the model; every missing, unexpected, mis-shaped or non-finite key is named in one
    error.

    Keys in `fresh` may be absent from `state`: those layers keep the model's own initialisation.
    """
    expected = model.state_dict()
    problems = [
        f"{key!r} has shape {list(state[key].shape)} in the checkpoint, "
        f"the model expects {list(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        problems.append(f"unexpected key(s) {unexpected}")
    missing = sorted(set(expected) - set(state) - fresh)
    if missing:
        problems.append(f"missing key(s) {missing}")
    not_finite = sorted(
        key
        for key, tensor in state.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    )
    if not_finite:
        problems.append(f"NaN or infinite values in {not_finite} (weights of a run that diverged?)")
    if problems:
        raise ValueError(f"{source}: weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def load_pretrained(directory: str | Path, **overrides: Any) -> nn.Module:
    """A model from a vitpipe or HF folder; `overrides` (image_size, num_classes, ...) adapt it."""
    checkpoint = read_checkpoint(directory)
    return adapted_model(checkpoint.state, checkpoint.config, checkpoint.source, **overrides)


def adapted_model(
    state: dict[str, torch.Tensor], config: Architecture, source: str, **overrides: Any
) -> nn.Module:
    """A model from weights in memory saved under `config` (`source` names them in errors), adapted by
    `overrides` as `load_pretrained` adapts a folder's: what probing weights during pretraining needs."""
    _refuse_fixed_changes(config, overrides, source)
    target = config.replace(**overrides)
    state, notes = adapt_state_dict(state, config, target, source)
    model = build_model(target)
    # The head and pre-logits layer may be absent (dropped above, or a headless HF ViTModel checkpoint):
    # they keep the model's own initialisation, a zero head.
    own = model.state_dict()
    fresh = frozenset(key for key in HEAD_KEYS + PRE_LOGITS_KEYS if key in own and key not in state)
    if fresh and not notes:
        notes.append(f"initialised afresh (absent from the checkpoint): {sorted(fresh)}")
    load_state(model, state, source, fresh=fresh)
    for note in notes:
        log.info("%s: %s", source, note)
    return model


# The classifier a target replaces (and the pre-logits layer fine-tuning drops): not the backbone.
CLASSIFIER_PREFIXES = ("head.", "pre_logits.")


def state_digest(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> str:
    """A hash of a model's weights (names, shapes, values in fp32), less the tensors whose names start with
    one of `skip`: which weights a run started from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if skip and name.startswith(skip):
            continue
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def backbone_digest(model: torch.nn.Module) -> str:
    """The digest of a model's weights less its classifier: the same for a pretrained model and the one a
    target adapted from it (a new head), so a fine-tuning's start can be traced to a pretraining step."""
    return state_digest(model, skip=CLASSIFIER_PREFIXES)
