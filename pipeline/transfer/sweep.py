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


def choose(members: list[dict[str, Any]]) -> dict[str, Any]:
    """The (target, mode)'s result: the member of best validation top-1 (on a tie, the lower rate), with the
    sweep (each rate's validation score and best step) and the probe's few-shot table (run once, by the
    lowest rate's task: it reads the starting weights, which no rate changes)."""
    ordered = sorted(members, key=lambda r: r["lr"])
    chosen = max(ordered, key=lambda r: -1.0 if r.get("val_top1") is None else r["val_top1"])
    fewshot = next((r["fewshot"] for r in ordered if r.get("fewshot") is not None), None)
    sweep = [
        {
            "lr": r["lr"],
            "val_top1": r.get("val_top1"),
            "best_step": r.get("best_step"),
            "seconds": r.get("seconds"),
        }
        for r in ordered
    ]
    chosen_by = "val_top1" if len(ordered) > 1 else "the only rate"
    return {
        **chosen,
        "fewshot": fewshot,
        "lr_sweep": sweep,
        "lr_chosen_by": chosen_by,
        "seconds": sum(r.get("seconds") or 0.0 for r in ordered),
    }


def write_group_result(group: str, result: dict[str, Any]) -> None:
    write_atomic(join(group, RESULT_FILE), json.dumps(result, indent=2) + "\n")
