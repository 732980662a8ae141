"""The model card (`README.md`, Hugging Face layout) of every export: YAML front matter (library, tags,
datasets, metrics, and a model-index once transfer results are known), then what the weights are, what
they were pretrained on and for how long, and how they transferred.

The facts are kept in the export's `export.json` (`card`), so the card is written again, with the
transfer results, once fine-tuning has run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"
RECIPE_KEYS = ("optimizer.", "schedule.", "global_batch_size", "label_smoothing", "mixup")


def card_facts(meta: dict[str, Any], architecture: Any, params: int, data: dict[str, Any] | None) -> dict:
    """What the card says of a checkpoint: architecture, size, pretraining data, steps, recipe."""
    defines = meta.get("defines") or {}
    return {
        "architecture": architecture.describe(),
        "family": architecture.family,
        "image_size": architecture.image_size,
        "patch_size": architecture.patch_size,
        "channels": architecture.channels,
        "classes": len(meta.get("classes") or []) or architecture.num_classes,
        "params": params,
        "step": meta.get("step"),
        "workers": meta.get("world_size"),
        "zero_stage": meta.get("zero_stage"),
        "data": data or {"images": defines.get("data.samples")},
        "recipe": {key: value for key, value in defines.items() if key.startswith(RECIPE_KEYS)},
    }


def model_card(facts: dict[str, Any], *, library: str, results: list[dict[str, Any]] | None = None) -> str:
    """The card's text for one export folder (`library`: "vitpipe" or "transformers")."""
    data = facts.get("data") or {}
    dataset = data.get("name") or "unnamed"
    tags = ["image-classification", "vision", facts["family"], "vitpipe"]
    front: dict[str, Any] = {
        "library_name": library,
        "pipeline_tag": "image-classification",
        "tags": tags,
        "datasets": [dataset],
        "metrics": ["accuracy"],
    }
    scored = [r for r in results or [] if r.get("top1") is not None]
    if scored:
        entries = [
            {
                "task": {"type": "image-classification"},
                "dataset": {"name": r["target"], "type": r["target"]},
                "metrics": [{"type": "accuracy", "value": round(float(r["top1"]), 4), "name": _top1_name(r)}],
            }
            for r in scored
        ]
        front["model-index"] = [
            {"name": f"{facts['architecture']} pretrained on {dataset}", "results": entries}
        ]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {facts['architecture']}, pretrained with vitpipe",
        "",
        f"- architecture: {facts['architecture']}, {facts['params']:,} parameters, {facts['image_size']} px "
        f"input, patch {facts['patch_size']}, {facts['channels']} channel(s), {facts['classes']}-class head",
        f"- pretraining data: {_data_line(data)}",
        f"- pretraining: {facts['step']:,} steps on {facts['workers']} worker(s), DeepSpeed ZeRO stage "
        f"{facts['zero_stage']}"
        if facts.get("step") is not None
        else "- pretraining: unknown",
    ]
    if facts.get("weights"):
        lines.append(f"- weights: {_weights_line(facts['weights'])}")
    if facts.get("recipe"):
        lines.append(
            "- recipe: " + ", ".join(f"{key} {value}" for key, value in sorted(facts["recipe"].items()))
        )
    lines += ["", "## Transfer", ""]
    if scored:
        lines += ["| target | mode | test top-1 (%) | top-5 (%) |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {r['target']} | {r['mode']} | {100 * r['top1']:.1f} | {100 * (r.get('top5') or 0):.1f} |"
            for r in scored
        ]
    else:
        lines.append("Not yet fine-tuned or evaluated: vitpipe writes the results here once it has.")
    lines += ["", "## Use", "", _usage(library), ""]
    return "\n".join(lines)


def _top1_name(result: dict[str, Any]) -> str:
    return f"{'fine-tuned' if result.get('steps') else 'evaluated'} top-1 ({result['mode']})"


def write_cards(
    staged: Path, facts: dict[str, Any], results: list[dict[str, Any]] | None = None
) -> list[str]:
    """README.md in each export folder under `staged` (vitpipe/, hf/) that exists; returns their names."""
    written = []
    for folder, library in (("vitpipe", "vitpipe"), ("hf", "transformers")):
        if (staged / folder).is_dir():
            (staged / folder / CARD_FILE).write_text(model_card(facts, library=library, results=results))
            written.append(f"{folder}/{CARD_FILE}")
    return written


def _weights_line(weights: dict[str, Any]) -> str:
    """`EMA (decay 0.9999) of step 400, the step the probes scored best (10-shot validation top-1 0.812,
    mean over digits)`, or `raw weights of the last step, 600`."""
    kind = "raw weights" if weights["kind"] == "raw" else f"EMA (decay {weights.get('decay')})"
    if weights.get("select") != "best":
        return f"{kind} of the last step, {weights['step']:,}"
    score = weights.get("score")
    shown = f"{score:.3f}" if isinstance(score, int | float) else "unknown"
    probed = f"{weights.get('metric')}: {shown}"
    return f"{kind} of step {weights['step']:,}, the step the probes scored best ({probed})"


def _data_line(data: dict[str, Any]) -> str:
    """`5,000 images of fractals ('train' split, 50 classes), from `DIR``; what is not known is left out
    (`vitpipe export` of a run knows the image count only)."""
    text = f"{data['images']:,} images" if data.get("images") else "images"
    if data.get("name"):
        text += f" of {data['name']}"
    if data.get("split"):
        text += f" ('{data['split']}' split" + (
            f", {data['classes']} classes)" if data.get("classes") else ")"
        )
    if data.get("directory"):
        text += f", from `{data['directory']}`"
    return text


def _usage(library: str) -> str:
    if library == "transformers":
        return "```python\nfrom transformers import ViTForImageClassification\n\nmodel = ViTForImageClassification.from_pretrained(FOLDER)\n```"  # noqa: E501
    return "```python\nfrom vit.weights import load_pretrained\n\nmodel = load_pretrained(FOLDER)  # or num_classes=N for a new head\n```"  # noqa: E501
