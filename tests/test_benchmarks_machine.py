"""The benchmarks' side-by-side comparison: modes alternate within each round, so a machine that drifts
(a warm cache, a noisy neighbour) weighs on every mode alike."""

from __future__ import annotations

from benchmarks.machine import alternate


def test_a_comparison_runs_every_mode_once_a_round_in_turn_and_keeps_each_modes_outcomes(capsys):
    calls: list[tuple[str, str]] = []

    def run(mode: str, name: str) -> dict[str, int]:
        calls.append((mode, name))
        return {"call": len(calls)}

    outcomes = alternate(["off", "on"], 2, run, "x-")
    assert calls == [("off", "x-off-0"), ("on", "x-on-0"), ("off", "x-off-1"), ("on", "x-on-1")]
    assert outcomes == {"off": [{"call": 1}, {"call": 3}], "on": [{"call": 2}, {"call": 4}]}
    assert 'x-on-1: {"call": 4}' in capsys.readouterr().out
