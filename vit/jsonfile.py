"""JSON objects read from files, a damaged one a ValueError naming the file: the one reader of a model
folder's JSON files (`vit.files`, `vit.hf`) and of the pipeline's results. No torch, so that a reader of
results (the run's report) does not import it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; anything else is a ValueError naming the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
