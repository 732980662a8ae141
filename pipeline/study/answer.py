"""The slide's answer, computed from a study's curves: for every target and metric, per model, the gain of
pretraining on the largest subset over the model's own random init and whether it exceeds the seeds'
spread (the two sample standard deviations added); the slope of accuracy per decade of pretraining images
(a least-squares line on log10 images); and, ViT against BiT, the gap at each size and whether the ViT
catches up (a crossover), else where the two lines would cross if their slopes held (an extrapolation,
said to be one). results.json, the report and benchmarks/results/scaling_study.json hold it.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

Curve = list[dict[str, Any]]


def gain_over_scratch(curve: Curve) -> dict[str, Any] | None:
    """The largest size's mean against the scratch level (size 0), and whether the gap beats the spread
    (None when either has one seed: no spread was measured)."""
    scratch = next((e for e in curve if e["size"] == 0), None)
    pretrained = [e for e in curve if e["size"] > 0]
    if scratch is None or not pretrained:
        return None
    largest = max(pretrained, key=lambda e: e["size"])
    gain = largest["mean"] - scratch["mean"]
    spread = largest["std"] + scratch["std"]
    measured = min(largest.get("seeds", 2), scratch.get("seeds", 2)) > 1
    return {
        "size": largest["size"],
        "pretrained": largest["mean"],
        "scratch": scratch["mean"],
        "gain": gain,
        "spread": spread,
        "above_spread": gain > spread if measured else None,
    }


def slope_per_decade(curve: Curve) -> float | None:
    """Accuracy gained per 10x pretraining images (least squares over the pretrained sizes)."""
    pretrained = [e for e in curve if e["size"] > 0]
    if len(pretrained) < 2:
        return None
    x = np.log10([e["size"] for e in pretrained])
    return float(np.polyfit(x, [e["mean"] for e in pretrained], 1)[0])


def crossover(vit: Curve, bit: Curve) -> dict[str, Any]:
    """ViT minus BiT at each pretrained size; the first size where the ViT is ahead after being behind,
    else the extrapolated crossing of the two least-squares lines (when the ViT's is steeper)."""
    vit_at = {e["size"]: e["mean"] for e in vit if e["size"] > 0}
    bit_at = {e["size"]: e["mean"] for e in bit if e["size"] > 0}
    sizes = sorted(set(vit_at) & set(bit_at))
    gaps = {size: vit_at[size] - bit_at[size] for size in sizes}
    caught = next((b for a, b in itertools.pairwise(sizes) if gaps[a] < 0 < gaps[b]), None)
    answer: dict[str, Any] = {
        "vit_minus_bit": {str(size): gap for size, gap in gaps.items()},
        "vit_ahead_at_every_size": bool(sizes) and all(g > 0 for g in gaps.values()),
        "crossover_at": caught,
    }
    if caught is None and len(sizes) >= 2 and not answer["vit_ahead_at_every_size"]:
        x = np.log10(sizes)
        a_vit, b_vit = np.polyfit(x, [vit_at[s] for s in sizes], 1)
        a_bit, b_bit = np.polyfit(x, [bit_at[s] for s in sizes], 1)
        crossing = float(10 ** ((b_bit - b_vit) / (a_vit - a_bit))) if a_vit > a_bit else None
        if crossing is not None and crossing > sizes[-1]:  # inside the sizes measured, the gaps say it
            answer["extrapolated_crossover_images"] = crossing
    return answer


def model_families(models: dict[str, Any]) -> dict[str, str]:
    """{name: family} of a study's models as its settings (results.json) hold them."""
    return {name: model.get("family", name) for name, model in models.items()}


def pairs(models: list[str], families: dict[str, str]) -> list[tuple[str, str]]:
    """Every (ViT, BiT) pair of the study's models, by their families (a model not named is taken to be
    of the family its name says: `vit`, `bit`)."""
    family = {model: families.get(model, model) for model in models}
    return [(v, b) for v in models if family[v] == "vit" for b in models if family[b] == "bit"]


def versus_key(vit: str, bit: str) -> str:
    """Where a pair's comparison sits beside the models' entries: `vit_vs_bit`."""
    return f"{vit}_vs_{bit}"


def answer(curves: dict[str, Any], families: dict[str, str] | None = None) -> dict[str, Any]:
    """{target: {metric: {per model: gain, slope; VIT_vs_BIT per pair}}} from the study's curves;
    `families` maps each model's name to its family (the study's models)."""
    out: dict[str, Any] = {}
    for target, metrics in curves.items():
        for metric, models in metrics.items():
            entry: dict[str, Any] = {
                model: {
                    "gain_over_scratch": gain_over_scratch(curve),
                    "slope_per_decade": slope_per_decade(curve),
                }
                for model, curve in models.items()
            }
            for vit, bit in pairs(sorted(models), families or {}):
                entry[versus_key(vit, bit)] = crossover(models[vit], models[bit])
            out.setdefault(target, {})[metric] = entry
    return out


def sentences(found: dict[str, Any]) -> list[str]:
    """The answer as lines a person reads: one per (target, metric)."""
    lines = []
    for target, metrics in found.items():
        for metric, entry in metrics.items():
            models = [name for name, value in entry.items() if "gain_over_scratch" in value]
            parts = [_model_part(name, entry[name]) for name in models if entry[name]["gain_over_scratch"]]
            for name, versus in entry.items():
                if "vit_minus_bit" in versus:
                    vit, bit = name.split("_vs_", 1)
                    parts.append(_versus_part(vit, bit, versus))
            if parts:
                lines.append(f"{target} {metric}: " + "; ".join(parts))
    return lines


def _model_part(model: str, found: dict[str, Any]) -> str:
    """`vit 54.0 vs scratch 44.7 (above the spread 9.4), +13.2 pts/decade`."""
    gain, slope = found["gain_over_scratch"], found["slope_per_decade"]
    if gain["above_spread"] is None:
        verdict = "one seed: no spread to beat"
    else:
        verdict = f"{'above' if gain['above_spread'] else 'NOT above'} the spread {100 * gain['spread']:.1f}"
    trend = f"{100 * slope:+.1f} pts/decade" if slope is not None else "one size: no slope"
    return (
        f"{model} {100 * gain['pretrained']:.1f} vs scratch {100 * gain['scratch']:.1f} ({verdict}), {trend}"
    )


def _versus_part(vit: str, bit: str, versus: dict[str, Any]) -> str:
    """Whether and where the ViT catches the BiT, in words."""
    if versus.get("crossover_at"):
        return f"{vit} catches {bit} at {versus['crossover_at']:,} images"
    if versus.get("vit_ahead_at_every_size"):
        return f"{vit} ahead of {bit} at every size"
    if "extrapolated_crossover_images" in versus:
        near = versus["extrapolated_crossover_images"]
        return f"{vit} behind {bit}; the lines would cross near {near:.3g} images (extrapolated)"
    if len(versus["vit_minus_bit"]) < 2:
        return f"{vit} and {bit} share fewer than 2 sizes: no trend to compare"
    return f"{vit} does not catch {bit}, and its line does not reach {bit}'s beyond the sizes measured"
