"""The learning-rate sweep's choice (`sweep.py`): the rate of best validation top-1 is reported, never the
test split's best; a tie goes to the lowest rate; a choice at an edge of the grid grows the grid one step
beyond that edge (`finetune.lr_extend`) and chooses again. Pure unit tests, then the extension through
`transfer` on digits with Ray (a tiny ViT fine-tuned from scratch, 100 steps a rate)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.config import FinetuneConfig
from pipeline.metrics import read_records
from pipeline.transfer.launch import transfer
from pipeline.transfer.plan import TargetPlan, TransferPlan, TransferTask, finetune_recipe, plan_transfer
from pipeline.transfer.report import markdown_table, results_document
from pipeline.transfer.reuse import run_key
from pipeline.transfer.sweep import (
    choose,
    edge_of,
    member_folder,
    next_rate,
    reachable_rates,
    with_grid,
)
from tests.test_transfer_reuse import SECTION, TINY, written
from vit.model import VisionTransformer
from vit.patches import PatchGeometry
from vit.weights import save_pretrained


def member(lr: float, val_top1: float | None, top1: float = 0.5, **more: Any) -> dict[str, Any]:
    """A finished member's result as a task returns it (the fields the choice and the table read)."""
    return {
        "target": "digits",
        "mode": "scratch",
        "lr": lr,
        "val_top1": val_top1,
        "top1": top1,
        "top5": 0.9,
        "best_step": 10,
        "steps": 10,
        "seconds": 1.0,
        "val_samples": 100,
        "val_classes": 10,
        "weights": f"out/digits/scratch/lr-{lr:g}/model",
        **more,
    }


def test_the_validation_best_rate_is_chosen_and_its_test_top1_reported_never_the_test_best():
    # The test split ranks the rates opposite to validation.
    members = [member(0.001, 0.9, top1=0.5), member(0.01, 0.8, top1=0.7), member(0.1, 0.7, top1=0.9)]
    result = choose(members)
    assert (result["lr"], result["top1"], result["weights"]) == (0.001, 0.5, members[0]["weights"])
    assert result["lr_chosen_by"] == "val_top1"
    assert result["lr_choice_warning"] is None
    assert [(entry["lr"], entry["val_top1"]) for entry in result["lr_sweep"]] == [
        (0.001, 0.9),
        (0.01, 0.8),
        (0.1, 0.7),
    ]
    assert all("top1" not in entry for entry in result["lr_sweep"])  # nothing to choose by from test


def test_a_tie_on_validation_goes_to_the_lowest_tied_rate_and_says_so():
    members = [member(1.0, 0.6), member(0.1, 0.8, top1=0.9), member(0.01, 0.8, top1=0.4), member(0.001, 0.5)]
    result = choose(members)
    assert (result["lr"], result["top1"]) == (0.01, 0.4)
    assert result["lr_chosen_by"] == "tie: val_top1 80.0% at lr 0.01, 0.1; the lowest of them"
    assert result["lr_choice_warning"] is None  # other rates scored lower: the split tells rates apart


def test_a_tie_at_every_rate_takes_the_lowest_warns_and_is_no_edge_choice():
    members = [member(0.03, 0.7), member(0.003, 0.7), member(0.01, 0.7)]
    result = choose(members)
    assert result["lr"] == 0.003
    assert result["lr_chosen_by"] == "tie: val_top1 70.0% at every rate; the lowest rate"
    assert "every rate scored the same on the validation split" in result["lr_choice_warning"]
    assert edge_of(result, [0.003, 0.01, 0.03]) is None
    # Two rates, tied: both are edges and neither is shown better; no direction to extend in.
    assert edge_of(choose([member(0.01, 0.7), member(0.03, 0.7)]), [0.01, 0.03]) is None


@pytest.mark.parametrize(
    ("rates", "edge", "expected"),
    [
        ([0.01, 0.03], "high", 0.09),
        ([0.01, 0.03], "low", 0.00333),  # 0.01 / 3, at 3 significant digits
        ([0.001, 0.003, 0.01, 0.03], "high", 0.09),  # the paper's grid: its top ratio is 3
        ([0.001, 0.003, 0.01, 0.03], "low", 0.000333),
        ([0.01, 0.001, 0.002], "low", 0.0005),  # uneven (and unsorted): 2 at the bottom ...
        ([0.01, 0.001, 0.002], "high", 0.05),  # ... 5 at the top
        ([0.001, 0.007], "high", 0.049),
        ([1.0, 1.001], "high", 1.002),  # 3 digits (1.00) would not step past 1.001: 4 are kept
    ],
)
def test_next_rate_steps_past_the_edge_by_the_grids_own_ratio_there(rates, edge, expected):
    added = next_rate(rates, edge)
    assert added == expected
    assert member_folder("group", added) == f"group/lr-{expected:g}"


def test_reachable_rates_are_the_extension_chains_beyond_either_edge():
    assert reachable_rates([0.01, 0.03], 2) == [0.00333, 0.00111, 0.09, 0.27]
    assert reachable_rates([0.01, 0.03], 0) == []
    grid = [0.001, 0.002, 0.01]
    for _ in range(3):  # what the launcher adds, one step at a time, at the top
        grid = sorted([*grid, next_rate(grid, "high")])
    assert reachable_rates([0.001, 0.002, 0.01], 3)[3:] == grid[3:]


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ({0.001: 0.5, 0.01: 0.6, 0.1: 0.7}, "high"),
        ({0.001: 0.7, 0.01: 0.6, 0.1: 0.5}, "low"),
        ({0.001: 0.5, 0.01: 0.7, 0.1: 0.6}, None),
        ({0.001: 0.7, 0.01: 0.7, 0.1: 0.5}, None),  # the bottom ties an inner rate: a tie-break, no edge
        ({0.001: 0.5, 0.01: 0.7, 0.1: 0.7}, None),  # the top ties an inner rate (the inner one is chosen)
        ({0.001: 0.5, 0.01: 0.7}, None),  # the top rate of the grid failed: 0.01 is inside the grid
        ({0.1: 0.7}, None),  # one member scored: nothing to compare it with
    ],
)
def test_edge_of_is_the_grid_edge_whose_rate_alone_scored_best(scores, expected):
    choice = choose([member(lr, score) for lr, score in scores.items()])
    assert edge_of(choice, [0.001, 0.01, 0.1]) == expected


def test_with_grid_records_the_grid_its_extensions_and_marks_the_added_rate():
    members = [member(0.01, 0.5), member(0.03, 0.8), member(0.09, 0.7)]
    extended = [{"edge": "high", "from": 0.03, "added": 0.09}]
    result = with_grid(choose(members), [0.01, 0.03, 0.09], extended, extend=1)
    assert result["lr"] == 0.03
    assert (result["lr_grid"], result["lr_extended"], result["lr_at_edge"]) == (
        [0.01, 0.03, 0.09],
        extended,
        None,
    )
    assert [(entry["lr"], entry["extension"]) for entry in result["lr_sweep"]] == [
        (0.01, False),
        (0.03, False),
        (0.09, True),
    ]


def test_a_choice_still_at_an_edge_is_noted_with_the_way_to_extend_the_grid():
    unextended = with_grid(choose([member(0.01, 0.5), member(0.03, 0.8)]), [0.01, 0.03], [], extend=0)
    assert (unextended["lr_grid"], unextended["lr_extended"]) == ([0.01, 0.03], [])
    assert (
        "lr 0.03 scored best on the validation split and is the highest rate of the grid [0.01, 0.03]"
        in (unextended["lr_at_edge"])
    )
    assert "set finetune.lr_extend" in unextended["lr_at_edge"]
    extended = [{"edge": "low", "from": 0.01, "added": 0.00333}]
    members = [member(0.00333, 0.9), member(0.01, 0.8), member(0.03, 0.5)]
    exhausted = with_grid(choose(members), [0.00333, 0.01, 0.03], extended, extend=1)
    assert (
        "lowest rate of the grid [0.00333, 0.01, 0.03] after 1 extension(s) (finetune.lr_extend 1)"
        in (exhausted["lr_at_edge"])
    )
    assert "raise finetune.lr_extend" in exhausted["lr_at_edge"]


@pytest.mark.parametrize(("rates", "edge"), [([1e200, 1e300], "high"), ([1e-300, 1e-200], "low")])
def test_a_rate_beyond_an_edge_that_is_no_number_is_refused_naming_lr_extend(rates, edge):
    with pytest.raises(ValueError, match=r"finetune.lr_extend: no learning rate one step beyond the"):
        next_rate(rates, edge)


def test_an_extension_that_failed_leaves_the_choice_at_the_edge_noted_with_the_failed_rate():
    extended = [{"edge": "high", "from": 0.03, "added": 0.09}]
    members = [member(0.01, 0.5), member(0.03, 0.8)]  # the task at 0.09 failed: no result
    result = with_grid(choose(members), [0.01, 0.03, 0.09], extended, extend=1)
    assert (result["lr"], result["lr_grid"], result["lr_failed"]) == (0.03, [0.01, 0.03, 0.09], [0.09])
    assert "is the highest rate of the grid [0.01, 0.03] after 1 extension(s)" in result["lr_at_edge"]
    assert "lr 0.09 failed" in result["lr_at_edge"]


def test_the_sweep_table_marks_added_rates_and_notes_a_choice_at_an_edge():
    extended = [{"edge": "high", "from": 0.03, "added": 0.09}]
    members = [member(0.01, 0.5), member(0.03, 0.7), member(0.09, 0.8)]
    result = with_grid(choose(members), [0.01, 0.03, 0.09], extended, extend=1)
    table = markdown_table(results_document([result], [], {"evaluate": None}))
    assert "| target | mode | lr 0.01 | lr 0.03 | lr 0.09 (added) |" in table
    assert "| digits | scratch | 50.0 | 70.0 | **80.0** |" in table
    assert f"- digits / scratch: warning: {result['lr_at_edge']}" in table


def test_lr_extend_with_a_single_rate_is_refused_naming_the_field():
    with pytest.raises(
        ValidationError, match=r"lr_extend 1 steps past an edge of lr_sweep .* \[0.03\] has one"
    ):
        FinetuneConfig(targets=["d"], optimizer={"lr": 0.03}, lr_extend=1)
    section = FinetuneConfig(targets=["d"], lr_sweep=[0.01, 0.03], lr_extend=2)
    assert section.at_rate(0.09).lr_extend == 0  # a member fine-tunes at its one rate


def fake_plan(section: FinetuneConfig) -> TransferPlan:
    """A plan of digits from scratch at every rate of `section`, its target described, not read."""
    target = TargetPlan(
        "digits", "/data/digits", PatchGeometry(32, 4, 3), [str(d) for d in range(10)], 100, 50
    )
    tasks = [
        TransferTask(
            target, "scratch", TINY, lr, section.at_rate(lr), finetune_recipe(section.at_rate(lr), 32)
        )
        for lr in section.lr_sweep
    ]
    return TransferPlan(tasks, [], section, None, {"digits": "/data/digits"}, "/out", None, True)


def test_an_added_rate_is_the_same_run_as_the_sweep_listing_that_rate():
    def key(task: TransferTask) -> str:
        return run_key(task, None, None, "manifest")

    extending = fake_plan(FinetuneConfig(targets=["d"], lr_sweep=[0.01, 0.03], lr_extend=2))
    listing = fake_plan(FinetuneConfig(targets=["d"], lr_sweep=[0.01, 0.03, 0.09]))
    assert key(extending.task_at("digits", "scratch", 0.09)) == key(listing.tasks[2])
    assert [key(task) for task in extending.tasks] == [key(task) for task in listing.tasks[:2]]
    # No part of a member's key even in a section that carries it: a run trained before it existed stays.
    carrying = dataclasses.replace(
        listing.tasks[0], finetune=listing.tasks[0].finetune.model_copy(update={"lr_extend": 2})
    )
    assert key(carrying) == key(listing.tasks[0])


# --- through `transfer`, with Ray ---------------------------------------------------------------------

# Measured: val top-1 0.183 at lr 0.003, 0.394 at 0.03, 0.268 at 0.3: the choice lands at the grid's top.
EXTENDING = {
    **SECTION,
    "modes": ["scratch"],
    "steps": 100,
    "schedule": {"warmup_steps": 5},
    "lr_sweep": [0.003, 0.03],
    "lr_extend": 1,
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_pretrained(VisionTransformer(TINY), tmp_path_factory.mktemp("weights") / "tiny")


def fine_tune(weights: Path, digits: str, out: Path, **changes: Any) -> dict[str, Any]:
    """One command's only result (digits from scratch), keeping what an earlier one trained."""
    section = FinetuneConfig(**{**EXTENDING, **changes})
    plan = plan_transfer(section, None, {"digits": digits}, out=str(out), weights=str(weights))
    return transfer(plan, reuse=True).document["results"][0]


@pytest.fixture(scope="module")
def extended(ray_local, weights, digits_patches, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("extended") / "out"
    return out, fine_tune(weights, digits_patches, out)


def test_a_choice_at_the_top_of_the_grid_adds_one_rate_above_it_in_its_own_folder(extended):
    out, result = extended
    group = out / "digits" / "scratch"
    assert result["lr_extended"] == [{"edge": "high", "from": 0.03, "added": 0.3}]
    assert result["lr_grid"] == [0.003, 0.03, 0.3]
    assert [(entry["lr"], entry["extension"]) for entry in result["lr_sweep"]] == [
        (0.003, False),
        (0.03, False),
        (0.3, True),
    ]
    assert sorted(path.name for path in group.glob("lr-*")) == ["lr-0.003", "lr-0.03", "lr-0.3"]
    added = json.loads((group / "lr-0.3" / "result.json").read_text())
    assert added["lr"] == 0.3
    assert max(r["lr"] for r in read_records(str(group / "lr-0.3")) if "lr" in r) == pytest.approx(
        0.3, rel=0.05
    )
    scores = {entry["lr"]: entry["val_top1"] for entry in result["lr_sweep"]}
    assert scores[0.03] > max(scores[0.003], scores[0.3])  # the top of the first grid, inside the grown one
    assert (result["lr"], result["lr_at_edge"]) == (0.03, None)
    assert json.loads((group / "result.json").read_text()) == result
    assert "lr 0.3 (added)" in (out / "results.md").read_text()


def test_a_rerun_trains_nothing_and_a_sweep_listing_the_added_rate_keeps_it(
    extended, weights, digits_patches
):
    out, first = extended
    group = out / "digits" / "scratch"
    before = written(group)
    again = fine_tune(weights, digits_patches, out)
    assert written(group) == before  # no member rewritten or started again
    assert [entry["reused"] for entry in again["lr_sweep"]] == [True, True, True]
    assert (again["lr"], again["lr_extended"], again["top1"]) == (
        first["lr"],
        first["lr_extended"],
        first["top1"],
    )

    listed = fine_tune(weights, digits_patches, out, lr_sweep=[0.003, 0.03, 0.3], lr_extend=0)
    assert written(group) == before
    assert [(entry["reused"], entry["extension"]) for entry in listed["lr_sweep"]] == [(True, False)] * 3
    assert (listed["lr"], listed["lr_extended"]) == (first["lr"], [])


def test_a_kept_rate_an_extension_no_longer_reaches_is_removed(extended, weights, digits_patches):
    """A rate below the grid, trained by an earlier command, could be an extension's: it is kept while
    the grid is extended, and removed when the choice stays inside (not this command's run)."""
    out, _ = extended
    group = out / "digits" / "scratch"
    fine_tune(weights, digits_patches, out, lr_sweep=[0.0003, 0.003, 0.03, 0.3], lr_extend=0)
    assert (group / "lr-0.0003" / "result.json").is_file()
    before = written(group)
    result = fine_tune(weights, digits_patches, out, lr_sweep=[0.003, 0.03, 0.3], lr_extend=1)
    assert (result["lr"], result["lr_extended"]) == (0.03, [])  # inside: 0.0003 (or 3) is not reached
    assert not (group / "lr-0.0003").exists()
    assert written(group) == {lr: before[lr] for lr in (0.003, 0.03, 0.3)}
