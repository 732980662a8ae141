"""A worker's checkpoints, saved without stalling training: each rank copies its DeepSpeed shards into host
memory while training waits (`vit.engine.stage_checkpoint`), then writes and uploads them in Ray Train's
upload thread (`ray.train.report`'s ASYNC mode) while training goes on.

A checkpoint is complete once every rank's record is in its folder: each rank uploads its data files
first and its record (`vitpipe.rank-KKKKK.json`: its files and sizes) last, so a rank killed or failing
mid-way leaves no record and the folder is skipped for the one before (`pipeline.pretrain.checkpoints`).
At most one save is in flight per rank; a stop, a notice and the end of the run wait for it.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train

from pipeline.metrics import MetricsLog
from pipeline.pretrain.checkpoints import (
    EMA_DIR,
    META_FILE,
    checkpoint_dir_name,
    file_sizes,
    rank_record,
    tag_of,
)
from vit.engine import StagedFile, stage_checkpoint, write_staged
from vit.fragments import Fragment, Fragments, save_fragments, stage_fragments
from vit.loop import Notice

UPLOAD_CHUNK = 64 * 1024 * 1024  # bytes per read/write of a copy (Ray Train's own uploads use the same)


class CheckpointWriteError(RuntimeError):
    """A rank's checkpoint could not be written or uploaded; its folder stays incomplete."""


class Saver:
    """A rank's checkpoint saves. `save` returns once the state is staged (asynchronous) or uploaded
    (`checkpoint_async: false`, or a step a notice asked to save); `wait` waits for the save in flight and
    raises its error. Rank 0 (with `log`) records each save's blocked seconds (`checkpoint`) and, once it
    is in storage, its seconds from start to end (`checkpoint_written`)."""

    def __init__(self, rank: int, scratch: Path, log: MetricsLog | None, *, asynchronous: bool) -> None:
        self.rank, self.scratch, self.log, self.asynchronous = rank, scratch, log, asynchronous
        self._flight: Future[dict[str, Any]] | None = None
        self._complete_at = -1  # the step a notice asked to save: its save returns once uploaded
        self._staged_step = -1

    def save(
        self,
        engine: Any,
        step: int,
        attempt: str,
        meta: dict[str, Any] | None,
        ema: Fragments | None = None,
    ) -> None:
        """Stage this rank's shards of `step` (rank 0 adds `meta`, the checkpoint's vitpipe.json; `ema`:
        this rank's EMA pieces to keep beside them) and hand them to `ray.train.report`, whose upload
        thread writes and uploads them. `attempt` (the same on every rank, and in `meta`) marks this save's
        records: a record left by an earlier attempt at the same step never vouches for this one."""
        started = time.perf_counter()
        self._settle()  # at most one save in flight: host memory holds one staged copy
        waited = time.perf_counter() - started
        folder = self.scratch / checkpoint_dir_name(step)
        staged = stage_checkpoint(engine, folder, tag_of(step), {"step": step})
        pieces = stage_fragments(ema) if ema is not None else []
        if meta is not None:
            (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        self._staged_step = step
        done: Future[dict[str, Any]] = Future()
        mode = (
            ray.train.CheckpointUploadMode.ASYNC if self.asynchronous else ray.train.CheckpointUploadMode.SYNC
        )
        ray.train.report(
            {"step": step},
            checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=checkpoint_dir_name(step),
            checkpoint_upload_mode=mode,
            checkpoint_upload_fn=self._upload_fn(staged, pieces, step, attempt, started, done),
            delete_local_checkpoint_after_upload=False,  # the upload fn removes it once uploaded
        )
        self._flight = done
        settled = not self.asynchronous or step == self._complete_at
        if settled:
            self._settle(log=False)
        blocked = time.perf_counter() - started
        if self.log is not None:
            fields = {"blocked_s": round(blocked, 3), "waited_s": round(waited, 3)}
            self.log.event("checkpoint", step=step, asynchronous=self.asynchronous, **fields)
            if settled:
                self.log.event("checkpoint_written", **done.result())
            self.log.sync()

    def wait(self) -> None:
        """Wait for the save in flight, if any; raises the error of a failed one."""
        self._settle()

    def heed(self, notice: Callable[[int], Notice]) -> Callable[[int], Notice]:
        """The loop's notice hook, whose checkpoints are complete before training goes on: a preempted
        node's last steps are in storage before it goes, and the time between notices (which times the
        last call before a deadline) holds the whole save, as without staging."""

        def heeded(step: int) -> Notice:
            said = notice(step)
            if said:
                self._complete_at = step
                if self._staged_step == step:  # the cadence saved this step before the notice was asked
                    self._settle()
            return said

        return heeded

    def _settle(self, *, log: bool = True) -> None:
        """Wait for the save in flight; rank 0 records when it was written (unless `save` does it)."""
        flight, self._flight = self._flight, None
        if flight is None:
            return
        written = flight.result()  # raises the upload's CheckpointWriteError
        if log and self.log is not None:
            self.log.event("checkpoint_written", **written)

    def _upload_fn(
        self,
        staged: list[StagedFile],
        pieces: list[Fragment],
        step: int,
        attempt: str,
        started: float,
        done: Future[dict[str, Any]],
    ) -> Callable[[ray.train.Checkpoint, str], ray.train.Checkpoint]:
        """`ray.train.report`'s checkpoint_upload_fn: write the staged files into the local folder, upload
        it into the run's `checkpoint_NNNNNNNN`, and resolve `done` (in Ray Train's upload thread)."""
        # Read here, in the training thread: the upload thread has no train context of its own.
        storage = ray.train.get_context().get_storage()
        handed = time.perf_counter()

        def upload(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
            destination = storage.build_checkpoint_path_from_name(name)
            try:
                local = Path(checkpoint.path)
                if pieces:
                    save_fragments(local / EMA_DIR / f"rank-{self.rank:05d}.safetensors", pieces)
                record = {"rank": self.rank, "step": step, "attempt": attempt}
                publish_checkpoint(local, staged, record, storage.storage_filesystem, destination)
                staged.clear()  # Ray keeps this function until its report is in: the host copies go now
                pieces.clear()
            except BaseException as error:
                failure = CheckpointWriteError(
                    f"{destination}: rank {self.rank} could not write or upload its part of the checkpoint "
                    f"of step {step} ({type(error).__name__}: {error}); the folder stays incomplete and a "
                    "resume uses the checkpoint before it"
                )
                # Ray Train retries an upload that failed with a transient S3 error; the first outcome is
                # the one training sees (the worker fails, and the group restarts from a complete one).
                if not done.done():
                    done.set_exception(failure)
                raise failure from error  # the local folder stays for a retry; the worker's scratch goes
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            now = time.perf_counter()
            written = {
                "step": step,
                "written_s": round(now - started, 3),
                "background_s": round(now - handed, 3),
                "finished": round(time.time(), 3),  # the event is logged later, at the next save or the end
            }
            if not done.done():
                done.set_result(written)
            return ray.train.Checkpoint(destination, filesystem=storage.storage_filesystem)

        return upload


def publish_checkpoint(
    folder: Path,
    staged: list[StagedFile],
    record: dict[str, Any],
    filesystem: pafs.FileSystem,
    destination: str,
) -> None:
    """A rank's part of a checkpoint into `destination` (a folder on `filesystem`): its staged files
    written into its local `folder`, every file of that folder uploaded (rank 0's vitpipe.json after its
    shards), and last this rank's `record` (rank, step, attempt) with the files and their sizes. Its
    record of an earlier attempt at the step (a run killed mid-save and resumed from before it) goes
    first (and would not match this attempt's vitpipe.json anyway)."""
    target_record = posixpath.join(destination, rank_record(record["rank"]))
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(target_record)
    write_staged(staged)
    sizes = file_sizes(folder)
    for name in sorted(sizes, key=lambda name: (name == META_FILE, name)):
        target = posixpath.join(destination, name)
        filesystem.create_dir(posixpath.dirname(target), recursive=True)
        pafs.copy_files(
            str(folder / name),
            target,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=filesystem,
            chunk_size=UPLOAD_CHUNK,
            use_threads=False,  # one file; pyarrow's threaded S3 uploads are unsafe (arrow#32372)
        )
    with filesystem.open_output_stream(target_record) as stream:
        stream.write(json.dumps({**record, "files": sizes}, indent=2).encode() + b"\n")
