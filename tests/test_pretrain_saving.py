"""A rank's part of a checkpoint as `pipeline.pretrain.saving` writes it (staged, then written and uploaded
with its record last), on a one-rank gloo engine, and what a save cut short leaves: a folder skipped for
the checkpoint before it. (Ray Train's asynchronous report of it runs in tests/test_pretrain.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from pipeline.pretrain.checkpoints import (
    META_FILE,
    checkpoint_dir_name,
    ema_files,
    latest_checkpoint,
    rank_record,
    scan_checkpoints,
    tag_of,
)
from pipeline.pretrain.saving import publish_checkpoint
from tests.test_vit_engine import MICRO, RECIPE, TINY, ZERO, dataset
from vit.config import architecture_record
from vit.engine import build_engine, consolidated_state, load_checkpoint, stage_checkpoint, train_micro_batch
from vit.model import VisionTransformer


class Run:
    """A one-rank engine that trains a micro-batch a step and saves its checkpoints into `run`, as a
    worker does: staged into a scratch folder, then published (written, uploaded, recorded)."""

    def __init__(self, run: Path, scratch: Path) -> None:
        torch.manual_seed(0)
        self.run, self.scratch, self.step, self.attempts = run, scratch, 0, 0
        self.engine = build_engine(VisionTransformer(TINY), RECIPE, ZERO, world_size=1)
        self.patches, self.labels = dataset()
        self.rng = np.random.default_rng(0)

    def train(self) -> None:
        start = self.step * MICRO
        batch = self.patches[start : start + MICRO], self.labels[start : start + MICRO]
        for _ in range(RECIPE.batch.accumulation):
            train_micro_batch(self.engine, *batch, RECIPE, self.rng)
        self.step += 1

    def save(self) -> Path:
        name, tag = checkpoint_dir_name(self.step), tag_of(self.step)
        folder = self.scratch / name
        staged = stage_checkpoint(self.engine, folder, tag, {"step": self.step})
        meta = {"step": self.step, "tag": tag, "world_size": 1, "parts": 1, "zero_stage": ZERO.stage}
        attempt = f"attempt-{self.attempts}"
        self.attempts += 1
        (folder / META_FILE).write_text(json.dumps({**meta, "attempt": attempt, **architecture_record(TINY)}))
        destination = self.run / name
        record = {"rank": 0, "step": self.step, "attempt": attempt}
        publish_checkpoint(folder, staged, record, pafs.LocalFileSystem(), str(destination))
        return destination


def cut_short(folder: Path) -> None:
    """What a rank killed after uploading its files and before its record leaves."""
    (folder / rank_record(0)).unlink()


def truncated(folder: Path) -> None:
    """A shard cut short (a copy that did not finish, a full disk) beside a record of its whole size."""
    shard = next((folder / tag_of(int(folder.name.rsplit("_", 1)[1]))).glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (cut_short, "rank 0 did not finish its upload (no vitpipe.rank-00000.json)"),
        (truncated, "vitpipe.rank-00000.json records"),
    ],
)
def test_a_run_killed_between_a_save_s_start_and_its_completion_resumes_from_the_previous_complete_one(
    damage, why, one_rank_group, tmp_path, capsys
):
    """Checkpoint 1 completes; checkpoint 2 is cut short: the newest complete checkpoint is 1, named with
    why 2 was skipped, and it loads the weights of step 1. Saving step 2 again completes its folder."""
    run = Run(tmp_path / "run", tmp_path / "scratch")
    run.train()
    first = run.save()
    assert json.loads((first / rank_record(0)).read_text())["files"]  # the record lists the rank's files
    run.train()
    damage(run.save())

    latest = latest_checkpoint(str(run.run))
    assert latest.step == 1
    err = capsys.readouterr().err
    assert f"skipping {run.run / checkpoint_dir_name(2)}: " in err
    assert why in err
    resumed = build_engine(VisionTransformer(TINY), RECIPE, ZERO, world_size=1)
    load_checkpoint(resumed, latest.path, latest.tag)
    expected = consolidated_state(first, tag_of(1))
    for name, parameter in resumed.module.named_parameters():
        assert torch.equal(parameter.detach(), expected[name]), name

    run.save()  # the same step saved again over what the cut-short save left
    assert [info.step for info in scan_checkpoints(str(run.run))[0]] == [1, 2]


def test_a_save_whose_upload_fails_leaves_no_record_and_raises(one_rank_group, tmp_path):
    """A failed upload (here a file standing where the tag's folder must go) raises and writes no record,
    so the folder never counts as a checkpoint."""
    run = Run(tmp_path / "run", tmp_path / "scratch")
    run.train()
    (run.run / checkpoint_dir_name(1)).mkdir(parents=True)
    (run.run / checkpoint_dir_name(1) / tag_of(1)).write_text("in the way")
    with pytest.raises(FileExistsError, match="step00000001"):
        run.save()
    assert not (run.run / checkpoint_dir_name(1) / rank_record(0)).exists()
    assert scan_checkpoints(str(run.run))[0] == []


def parted_checkpoint(run: Path, step: int, records: dict[int, str | None]) -> Path:
    """A two-rank checkpoint folder (vitpipe.json with `parts: 2`), each rank's shard and, as `records`
    says, its record (None: no record, else the record's text; "" writes the true one)."""
    folder, tag = run / checkpoint_dir_name(step), tag_of(step)
    (folder / tag).mkdir(parents=True)
    meta = {"step": step, "tag": tag, "parts": 2, **architecture_record(TINY)}
    (folder / META_FILE).write_text(json.dumps(meta))
    for rank, text in records.items():
        shard = f"{tag}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        (folder / shard).write_bytes(b"x" * (100 + rank))
        if text is not None:
            (folder / rank_record(rank)).write_text(text or json.dumps({"files": {shard: 100 + rank}}))
    return folder


@pytest.mark.parametrize(
    ("records", "why"),
    [
        ({0: "", 1: None}, "rank 1 did not finish its upload (no vitpipe.rank-00001.json)"),
        ({0: "", 1: '{"files": '}, "vitpipe.rank-00001.json is damaged"),
        ({0: '{"rank": 0}', 1: ""}, "vitpipe.rank-00000.json is damaged (it lists no files)"),
    ],
)
def test_a_checkpoint_is_complete_only_with_every_rank_s_record(tmp_path, capsys, records, why):
    """A checkpoint written by ranks that record their own files counts once vitpipe.json and the record
    of every rank of `parts` are there with the files they list; a missing or damaged record is named."""
    parted_checkpoint(tmp_path, 100, {0: "", 1: ""})
    parted_checkpoint(tmp_path, 200, records)
    assert latest_checkpoint(str(tmp_path)).step == 100
    assert f"checkpoint_00000200: {why}" in capsys.readouterr().err


def test_a_record_of_another_attempt_at_the_step_does_not_vouch_for_this_one(tmp_path, capsys):
    """A save of step S on two ranks stopped after rank 1's record was up; the relaunch saves S again and
    rank 0's new vitpipe.json is in before rank 1's old record is replaced: the folder is not complete."""
    folder = parted_checkpoint(tmp_path, 20, {0: "", 1: ""})
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "attempt": "new"}))
    for rank in (0, 1):
        record = json.loads((folder / rank_record(rank)).read_text())
        attempt = "new" if rank == 0 else "old"
        (folder / rank_record(rank)).write_text(json.dumps({**record, "attempt": attempt}))
    assert scan_checkpoints(str(tmp_path))[0] == []
    assert latest_checkpoint(str(tmp_path)) is None
    assert "vitpipe.rank-00001.json is of another attempt at this step" in capsys.readouterr().err


def test_only_the_ema_parts_the_checkpoint_s_records_list_are_read(tmp_path):
    """An EMA part left by an earlier attempt at the step on more ranks is not read with this one's."""
    folder = tmp_path / checkpoint_dir_name(20)
    (folder / "ema").mkdir(parents=True)
    for rank in (0, 1):
        (folder / "ema" / f"rank-{rank:05d}.safetensors").write_bytes(b"x")
    record = {"rank": 0, "files": {"ema/rank-00000.safetensors": 1}}
    (folder / rank_record(0)).write_text(json.dumps(record))
    assert ema_files(folder, {"parts": 1}) == [folder / "ema" / "rank-00000.safetensors"]
    assert len(ema_files(folder, {})) == 2  # a checkpoint from before the records: every file there
