"""The paper's fine-tuning protocol: every (target, mode) is fine-tuned at each rate of `lr_sweep`, each
rate its own Ray task in its own folder (`OUT/TARGET/MODE/lr-0.003/`), and the rate whose run scored best
on the validation split carved from the target's training data is the one reported: its test accuracy,
its weights. The test split plays no part in the choice. `OUT/TARGET/MODE/result.json` is the chosen
member's result with the whole sweep recorded beside it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipeline.storage import join, write_atomic
from pipeline.transfer.task import RESULT_FILE  # a task's in its member folder; a (target, mode)'s above

_MEMBER = re.compile(r"^lr-[0-9.e+-]+$")


def member_folder(group: str, lr: float) -> str:
    """Where the member fine-tuned at `lr` writes: `GROUP/lr-0.003`."""
    return join(group, f"lr-{lr:g}")


def is_member_folder(name: str) -> bool:
    return bool(_MEMBER.match(name))


def choose(members: list[dict[str, Any]], reused: set[float] | None = None) -> dict[str, Any]:
    """The (target, mode)'s result: the member of best validation top-1 (on a tie, the lowest rate), with the
    sweep (each rate's validation score and best step, and whether it was `reused` from an earlier command),
    how the rate was chosen, a warning when the validation split could not tell the rates apart, and the
    probe's few-shot table (run once, by the lowest rate's task: it reads the starting weights, which no
    rate changes)."""
    ordered = sorted(members, key=lambda r: r["lr"])
    chosen = max(ordered, key=lambda r: -1.0 if r.get("val_top1") is None else r["val_top1"])
    fewshot = next((r["fewshot"] for r in ordered if r.get("fewshot") is not None), None)
    sweep = [
        {
            "lr": r["lr"],
            "val_top1": r.get("val_top1"),
            "best_step": r.get("best_step"),
            "seconds": r.get("seconds"),
            "reused": r["lr"] in (reused or set()),
        }
        for r in ordered
    ]
    chosen_by = _chosen_by(ordered, chosen)
    return {
        **chosen,
        "fewshot": fewshot,
        "lr_sweep": sweep,
        "lr_chosen_by": chosen_by,
        "lr_choice_warning": _choice_warning(ordered, chosen, chosen_by),
        "seconds": sum(r.get("seconds") or 0.0 for r in ordered),
    }


def _tied(ordered: list[dict[str, Any]], chosen: dict[str, Any]) -> list[float]:
    return [r["lr"] for r in ordered if r.get("val_top1") == chosen.get("val_top1")]


def _chosen_by(ordered: list[dict[str, Any]], chosen: dict[str, Any]) -> str:
    """How the rate was chosen: by validation top-1, as the lowest of the rates it ties, or as the only
    (or, with no validation score, the lowest) rate."""
    if len(ordered) == 1:
        return "the only rate"
    if chosen.get("val_top1") is None:
        return "no validation score: the lowest rate"
    tied, score = _tied(ordered, chosen), f"{100 * chosen['val_top1']:.1f}%"
    if len(tied) == len(ordered):
        return f"tie: val_top1 {score} at every rate; the lowest rate"
    if len(tied) > 1:
        return f"tie: val_top1 {score} at lr {', '.join(f'{lr:g}' for lr in tied)}; the lowest of them"
    return "val_top1"


def _choice_warning(ordered: list[dict[str, Any]], chosen: dict[str, Any], chosen_by: str) -> str | None:
    """Why the chosen rate may not be the best one: a validation split too small to tell rates apart
    (none, one image, one class), or one on which every rate scored the same."""
    if len(ordered) == 1:
        return None
    images, classes = chosen.get("val_samples") or 0, chosen.get("val_classes")
    held = f"{images} image(s)" + (f" of {classes} class(es)" if classes is not None else "")
    if images < 2 or (classes == 1 and len(chosen.get("per_class") or ()) != 1):
        return (
            f"the validation split holds {held}, too few to tell the rates apart; lr {chosen['lr']:g} "
            f"is chosen by {chosen_by}. Give each class more training images, or fine-tune at one rate"
        )
    if len(_tied(ordered, chosen)) == len(ordered):
        return (
            f"every rate scored the same on the validation split ({held}); lr {chosen['lr']:g} is the "
            "lowest, not shown to be the best"
        )
    return None


def write_group_result(group: str, result: dict[str, Any]) -> None:
    write_atomic(join(group, RESULT_FILE), json.dumps(result, indent=2) + "\n")
