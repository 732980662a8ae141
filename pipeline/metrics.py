"""What every stage records and prints: `metrics.jsonl` + TensorBoard events (`MetricsLog`), console
progress lines for training steps (`ProgressLine`) and for counted work such as shards (`Progress`),
and the loss curve.

Records go straight into the run directory when it is on a local or shared filesystem; for object
storage (s3://, gs://) they are written in a local folder and copied up at every sync and at the end.
"""

from __future__ import annotations

import json
import math
import posixpath
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import pyarrow.fs as pafs

from pipeline import console
from pipeline.figures import saved_figure
from pipeline.storage import resolve
from pipeline.tracking import NOT_METRICS, StepLogger, TrackingTarget

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss.png"
PROBES_PLOT = "probes.png"
FEWSHOT_PREFIX = "fewshot/"  # a probe record's scores: fewshot/TARGET/Kshot (and ..._std)


class MetricsLog:
    """Appends one JSON object per logged step (and per event) and mirrors the numbers to TensorBoard."""

    def __init__(self, run_dir: str, tracking: TrackingTarget | None = None) -> None:
        from tensorboardX import SummaryWriter

        self.filesystem, self.root = resolve(run_dir)
        self.remote = not isinstance(self.filesystem, pafs.LocalFileSystem)
        self.local = Path(tempfile.mkdtemp(prefix="vitpipe-metrics-")) if self.remote else Path(self.root)
        self.local.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._download(METRICS_FILE)  # a resumed run appends to the record it left
        self._jsonl = (self.local / METRICS_FILE).open("a", buffering=1)
        self._board = SummaryWriter(str(self.local / TENSORBOARD_DIR), flush_secs=30)
        self._tracker = StepLogger(tracking) if tracking is not None and tracking.enabled else None

    def write(self, record: dict[str, Any], section: str = "train") -> None:
        """One step's metrics; every finite number also becomes a TensorBoard scalar at that step, named
        `SECTION/NAME`, and a tracked metric (named so outside the training section: `probe_raw/score`)."""
        self._jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        for name, value in record.items():
            if name not in NOT_METRICS and isinstance(value, int | float) and math.isfinite(value):
                self._board.add_scalar(f"{section}/{name}", value, step)
        if self._tracker is not None:
            named = (
                record
                if section == "train"
                else {
                    name if name in NOT_METRICS else f"{section}/{name}": value
                    for name, value in record.items()
                }
            )
            self._tracker.log(named)

    def event(self, name: str, **fields: Any) -> None:
        """A line that is not a step: start, resume, checkpoint, end."""
        self._jsonl.write(json.dumps({"event": name, "time": round(time.time(), 3), **fields}) + "\n")

    def sync(self) -> None:
        """Flush, and copy the files to the run directory when it is remote."""
        self._jsonl.flush()
        self._board.flush()
        if self._tracker is not None:
            self._tracker.flush()
        if self.remote:
            pafs.copy_files(
                str(self.local), self.root, destination_filesystem=self.filesystem, use_threads=False
            )

    def close(self) -> None:
        self.sync()
        self._jsonl.close()
        self._board.close()
        if self._tracker is not None:
            self._tracker.close()

    def _download(self, name: str) -> None:
        source = posixpath.join(self.root, name)
        if self.filesystem.get_file_info(source).type == pafs.FileType.File:
            pafs.copy_files(source, str(self.local / name), source_filesystem=self.filesystem)


class ProgressLine:
    """`pretrain: step 120/600 (20%) loss 1.234 acc 0.45 lr 1.0e-03 512 img/s MFU 12.3% ETA 3m10s`."""

    def __init__(self, total_steps: int, first_step: int, label: str = "pretrain") -> None:
        self.total, self.first, self.label = total_steps, first_step, label
        self.started = time.perf_counter()

    def line(self, record: dict[str, Any]) -> str:
        step = record["step"]
        done = step - self.first
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done else float("nan")
        mfu = f" MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
        val = f" val {record['val_top1']:.3f}" if record.get("val_top1") is not None else ""
        return (
            f"{self.label}: step {step}/{self.total} ({step / self.total:.0%}) loss {record['loss']:.4f} "
            f"acc {record['accuracy']:.3f}{val} lr {record['lr']:.2e} "
            f"{record['images_per_s']:,.0f} img/s{mfu} ETA {format_seconds(eta)}"
        )

    def report(self, record: dict[str, Any]) -> None:
        """The step's line as the console's progress (the live bar on a terminal)."""
        console.progress(self.line(record), record["step"], self.total)


class Progress:
    """Prints `label: 3/10 shards, 1,234 images, 456 images/s, ETA 12s` as work completes."""

    def __init__(
        self, label: str, total: int, unit: str = "shards", every_s: float = 5.0, stream: TextIO | None = None
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.items = 0
        self.nodes = 0  # the machines the work ran on, when the caller knows
        self.started = time.perf_counter()
        self._pacing = console.LinePacing(every_s)  # a line now and then, as the console paces them

    def update(self, done: int = 1, items: int = 0) -> None:
        """Count `done` finished units holding `items` samples; print if a line is due."""
        self.done += done
        self.items += items
        if console.Console.active is not None:  # it draws the bar and spaces the lines itself
            console.progress(self.line(), self.done, self.total)
            return
        if self._pacing.due(self.label, self.done, self.total):
            print(self.line(), file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def rate(self) -> float:
        """Samples per second so far."""
        return self.items / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        elapsed = self.elapsed
        text = f"{self.label}: {self.done}/{self.total} {self.unit}"
        if self.items:
            text += f", {self.items:,} images, {self.rate():,.0f} images/s"
        if 0 < self.done < self.total:
            text += f", ETA {format_seconds(elapsed / self.done * (self.total - self.done))}"
        elif self.done == self.total:
            text += f", done in {format_seconds(elapsed)}" + (
                f" on {self.nodes} node(s)" if self.nodes else ""
            )
        return text


def format_seconds(seconds: float) -> str:
    """`4.6s`, `1m01s`, `3h00m`: durations and ETAs in every console line and table."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def read_records(run_dir: str) -> list[dict[str, Any]]:
    """Every line of a run's metrics.jsonl (steps and events), in the order written."""
    filesystem, root = resolve(run_dir)
    path = posixpath.join(root, METRICS_FILE)
    try:
        with filesystem.open_input_stream(path) as stream:
            text = stream.read().decode()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line another process is writing now
            continue
    return records


def resizes(records: list[dict[str, Any]]) -> str:
    """`resized 2 -> 1 worker(s) at step 23, 1 -> 2 at step 60`: an elastic run's group sizes, from its
    metrics' `resized` events ('' when the group never changed size)."""
    changes = [r for r in records if r.get("event") == "resized"]
    if not changes:
        return ""
    parts = [
        f"{r['from_workers']} -> {r['workers']}{' worker(s)' if i == 0 else ''} at step {r['step']:,}"
        for i, r in enumerate(changes)
    ]
    return "resized " + ", ".join(parts)


def plot_loss(records: list[dict[str, Any]], out: Path) -> Path:
    """Training loss, accuracy and learning rate against step; a resumed run's redone steps show as
    the last value written for each step."""
    latest = {r["step"]: r for r in records if "step" in r and "loss" in r}
    steps = sorted(latest)
    layout = {
        "nrows": 2,
        "ncols": 1,
        "figsize": (7, 5),
        "sharex": True,
        "gridspec_kw": {"height_ratios": [3, 1]},
    }
    with saved_figure(out, **layout) as (figure, (loss_axis, lr_axis)):
        loss_axis.plot(steps, [latest[s]["loss"] for s in steps], color="tab:blue", label="training loss")
        loss_axis.set_ylabel("training loss")
        accuracy_axis = loss_axis.twinx()
        accuracy = [latest[s]["accuracy"] for s in steps]
        accuracy_axis.plot(steps, accuracy, color="tab:orange", label="training accuracy")
        accuracy_axis.set_ylabel("training accuracy")
        accuracy_axis.set_ylim(0, 1)
        lr_axis.plot(steps, [latest[s]["lr"] for s in steps], color="tab:green", label="learning rate")
        lr_axis.set_ylabel("lr")
        lr_axis.set_xlabel("step")
        resumes = [r["step"] for r in records if r.get("event") == "resumed"]
        for step in resumes:
            loss_axis.axvline(
                step, color="grey", linestyle=":", linewidth=1, label="resumed from a checkpoint"
            )
        figure.suptitle("pretraining")
        # Above the plots, under the title: inside, a legend covers the curve it names. Every line named,
        # the first resume for them all.
        loss, *resumed = loss_axis.get_lines()
        lines = [loss, *accuracy_axis.get_lines(), *lr_axis.get_lines(), *resumed[:1]]
        loss_axis.legend(
            handles=lines, loc="lower center", bbox_to_anchor=(0.5, 1.02), ncols=len(lines), fontsize="small"
        )
    return out


def probe_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The probes' results, the last written for each (kind, step) (a resumed run probes a step again);
    events about probes (a failure, a skip) are not results."""
    latest = {
        (r["probe"], r["step"]): r for r in records if "probe" in r and "step" in r and "event" not in r
    }
    return [latest[key] for key in sorted(latest, key=lambda key: (key[1], key[0]))]


def probe_series(record: dict[str, Any]) -> dict[tuple[str, int], float]:
    """{(target, shots): validation top-1} of one probe record."""
    series = {}
    for name, value in record.items():
        if name.startswith(FEWSHOT_PREFIX) and name.endswith("shot"):
            target, shots = name[len(FEWSHOT_PREFIX) :].rsplit("/", 1)
            series[target, int(shots[: -len("shot")])] = value
    return series


def probe_line(record: dict[str, Any]) -> str:
    """`probe raw @ step 400: score 0.812, best 0.830 @ step 300 (digits 5-shot 0.701, 10-shot 0.812)`:
    the console's and `vitpipe status`'s line of one probe."""
    series = probe_series(record)
    shown = ", ".join(
        f"{target} {shots}-shot {value:.3f}" for (target, shots), value in sorted(series.items())
    )
    text = f"probe {record['probe']} @ step {record['step']:,}: score {record.get('score', float('nan')):.3f}"
    if record.get("best_step") is not None:
        text += f", best {record.get('best_score', float('nan')):.3f} @ step {record['best_step']:,}"
    return text + (f" ({shown})" if shown else "")


def plot_probes(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Few-shot validation top-1 against pretraining step (images seen on the top axis), one panel per
    target, one colour per shot count, raw weights solid and EMA dashed; the best step of each kind is
    marked. None when the run has no probe records."""
    probes = probe_records(records)
    if not probes:
        return None
    targets = sorted({target for record in probes for target, _ in probe_series(record)})
    shots = sorted({count for record in probes for _, count in probe_series(record)})
    colours = {count: f"C{index}" for index, count in enumerate(shots)}
    layout = {"nrows": 1, "ncols": len(targets), "figsize": (4.5 * len(targets) + 1.5, 3.8), "squeeze": False}
    with saved_figure(out, **layout) as (figure, axes):
        for axis, target in zip(axes[0], targets, strict=True):
            _probe_panel(axis, probes, target, shots, colours)
        handles, labels = axes[0][0].get_legend_handles_labels()
        axes[0][-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
        figure.suptitle("few-shot linear probes on validation splits while pretraining")
    return out


def _probe_panel(
    axis: Any, probes: list[dict[str, Any]], target: str, shots: list[int], colours: dict[int, str]
) -> None:
    for kind, style in (("raw", "-"), ("ema", "--")):
        mine = [r for r in probes if r["probe"] == kind]
        for count in shots:
            points = [(r["step"], probe_series(r).get((target, count))) for r in mine]
            points = [(step, value) for step, value in points if value is not None]
            if points:
                steps, values = zip(*points, strict=True)
                label = f"{count}-shot" + (" EMA" if kind == "ema" else "")
                axis.plot(steps, values, style, marker=".", color=colours[count], label=label)
        best = [r for r in mine if r.get("best_step") is not None]
        if best:
            axis.axvline(
                best[-1]["best_step"], color="grey", linestyle=style, linewidth=1, label=f"best step ({kind})"
            )
    axis.set_title(target)
    axis.set_xlabel("pretraining step")
    axis.set_ylabel("validation top-1")
    axis.set_ylim(0, 1)
    per_step = next((r["images_seen"] / r["step"] for r in probes if r.get("images_seen") and r["step"]), 0)
    if per_step:
        top = axis.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda i: i / per_step))
        top.set_xlabel("images seen")
