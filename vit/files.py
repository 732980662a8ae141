"""A saved model folder on disk, without pickle: safetensors weights and JSON files, written whole.

Shared by vitpipe's own folders (`vit.weights`) and HF transformers folders (`vit.hf`), which is why it
is its own module: both import it, neither imports the other's reader.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vit.config import CONFIG_FILE, Architecture
from vit.jsonfile import read_json

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """Weights read from disk in vitpipe's naming, with the config they were saved under."""

    config: Architecture
    state: dict[str, torch.Tensor]
    labels: list[str] | None
    source: str


def write_model_folder(
    directory: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], json_files: dict[str, Any]
) -> None:
    """Weights first, JSON files last, each under a temporary name renamed when complete: a folder
    whose config.json exists holds whole files, even if the writer was killed midway."""
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    partial = directory / f".{WEIGHTS_FILE}.partial"
    save_file(state, partial, metadata=metadata)
    os.replace(partial, directory / WEIGHTS_FILE)
    for name, content in json_files.items():
        partial = directory / f".{name}.partial"
        partial.write_text(json.dumps(content, indent=2) + "\n")
        os.replace(partial, directory / name)


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; not a saved vitpipe or HF ViT model")
    return read_json(path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
