"""The paper's fine-tuning protocol: every (target, mode) is fine-tuned at each rate of `lr_sweep`, each
rate its own Ray task in its own folder (`OUT/TARGET/MODE/lr-0.003/`), and the rate whose run scored best
on the validation split carved from the target's training data is the one reported: its test accuracy,
its weights. The test split plays no part in the choice. `OUT/TARGET/MODE/result.json` is the chosen
member's result with the whole sweep recorded beside it.

A choice at the grid's lowest or highest rate does not bracket the optimum: with `lr_extend`, the grid
grows by one step beyond that edge (`next_rate`) and the rate is chosen again, up to `lr_extend` times.
An edge choice (`edge_of`) is one where the edge rate alone scored best: at the top, the tie rule (lowest
rate) already keeps an inner rate that ties the top; at the bottom it picks the edge whenever the edge
ties an inner rate, but that is a tie-break, not a sign that lower rates do better, and extending on it
would walk the grid down one tie at a time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

from pipeline.storage import join, write_atomic
from pipeline.transfer.task import RESULT_FILE  # a task's in its member folder; a (target, mode)'s above

_MEMBER = re.compile(r"^lr-[0-9.e+-]+$")
SIGNIFICANT = 3  # digits of an added rate: lr-0.09, not lr-0.09000000000000001
Edge = Literal["low", "high"]


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


def next_rate(rates: Sequence[float], edge: Edge) -> float:
    """The rate one step beyond `edge` of the grid `rates` (two or more), by the grid's own ratio at that
    edge ([0.01, 0.03]: 0.09 above, 0.00333 below), rounded to 3 significant digits (more only where 3
    would not step past the edge, in a grid of rates under 1% apart)."""
    grid = sorted(rates)
    exact = grid[0] * grid[0] / grid[1] if edge == "low" else grid[-1] * grid[-1] / grid[-2]
    rounded = (float(f"{exact:.{digits}g}") for digits in range(SIGNIFICANT, 18))
    past = (rate for rate in rounded if (rate < grid[0] if edge == "low" else rate > grid[-1]))
    rate = next(past, None)
    if rate is None or not math.isfinite(rate) or rate <= 0:
        shown = ", ".join(f"{r:g}" for r in grid)
        raise ValueError(
            f"finetune.lr_extend: no learning rate one step beyond the {edge} edge of lr_sweep [{shown}] "
            f"(it would be {exact:g}); lower lr_extend, or list the rates in lr_sweep"
        )
    return rate


def edge_of(choice: dict[str, Any], rates: Sequence[float]) -> Edge | None:
    """Which edge of the grid `rates` the choice (`choose`'s result) lies at, if any: the grid's lowest
    (highest) rate scored best on validation, alone, among two or more members scored. A tie with another
    rate is no edge choice (module docstring), nor is a choice without a validation score."""
    grid = sorted(rates)
    score = choice.get("val_top1")
    best = [entry["lr"] for entry in choice["lr_sweep"] if entry.get("val_top1") == score]
    if score is None or len(grid) < 2 or len(choice["lr_sweep"]) < 2 or len(best) > 1:
        return None
    return "low" if best == [grid[0]] else "high" if best == [grid[-1]] else None


def reachable_rates(rates: Sequence[float], extend: int) -> list[float]:
    """Every rate `extend` extensions of the grid `rates` could add, beyond either edge (a choice moves
    off the edge it was extended at, or stays there: it never crosses to the other)."""
    added = []
    for edge in ("low", "high"):
        grid = sorted(rates)
        for _ in range(extend):
            grid = sorted([*grid, next_rate(grid, edge)])
            added.append(grid[0] if edge == "low" else grid[-1])
    return added


def with_grid(
    result: dict[str, Any], grid: Sequence[float], extended: list[dict[str, Any]], extend: int
) -> dict[str, Any]:
    """The chosen result with the grid it was chosen from: the final `lr_grid`, the steps that grew it
    (`lr_extended`: edge, from, added), each sweep entry marked `extension` or not, and `lr_at_edge`, a
    note when the choice is still at an edge (so the best rate may lie beyond the grid)."""
    added = {step["added"] for step in extended}
    scored = sorted(entry["lr"] for entry in result["lr_sweep"])  # a failed member's rate tells nothing
    edge = edge_of(result, scored)
    failed = sorted(set(grid) - set(scored))
    return {
        **result,
        "lr_sweep": [{**entry, "extension": entry["lr"] in added} for entry in result["lr_sweep"]],
        "lr_grid": sorted(grid),
        "lr_extended": extended,
        "lr_failed": failed,
        "lr_at_edge": _at_edge(result["lr"], scored, edge, len(extended), extend, failed) if edge else None,
    }


def _at_edge(lr: float, grid: list[float], edge: Edge, steps: int, extend: int, failed: list[float]) -> str:
    side, way = ("lowest", "lower") if edge == "low" else ("highest", "higher")
    shown = ", ".join(f"{rate:g}" for rate in grid)
    done = f" after {steps} extension(s) (finetune.lr_extend {extend})" if steps else ""
    done += f"; lr {', '.join(f'{rate:g}' for rate in failed)} failed" if failed else ""
    remedy = "raise finetune.lr_extend" if extend else "set finetune.lr_extend (e.g. 1)"
    return (
        f"lr {lr:g} scored best on the validation split and is the {side} rate of the grid [{shown}]{done}: "
        f"a {way} rate may score better. To extend the grid past an edge choice, {remedy} (a rerun keeps "
        f"the rates already trained), or add {way} rates to lr_sweep"
    )


def write_group_result(group: str, result: dict[str, Any]) -> None:
    write_atomic(join(group, RESULT_FILE), json.dumps(result, indent=2) + "\n")
