"""The transfer results' chart: every mode named in a legend that covers none of the bars."""

from __future__ import annotations

import pytest

import pipeline.transfer.report
from pipeline.transfer.report import plot_results
from tests.test_pretrain_records import kept_figures, legend_boxes

MODES = ["pretrained", "scratch"]


def results_for(targets: list[str]) -> list[dict]:
    """Every (target, mode) near the top of the axis, where a legend inside it would sit on the bars."""
    fewshot = {"10": {"mean": 0.97, "std": 0.01}}
    return [{"target": t, "mode": m, "top1": 0.98, "fewshot": fewshot} for t in targets for m in MODES]


@pytest.mark.parametrize("targets", [["digits"], ["cifar10", "digits", "pets"]], ids=["one", "three"])
@pytest.mark.parametrize("shots", [[], [1, 10]], ids=["fine-tune-only", "with-few-shot"])
def test_results_chart_names_every_mode_in_a_legend_off_the_bars(tmp_path, monkeypatch, targets, shots):
    figures = kept_figures(monkeypatch, pipeline.transfer.report)
    document = {"results": results_for(targets), "evaluate": {"shots": shots} if shots else None}
    plot_results(document, tmp_path / "results.png")
    (figure,) = figures
    ((names, _),) = legend_boxes(figure)  # one legend, on no panel's bars
    assert sorted(names) == sorted(MODES)
