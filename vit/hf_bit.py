"""Conversion to and from HF transformers' BiT (`BitForImageClassification`, `BitModel`,
`layer_type="preactivation"`) without importing it: the third-party reference vit/bit.py is checked against.

The two are the same function: a weight-standardised 7x7/2 stem, a zero-padded 3x3/2 max pool, pre-activation
bottlenecks with the projection shortcut on the first unit of each stage, a final GroupNorm + ReLU, global
average pooling. The weight standardisation is HF's own (a batch norm over each filter, epsilon 1e-8, not
the BiT reference's 1e-10): with small filters, which trained checkpoints have, any other epsilon changes
the logits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vit.bit import ResNetV2
from vit.config import DEFAULT_MEAN, DEFAULT_STD, BiTConfig
from vit.files import Checkpoint
from vit.hf import (
    check_labels,
    hf_labels,
    image_processor_dict,
    label_fields,
    read_hf_folder,
    write_hf_folder,
)
from vit.variants import BIT_DEPTHS

_UNIT_PARTS = (
    "norm1.weight",
    "norm1.bias",
    "conv1.weight",
    "norm2.weight",
    "norm2.bias",
    "conv2.weight",
    "norm3.weight",
    "norm3.bias",
    "conv3.weight",
)
_FIXED = {  # HF config fields whose other values build another network than vit/bit.py's
    "layer_type": "preactivation",
    "hidden_act": "relu",
    "global_padding": None,
    "embedding_dynamic_padding": False,
    "output_stride": 32,
}
_HF_UNIT = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$")


def _units(config: BiTConfig) -> list[tuple[int, int]]:
    """(stage, unit within the stage) of every bottleneck, in the order of ResNetV2.body."""
    return [(stage, unit) for stage, blocks in enumerate(config.stage_blocks) for unit in range(blocks)]


def _name_pairs(config: BiTConfig) -> list[tuple[str, str]]:
    """(vitpipe name, HF name without `bit.`) of every backbone tensor."""
    pairs = [
        ("stem.weight", "embedder.convolution.weight"),
        ("norm.weight", "norm.weight"),
        ("norm.bias", "norm.bias"),
    ]
    for index, (stage, unit) in enumerate(_units(config)):
        hf_unit = f"encoder.stages.{stage}.layers.{unit}."
        pairs += [(f"body.{index}.{part}", hf_unit + part) for part in _UNIT_PARTS]
        if unit == 0:
            pairs.append((f"body.{index}.downsample.weight", hf_unit + "downsample.conv.weight"))
    return pairs


def to_hf_bit_state_dict(model: ResNetV2) -> dict[str, torch.Tensor]:
    """vitpipe BiT weights -> `BitForImageClassification` weights."""
    state = {key: tensor.detach().cpu() for key, tensor in model.state_dict().items()}
    out = {f"bit.{theirs}": state[ours] for ours, theirs in _name_pairs(model.config)}
    out["classifier.1.weight"], out["classifier.1.bias"] = state["head.weight"], state["head.bias"]
    return {key: tensor.contiguous() for key, tensor in out.items()}


def from_hf_bit_state_dict(
    state: dict[str, torch.Tensor], config: BiTConfig, source: str = "HF state"
) -> dict[str, torch.Tensor]:
    """`BitForImageClassification` or `BitModel` weights -> vitpipe's ResNetV2 state dict; every HF tensor
    is used, or the error names those that are not."""
    backbone = {key.removeprefix("bit."): t for key, t in state.items() if not key.startswith("classifier.")}
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _name_pairs(config):
        if theirs not in backbone:
            raise ValueError(f"{source}: HF weight {theirs!r} missing")
        out[ours] = backbone.pop(theirs)
    if backbone:
        leftover = sorted(backbone)
        raise ValueError(
            f"{source}: HF weights not understood: {leftover[:8]}{' ...' if len(leftover) > 8 else ''}"
        )
    if "classifier.1.weight" in state:
        out["head.weight"], out["head.bias"] = state["classifier.1.weight"], state["classifier.1.bias"]
    return {key: tensor.contiguous() for key, tensor in out.items()}


def _bit_depth(depths: list[int], source: str) -> int:
    for depth, blocks in BIT_DEPTHS.items():
        if tuple(depths) == blocks:
            return depth
    known = ", ".join(f"{depth}: {list(blocks)}" for depth, blocks in BIT_DEPTHS.items())
    raise ValueError(f"{source}: depths {depths} are no BiT depth vitpipe builds ({known})")


def bit_config_from_hf(
    hf_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    preprocessor: dict[str, Any] | None,
    source: str,
) -> BiTConfig:
    """The BiTConfig equivalent to an HF BiT config (and its preprocessor's size, mean and std)."""
    for key, wanted in _FIXED.items():
        if hf_config.get(key, wanted) != wanted:
            raise ValueError(f"{source}: {key}={hf_config[key]!r} is not supported (vitpipe's BiT: {wanted})")
    stem = int(hf_config.get("embedding_size", 64))
    factor = int(hf_config.get("width_factor", 1))
    hidden = [int(size) * factor for size in hf_config.get("hidden_sizes", (256, 512, 1024, 2048))]
    if hidden != [4 * stem * 2**stage for stage in range(4)]:
        raise ValueError(
            f"{source}: hidden_sizes {hidden} (x width_factor) are not 4, 8, 16 and 32 times embedding_size "
            f"{stem}, the only widths vitpipe's BiT builds"
        )
    channels = int(hf_config.get("num_channels", 3))
    mean: tuple[float, ...] = (DEFAULT_MEAN,) * channels
    std: tuple[float, ...] = (DEFAULT_STD,) * channels
    image_size = 224
    if preprocessor:
        if preprocessor.get("do_normalize", True):
            mean = tuple(preprocessor.get("image_mean", mean))
            std = tuple(preprocessor.get("image_std", std))
        size = preprocessor.get("crop_size") or preprocessor.get("size") or {}
        image_size = int(size.get("height") or size.get("shortest_edge") or image_size)
    num_classes = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 2))
    if "classifier.1.weight" in state:
        num_classes = int(state["classifier.1.weight"].shape[0])
    return BiTConfig(
        image_size=image_size,
        patch_size=_patch_size(image_size),
        channels=channels,
        num_classes=num_classes,
        depth=_bit_depth(list(hf_config.get("depths", (3, 4, 6, 3))), source),
        base_width=stem,
        groups=int(hf_config.get("num_groups", 32)),
        mean=mean,
        std=std,
    )


def _patch_size(image_size: int) -> int:
    """A BiT's patch size is the data's layout only (any fits its weights): 16 where it divides the image."""
    return next(size for size in (16, 8, 4, 2, 1) if image_size % size == 0)


def hf_bit_config_dict(config: BiTConfig, labels: list[str] | None = None) -> dict[str, Any]:
    """The `config.json` of the equivalent `BitForImageClassification`."""
    return {
        "architectures": ["BitForImageClassification"],
        "model_type": "bit",
        "num_channels": config.channels,
        "embedding_size": config.stem_width,
        "hidden_sizes": list(config.stage_widths),
        "depths": list(config.stage_blocks),
        "num_groups": config.groups,
        "width_factor": 1,  # the widths above are the model's own
        **_FIXED,
        "drop_path_rate": 0.0,
        **label_fields(labels, config.num_classes),
    }


def export_hf_bit(model: ResNetV2, directory: Path, *, labels: list[str] | None = None) -> Path:
    """Write a folder that `transformers.BitForImageClassification.from_pretrained` loads (its
    BitImageProcessor resizes to the model's size without a centre crop)."""
    check_labels(labels, model.config.num_classes)
    config = model.config
    preprocessor = image_processor_dict(
        config, "BitImageProcessor", do_center_crop=False, do_convert_rgb=config.channels == 3
    )
    return write_hf_folder(
        directory, to_hf_bit_state_dict(model), hf_bit_config_dict(config, labels), preprocessor
    )


def read_hf_bit_checkpoint(directory: Path) -> Checkpoint:
    """Read an HF BiT folder (as `save_pretrained` writes it) into vitpipe's naming."""
    hf_config, preprocessor, state, source = read_hf_folder(directory)
    config = bit_config_from_hf(hf_config, state, preprocessor, source)
    weights = from_hf_bit_state_dict(state, config, source)
    return Checkpoint(config, weights, hf_labels(hf_config, config.num_classes), source)
