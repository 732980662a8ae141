"""Conversion to and from HF transformers' ViT (`ViTForImageClassification`, `ViTModel`) without importing it.

HF checkpoints on disk use the Hub layout (`vit.encoder.layer.{i}.attention.attention.query`, ...), which
every transformers version reads; transformers 5 renames modules in memory (`vit.layers.{i}.attention.
q_proj`). Both are accepted here; exports are written in the Hub layout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch

from vit.config import CONFIG_FILE, DEFAULT_MEAN, DEFAULT_STD, Architecture, ViTConfig
from vit.files import (
    WEIGHTS_FILE,
    Checkpoint,
    read_config_json,
    read_safetensors,
    write_model_folder,
)
from vit.jsonfile import read_json
from vit.model import VisionTransformer

HF_DIR = "hf"  # where an export puts its HF transformers folder, beside vitpipe's own
PREPROCESSOR_FILE = "preprocessor_config.json"
SHARD_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"

# Per-layer parameter names: vitpipe's on the left, the HF Hub layout's on the right.
_LAYER_NAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP_NAMES = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "stem.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "pre_logits.0.weight": "pooler.dense.weight",
    "pre_logits.0.bias": "pooler.dense.bias",
}
_QKV = ("query", "key", "value")
_REQUIRED_HF_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
# transformers 5 in-memory module names -> Hub layout, within one encoder layer.
_MODULES_TO_HUB = {
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "attention.o_proj.": "attention.output.dense.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}
_MODULES_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_VIT_HUB_LAYER = re.compile(r"^vit\.encoder\.layer\.(\d+)\.(.*)$")


def _rename_layer_key(key: str, layer: re.Pattern[str], new_prefix: str, renames: dict[str, str]) -> str:
    """Rename a per-layer key between the two HF layouts; other keys pass through unchanged."""
    match = layer.match(key)
    if not match:
        return key
    index, rest = match.groups()
    for old, new in renames.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            break
    return f"{new_prefix}{index}.{rest}"


def _hub_name(key: str) -> str:
    """A key without the `vit.` prefix, in the Hub layout whichever layout it came in."""
    return _rename_layer_key(key, _MODULES_LAYER, "encoder.layer.", _MODULES_TO_HUB)


def _split_hub_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate the backbone (prefix `vit.` stripped, Hub names) from the classifier."""
    backbone, classifier = {}, {}
    for key, tensor in state.items():
        if key.startswith("classifier."):
            classifier[key] = tensor
        else:
            backbone[_hub_name(key.removeprefix("vit."))] = tensor
    return backbone, classifier


def _square(value: Any, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{source}: non-square {name} {value} is not supported")
        value = value[0]
    return int(value)


def config_from_hf(
    hf_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    preprocessor: dict[str, Any] | None,
    source: str,
) -> ViTConfig:
    """The ViTConfig equivalent to an HF ViT config (and its preprocessor's mean/std)."""
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(
            f"{source}: hidden_act {hf_config['hidden_act']!r} is not supported (ViT uses 'gelu')"
        )
    channels = int(hf_config.get("num_channels", 3))
    mean: tuple[float, ...] = (DEFAULT_MEAN,) * channels
    std: tuple[float, ...] = (DEFAULT_STD,) * channels
    if preprocessor and preprocessor.get("do_normalize", True):
        mean = tuple(preprocessor.get("image_mean", mean))
        std = tuple(preprocessor.get("image_std", std))
    missing = [key for key in _REQUIRED_HF_KEYS if key not in hf_config]
    if missing:
        raise ValueError(f"{source}: HF config lacks {missing}")
    backbone, classifier = _split_hub_state(state)
    representation_size = None
    if "pooler.dense.weight" in backbone:
        if hf_config.get("pooler_act", "tanh") != "tanh":
            raise ValueError(
                f"{source}: pooler_act {hf_config['pooler_act']!r} is not supported (expects 'tanh')"
            )
        representation_size = int(backbone["pooler.dense.weight"].shape[0])
    if "classifier.weight" in classifier:
        num_classes = int(classifier["classifier.weight"].shape[0])
    else:
        num_classes = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 2))
    return ViTConfig(
        image_size=_square(hf_config.get("image_size", 224), "image_size", source),
        patch_size=_square(hf_config.get("patch_size", 16), "patch_size", source),
        channels=channels,
        num_classes=num_classes,
        width=int(hf_config["hidden_size"]),
        depth=int(hf_config["num_hidden_layers"]),
        mlp_dim=int(hf_config["intermediate_size"]),
        heads=int(hf_config["num_attention_heads"]),
        pool="cls",
        representation_size=representation_size,
        dropout=float(hf_config.get("hidden_dropout_prob", 0.0)),
        attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.0)),
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        mean=mean,
        std=std,
    )


def from_hf_state_dict(
    state: dict[str, torch.Tensor], config: ViTConfig, source: str = "HF state"
) -> dict[str, torch.Tensor]:
    """HF ViT weights (Hub or transformers-5 names, with or without `vit.`) -> vitpipe's state dict."""
    backbone, classifier = _split_hub_state(state)
    taken: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in backbone:
            raise ValueError(f"{source}: HF weight {key!r} missing")
        taken.add(key)
        return backbone[key]

    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_NAMES.items():
        if theirs in backbone:
            out[ours] = take(theirs)
    conv = take("embeddings.patch_embeddings.projection.weight")  # [width, C, P, P]
    out["stem.proj.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)  # (row, col, channel)
    for i in range(config.depth):
        hub = f"encoder.layer.{i}."
        for ours, theirs in _LAYER_NAMES.items():
            for param in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{param}"] = take(f"{hub}{theirs}.{param}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [take(f"{hub}attention.attention.{n}.weight") for n in _QKV]
        )
        biases = [backbone.get(f"{hub}attention.attention.{n}.bias") for n in _QKV]
        taken.update(f"{hub}attention.attention.{n}.bias" for n in _QKV)
        # qkv_bias=False checkpoints have no Q/K/V biases: zeros are the same function.
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [b if b is not None else torch.zeros(config.width) for b in biases]
        )
    leftover = sorted(set(backbone) - taken)
    if leftover:
        raise ValueError(
            f"{source}: HF weights not understood: {leftover[:8]}{' ...' if len(leftover) > 8 else ''}"
        )
    if "classifier.weight" in classifier:
        out["head.weight"], out["head.bias"] = classifier["classifier.weight"], classifier["classifier.bias"]
    return {key: tensor.contiguous() for key, tensor in out.items()}


def to_hf_state_dict(
    model: VisionTransformer, layout: Literal["hub", "modules"] = "hub"
) -> dict[str, torch.Tensor]:
    """vitpipe weights -> `ViTForImageClassification` weights, in the Hub layout (files, any transformers
    version) or in transformers-5 module names (for `load_state_dict` on a live HF model)."""
    config = model.config
    if config.pool != "cls" or config.representation_size:
        raise ValueError(
            "HF ViTForImageClassification classifies the class token with no pre-logits layer; "
            "this model has "
            f"pool={config.pool!r}, representation_size={config.representation_size}"
        )
    state = {key: tensor.detach().cpu() for key, tensor in model.state_dict().items()}
    hub: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_NAMES.items():
        if ours in state:
            hub[theirs] = state[ours]
    p, c, w = config.patch_size, config.channels, config.width
    hub["embeddings.patch_embeddings.projection.weight"] = (
        state["stem.proj.weight"].reshape(w, p, p, c).permute(0, 3, 1, 2)
    )
    for i in range(config.depth):
        prefix = f"encoder.layer.{i}."
        for ours, theirs in _LAYER_NAMES.items():
            for param in ("weight", "bias"):
                hub[f"{prefix}{theirs}.{param}"] = state[f"blocks.{i}.{ours}.{param}"]
        for param in ("weight", "bias"):
            for name, part in zip(_QKV, state[f"blocks.{i}.attn.qkv.{param}"].split(w), strict=True):
                hub[f"{prefix}attention.attention.{name}.{param}"] = part
    out = {f"vit.{key}": tensor.contiguous() for key, tensor in hub.items()}
    out["classifier.weight"], out["classifier.bias"] = state["head.weight"], state["head.bias"]
    if layout == "modules":
        hub_to_modules = {hub: modules for modules, hub in _MODULES_TO_HUB.items()}
        out = {_rename_layer_key(k, _VIT_HUB_LAYER, "vit.layers.", hub_to_modules): t for k, t in out.items()}
    return out


def label_fields(labels: list[str] | None, num_classes: int) -> dict[str, dict]:
    """An HF config's `id2label` and `label2id` (HF's LABEL_i placeholders when the classes have no names)."""
    labels = labels or [f"LABEL_{i}" for i in range(num_classes)]
    return {
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def hf_config_dict(config: ViTConfig, labels: list[str] | None = None) -> dict[str, Any]:
    """The `config.json` of the equivalent `ViTForImageClassification`."""
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": config.width,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "initializer_range": 0.02,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": config.channels,
        "qkv_bias": True,
        "encoder_stride": config.patch_size,
        **label_fields(labels, config.num_classes),
    }


def image_processor_dict(config: Architecture, processor: str, **extra: Any) -> dict[str, Any]:
    """The `preprocessor_config.json` that makes HF's `processor` feed a model as vitpipe does: resized to
    the model's square size, scaled to [0, 1], normalised with its mean and std."""
    return {
        "image_processor_type": processor,
        "do_resize": True,
        "size": {"height": config.image_size, "width": config.image_size},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(config.mean),
        "image_std": list(config.std),
        **extra,
    }


def write_hf_folder(
    directory: Path, state: dict[str, torch.Tensor], hf_config: dict[str, Any], preprocessor: dict[str, Any]
) -> Path:
    """An HF transformers folder: the weights, `config.json` and `preprocessor_config.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    json_files = {PREPROCESSOR_FILE: preprocessor, CONFIG_FILE: hf_config}
    write_model_folder(directory, state, {"format": "pt"}, json_files)
    return directory


def check_labels(labels: list[str] | None, num_classes: int) -> None:
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for a model with {num_classes} classes")


def export_hf(model: VisionTransformer, directory: str | Path, *, labels: list[str] | None = None) -> Path:
    """Write a folder that `transformers.ViTForImageClassification.from_pretrained` loads."""
    check_labels(labels, model.config.num_classes)
    state = to_hf_state_dict(model, layout="hub")
    hf_config = hf_config_dict(model.config, labels)
    preprocessor = image_processor_dict(model.config, "ViTImageProcessor")
    return write_hf_folder(Path(directory), state, hf_config, preprocessor)


def read_hf_state(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """An HF folder's weights: one safetensors file, a sharded set, or (without pickle) pytorch_model.bin."""
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE), str(directory / WEIGHTS_FILE)
    if (directory / SHARD_INDEX_FILE).is_file():
        index = read_json(directory / SHARD_INDEX_FILE)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_safetensors(directory / shard))
        return state, str(directory / SHARD_INDEX_FILE)
    if (directory / PICKLE_WEIGHTS_FILE).is_file():
        path = directory / PICKLE_WEIGHTS_FILE
        try:
            return torch.load(path, map_location="cpu", weights_only=True), str(path)
        except Exception as error:
            raise ValueError(f"{path}: cannot be read with weights_only=True ({error})") from None
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE}, {SHARD_INDEX_FILE} or {PICKLE_WEIGHTS_FILE}")


def hf_labels(hf_config: dict[str, Any], num_classes: int) -> list[str] | None:
    """The class names of an HF config's id2label, or None where it has HF's placeholders."""
    id2label = hf_config.get("id2label") or {}
    labels = [id2label.get(str(i), id2label.get(i)) for i in range(num_classes)]
    if None in labels or labels == [f"LABEL_{i}" for i in range(num_classes)]:
        return None
    return [str(label) for label in labels]


def read_hf_folder(
    directory: Path,
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, torch.Tensor], str]:
    """An HF folder as saved: its config, its preprocessor config (None when absent), its weights and the
    file they came from."""
    hf_config = read_config_json(directory)
    preprocessor_path = directory / PREPROCESSOR_FILE
    preprocessor = read_json(preprocessor_path) if preprocessor_path.is_file() else None
    state, source = read_hf_state(directory)
    return hf_config, preprocessor, state, source


def read_hf_checkpoint(directory: str | Path) -> Checkpoint:
    """Read an HF ViT folder (as `save_pretrained` writes it) into vitpipe's naming."""
    hf_config, preprocessor, state, source = read_hf_folder(Path(directory))
    config = config_from_hf(hf_config, state, preprocessor, source)
    return Checkpoint(
        config, from_hf_state_dict(state, config, source), hf_labels(hf_config, config.num_classes), source
    )
