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
    """The largest size's mean against the scratch level (size 0), and whether the gap beats the spread."""
    scratch = next((e for e in curve if e["size"] == 0), None)
    pretrained = [e for e in curve if e["size"] > 0]
    if scratch is None or not pretrained:
        return None
    largest = max(pretrained, key=lambda e: e["size"])
    gain = largest["mean"] - scratch["mean"]
    spread = largest["std"] + scratch["std"]
    return {
        "size": largest["size"],
        "pretrained": largest["mean"],
        "scratch": scratch["mean"],
        "gain": gain,
        "spread": spread,
        "above_spread": gain > spread,
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
    caught = next((b for a, b in itertools.pairwise(sizes) if gaps[a] < 0 <= gaps[b]), None)
    answer: dict[str, Any] = {
        "vit_minus_bit": {str(size): gap for size, gap in gaps.items()},
        "vit_ahead_at_every_size": bool(sizes) and all(g > 0 for g in gaps.values()),
        "crossover_at": caught,
    }
    if caught is None and len(sizes) >= 2 and not answer["vit_ahead_at_every_size"]:
        x = np.log10(sizes)
        a_vit, b_vit = np.polyfit(x, [vit_at[s] for s in sizes], 1)
        a_bit, b_bit = np.polyfit(x, [bit_at[s] for s in sizes], 1)
        if a_vit > a_bit:
            answer["extrapolated_crossover_images"] = float(10 ** ((b_bit - b_vit) / (a_vit - a_bit)))
    return answer


def answer(curves: dict[str, Any]) -> dict[str, Any]:
    """{target: {metric: {per model: gain, slope; vit_vs_bit}}} from the study's curves."""
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
            if {"vit", "bit"} <= set(models):
                entry["vit_vs_bit"] = crossover(models["vit"], models["bit"])
            out.setdefault(target, {})[metric] = entry
    return out


def sentences(found: dict[str, Any]) -> list[str]:
    """The answer as lines a person reads: one per (target, metric)."""
    lines = []
    for target, metrics in found.items():
        for metric, entry in metrics.items():
            parts = []
            for model in ("vit", "bit"):
                gain = (entry.get(model) or {}).get("gain_over_scratch")
                slope = (entry.get(model) or {}).get("slope_per_decade")
                if gain:
                    verdict = "above" if gain["above_spread"] else "NOT above"
                    parts.append(
                        f"{model} {100 * gain['pretrained']:.1f} vs scratch {100 * gain['scratch']:.1f} "
                        f"({verdict} the spread {100 * gain['spread']:.1f}), "
                        f"{100 * (slope or 0):+.1f} pts/decade"
                    )
            versus = entry.get("vit_vs_bit") or {}
            if versus.get("crossover_at"):
                parts.append(f"ViT catches BiT at {versus['crossover_at']:,} images")
            elif versus.get("vit_ahead_at_every_size"):
                parts.append("ViT ahead at every size")
            elif "extrapolated_crossover_images" in versus:
                near = versus["extrapolated_crossover_images"]
                parts.append(
                    f"no crossover here; the lines would cross near {near:.3g} images (extrapolated)"
                )
            elif versus:
                parts.append("no crossover, and the ViT's line is not steeper")
            lines.append(f"{target} {metric}: " + "; ".join(parts))
    return lines
