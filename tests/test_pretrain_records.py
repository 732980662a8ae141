"""A run's records without a training run: metrics JSONL + TensorBoard (local and object storage), the
progress line, the loss plot, and which checkpoints count as finished."""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import ray
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from tensorboardX.proto.event_pb2 import Event

import pipeline.metrics
from pipeline.metrics import (
    MetricsLog,
    ProgressLine,
    format_seconds,
    plot_loss,
    plot_probes,
    probe_line,
    probe_records,
    read_records,
)
from pipeline.pretrain.checkpoints import (
    META_FILE,
    Selection,
    checkpoint_dir_name,
    file_sizes,
    is_run_output,
    latest_checkpoint,
    list_checkpoints,
)
from pipeline.pretrain.control import TrainingStopped, start_control
from pipeline.pretrain.export import choose_checkpoint, export_checkpoint
from pipeline.pretrain.launch import _refuse_stopped_at_the_end, _refuse_unfinished
from pipeline.pretrain.probe_client import unprobed
from pipeline.storage import remove_entries
from vit.loop import LoopEnd


def step_record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "accuracy": 0.5, "lr": 1e-3, "images_per_s": 100.0, "mfu": None}


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    with closing(MetricsLog(str(tmp_path))) as log:
        log.event("started", step=0, workers=2)
        log.write(step_record(1, 2.5))
        log.write(step_record(2, 2.0))
    records = read_records(str(tmp_path))
    assert [r.get("event") for r in records] == ["started", None, None]
    assert records[2] == step_record(2, 2.0)
    scalars = tensorboard_scalars(next((tmp_path / "tensorboard").glob("events.out.tfevents.*")))
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert "train/mfu" not in scalars  # None is not a number to plot


def test_a_step_record_s_wall_time_is_kept_but_not_plotted(tmp_path):
    """Every pretraining step carries its `time` (the cost of a resize is read from it), and its group size;
    the time is no metric: TensorBoard (and the trackers, through NOT_METRICS) leave it out."""
    with closing(MetricsLog(str(tmp_path))) as log:
        log.write({**step_record(1, 2.5), "workers": 2, "time": 1796531644.0})
    assert read_records(str(tmp_path))[0]["time"] == 1796531644.0
    scalars = tensorboard_scalars(next((tmp_path / "tensorboard").glob("events.out.tfevents.*")))
    assert scalars["train/workers"] == [(1, 2.0)]
    assert "train/time" not in scalars


def probe_record(kind: str, step: int, score: float, best_step: int) -> dict:
    return {
        "probe": kind,
        "step": step,
        "images_seen": step * 32,
        "fewshot/digits/1shot": score / 2,
        "fewshot/digits/1shot_std": 0.01,
        "fewshot/digits/5shot": score,
        "fewshot/digits/5shot_std": 0.02,
        "score": score,
        "best_step": best_step,
        "best_score": score,
    }


def test_probe_records_are_their_own_section_in_tensorboard_and_a_figure_against_step(tmp_path):
    """Probe results keep their kind apart from training's numbers (`probe_ema/score`, not `train/score`);
    the figure draws each target's shot counts against step, and a step probed again after a resume is
    drawn once, with its last value; a failed probe's event is no result."""
    with closing(MetricsLog(str(tmp_path))) as log:
        log.write(step_record(10, 2.0))
        for kind in ("raw", "ema"):
            log.write(probe_record(kind, 10, 0.5, 10), section=f"probe_{kind}")
            log.write(probe_record(kind, 20, 0.7, 20), section=f"probe_{kind}")
        log.write(probe_record("raw", 20, 0.6, 10), section="probe_raw")  # a resumed run probed 20 again
        log.event("probe_failed", step=20, probe="raw", error="ValueError: NaN in head.weight")
    scalars = tensorboard_scalars(next((tmp_path / "tensorboard").glob("events.out.tfevents.*")))
    assert scalars["probe_ema/score"] == [(10, 0.5), (20, pytest.approx(0.7))]
    assert scalars["probe_raw/fewshot/digits/5shot"][-1] == (20, pytest.approx(0.6))
    assert "train/score" not in scalars
    records = read_records(str(tmp_path))
    assert [(r["probe"], r["step"], r["score"]) for r in probe_records(records)] == [
        ("ema", 10, 0.5),
        ("raw", 10, 0.5),
        ("ema", 20, 0.7),
        ("raw", 20, 0.6),
    ]
    assert probe_line(probe_records(records)[-1]) == (
        "probe raw @ step 20: score 0.600, best 0.600 @ step 10 (digits 1-shot 0.300, digits 5-shot 0.600)"
    )
    out = plot_probes(records, tmp_path / "probes.png")
    assert out is not None
    assert out.stat().st_size > 10_000
    assert plot_probes([step_record(10, 2.0)], tmp_path / "none.png") is None


def tensorboard_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a TensorBoard event file (TFRecord framing: length, its CRC, the event, its CRC)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    data, offset = path.read_bytes(), 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_on_object_storage_are_uploaded_and_appended_to_on_resume():
    run = f"memory://runs/{uuid.uuid4().hex}"
    with closing(MetricsLog(run)) as log:
        log.write(step_record(1, 2.5))
    with closing(MetricsLog(run)) as log:  # a resumed run: the same record continues
        log.event("resumed", step=1)
        log.write(step_record(2, 2.0))
    records = read_records(run)
    assert [r.get("step") for r in records] == [1, 1, 2]
    assert records[1]["event"] == "resumed"


def test_read_records_of_a_run_without_metrics_is_empty(tmp_path):
    assert read_records(str(tmp_path / "never-ran")) == []


def test_progress_line_reports_eta_from_the_steps_of_this_launch():
    progress = ProgressLine(total_steps=100, first_step=40)
    progress.started -= 60.0  # 60 s for the 10 steps since resuming at 40
    line = progress.line({**step_record(50, 1.23456), "mfu": 0.123})
    assert line.startswith(
        "pretrain: step 50/100 (50%) loss 1.2346 acc 0.500 lr 1.00e-03 100 img/s MFU 12.3%"
    )
    assert line.endswith("ETA 5m00s")
    assert [format_seconds(s) for s in (4.6, 12.4, 61, 3 * 3600 + 59)] == ["4.6s", "12s", "1m01s", "3h00m"]
    assert format_seconds(float("nan")) == "?"


def test_loss_plot_is_a_png(tmp_path):
    records = [step_record(s, 3.0 / s) for s in range(1, 40)] + [{"event": "resumed", "step": 20}]
    out = plot_loss(records, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def kept_figures(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[Figure]:
    """The figures `module`'s plots draw through the real `saved_figure`, laid out and saved as it leaves
    them (closing them detaches their canvas: `legend_boxes` gives them another)."""
    figures: list[Figure] = []
    real = module.saved_figure

    @contextmanager
    def keeping(out: Path, **subplots) -> Iterator[tuple[Figure, object]]:
        with real(out, **subplots) as (figure, axes):
            figures.append(figure)
            yield figure, axes

    monkeypatch.setattr(module, "saved_figure", keeping)
    return figures


def legend_boxes(figure: Figure) -> list[tuple[list[str], Bbox]]:
    """Each legend's entries and its box on the page, and the check that no legend covers any axes'
    data area or runs off the page."""
    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    legends = [axis.get_legend() for axis in figure.axes if axis.get_legend()] + figure.legends
    boxes = [
        ([t.get_text() for t in legend.get_texts()], legend.get_window_extent(renderer)) for legend in legends
    ]
    page = figure.get_window_extent(renderer)
    for names, box in boxes:
        assert Bbox.intersection(box, page).bounds == box.bounds, f"legend {names} runs off the page"
        for axis in figure.axes:
            overlap = Bbox.intersection(box, axis.get_window_extent(renderer))
            assert overlap is None or overlap.width * overlap.height == 0, f"legend {names} covers {axis}"
    return boxes


def test_loss_plot_names_every_line_in_a_legend_off_the_data(tmp_path, monkeypatch):
    figures = kept_figures(monkeypatch, pipeline.metrics)
    records = [step_record(s, 3.0 / s) for s in range(1, 40)]
    for resume in (12, 20):
        records.append({"event": "resumed", "step": resume})
    plot_loss(records, tmp_path / "loss.png")
    (figure,) = figures
    drawn = [line for axis in figure.axes for line in axis.get_lines()]
    assert len(drawn) == 5  # loss, accuracy, learning rate and the two resumes
    ((names, _),) = legend_boxes(figure)
    assert names == ["training loss", "training accuracy", "learning rate", "resumed from a checkpoint"]
    assert {line.get_label() for line in drawn} == set(names)  # one entry names both resumes

    figures.clear()
    plot_loss(records[:-2], tmp_path / "loss.png")  # no resume, no entry for one
    assert [names for names, _ in legend_boxes(figures[0])] == [names[:3]]


def make_checkpoint(run: Path, step: int, *, finished: bool = True) -> Path:
    """A checkpoint folder with two rank files, listed with their sizes in its vitpipe.json."""
    folder = run / checkpoint_dir_name(step)
    tag = folder / f"step{step:08d}"
    tag.mkdir(parents=True)
    for rank in range(2):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * (1000 + rank))
    if finished:
        meta = {"step": step, "tag": tag.name, "vit": {}, "files": file_sizes(folder)}
        (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def test_only_checkpoints_with_their_vitpipe_json_count(tmp_path):
    for step, finished in [(200, True), (400, True), (600, False)]:
        make_checkpoint(tmp_path, step, finished=finished)
    (tmp_path / "checkpoint_tmp_notes").mkdir()
    assert [info.step for info in list_checkpoints(str(tmp_path))] == [200, 400]
    assert latest_checkpoint(str(tmp_path)).step == 400
    assert choose_checkpoint(str(tmp_path), "200").path == str(tmp_path / "checkpoint_00000200")
    assert choose_checkpoint(str(tmp_path), "checkpoint_00000400").step == 400
    with pytest.raises(FileNotFoundError, match=r"checkpoint_00000600: cannot be exported: no vitpipe\.json"):
        choose_checkpoint(str(tmp_path), "600")
    with pytest.raises(FileNotFoundError, match="no checkpoint '800'; steps with a complete one: 200, 400"):
        choose_checkpoint(str(tmp_path), "800")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        choose_checkpoint(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda f: (f / "step00000400" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10),
         "rank_1_mp_rank_00_optim_states.pt is 10 bytes, vitpipe.json records 1,001 (truncated"),
        (lambda f: (f / "step00000400" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
         "step00000400/zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"),
        (lambda f: (f / META_FILE).write_text('{"step": 400, "tag": '), "vitpipe.json is damaged"),
        (lambda f: (f / META_FILE).write_bytes(b"\xff\xfe"), "vitpipe.json is damaged"),
    ],
)  # fmt: skip
def test_a_damaged_newest_checkpoint_is_skipped_naming_the_file_and_the_previous_one_used(
    tmp_path, capsys, damage, why
):
    make_checkpoint(tmp_path, 200)
    damage(make_checkpoint(tmp_path, 400))
    assert latest_checkpoint(str(tmp_path)).step == 200
    assert latest_checkpoint(str(tmp_path)).step == 200  # looked for again (preflight, resume, export)
    assert choose_checkpoint(str(tmp_path)).step == 200  # export falls back the same way
    err = capsys.readouterr().err
    assert err.count("skipping") == 1, err  # named once, not at every look
    assert f"skipping {tmp_path / 'checkpoint_00000400'}: " in err
    assert why in err
    assert "using step 200" in err
    with pytest.raises(FileNotFoundError, match="checkpoint_00000400: cannot be exported"):
        choose_checkpoint(str(tmp_path), "400")


def test_a_diverged_or_stopped_launch_ends_before_export_naming_the_step_and_the_last_good_checkpoint(
    tmp_path,
):
    make_checkpoint(tmp_path, 200)
    _refuse_unfinished(LoopEnd(300, "finished"), str(tmp_path))  # a finished launch goes on to export
    with pytest.raises(
        RuntimeError, match=r"diverged at step 213: loss nan.*last good checkpoint is step 200"
    ) as error:
        _refuse_unfinished(LoopEnd(213, "diverged", "loss nan"), str(tmp_path))
    assert "nothing was exported" in str(error.value)
    with pytest.raises(TrainingStopped, match="stopped at step 200"):
        _refuse_unfinished(LoopEnd(200, "stopped"), str(tmp_path))
    with pytest.raises(RuntimeError, match=r"kept\. No good checkpoint was kept before it\. Lower"):
        _refuse_unfinished(LoopEnd(7, "diverged", "loss nan"), str(tmp_path / "none"))


def test_a_forced_redo_removes_the_run_s_outputs_and_nothing_else(tmp_path):
    make_checkpoint(tmp_path, 200)
    for name in ("metrics.jsonl", "loss.png", "checkpoint_manager_snapshot.json", "job.yaml", "notes.txt"):
        (tmp_path / name).write_text("x")
    for folder in ("export", "export-00000100", "export-best-ema", "best", "tensorboard", "stages", "logs"):
        (tmp_path / folder).mkdir()
    left = remove_entries(str(tmp_path), is_run_output)
    assert left == ["job.yaml", "logs", "notes.txt", "stages"]
    assert sorted(p.name for p in tmp_path.iterdir()) == left


def test_the_best_step_is_exported_only_as_the_run_s_probes_scored_it(tmp_path):
    """`select: best` reads RUN/best/KIND: none there is said with the way on; one scored by other probes
    (other targets or shots, and none of the run's probes since) is refused, not exported as the best; a
    damaged best.json is named."""
    make_checkpoint(tmp_path, 200)
    with pytest.raises(FileNotFoundError, match=r"no raw weights were probed .*or export the last step"):
        export_checkpoint(str(tmp_path), selection=Selection("best"))
    (tmp_path / "best" / "raw").mkdir(parents=True)
    best = {"step": 100, "score": 0.5, "folder": "step-00000100", "probe_key": "old"}
    (tmp_path / "best" / "raw" / "best.json").write_text(json.dumps(best))
    with pytest.raises(ValueError, match=r"step 100 was the best of other probes .* train on"):
        export_checkpoint(str(tmp_path), selection=Selection("best"), probe_key="new")
    (tmp_path / "best" / "raw" / "best.json").write_text(json.dumps({**best, "step": "twenty"}))
    with pytest.raises(ValueError, match=r"best/raw/best.json: damaged \(step missing or not what"):
        export_checkpoint(str(tmp_path), selection=Selection("best"))
    with pytest.raises(ValueError, match="a checkpoint named and select best both choose the step"):
        export_checkpoint(str(tmp_path), "200", selection=Selection("best"))
    assert not list(tmp_path.glob("export*"))  # nothing written


def test_a_relaunch_probes_its_first_step_where_these_probes_have_no_result(tmp_path):
    """A stopped launch's probe lost with it, or a finished run relaunched with other probes (targets,
    shots): its first step is probed again, so the history and the best are these probes'."""
    records = [
        {**probe_record("raw", 40, 0.5, 40), "probe_key": "old"},
        {**probe_record("ema", 40, 0.5, 40), "probe_key": "new"},
        {"event": "probe_failed", "probe": "ema", "step": 60, "error": "x"},
    ]
    assert unprobed(records, 40, ["raw", "ema"], "new") == ["raw"]
    assert unprobed(records, 40, ["raw", "ema"], "old") == ["ema"]
    assert unprobed(records, 60, ["raw", "ema"], "new") == ["raw", "ema"]  # a failure is no result


def test_a_stop_asked_as_the_last_step_trained_stops_the_run_before_its_export(ray_local, tmp_path):
    """The loop ended "finished" but a stop was asked for meanwhile (no log step was left to stop at): the
    launch stops before its export and the stages after it, saying how to go on."""
    control = start_control()
    _refuse_stopped_at_the_end(LoopEnd(40, "finished"), control, str(tmp_path))  # no stop asked: goes on
    ray.get(control.request_stop.remote())
    with pytest.raises(TrainingStopped, match=r"stopped on request after its last step, 40 .* goes on"):
        _refuse_stopped_at_the_end(LoopEnd(40, "finished"), control, str(tmp_path))
