"""Each worker's data (pipeline.pretrain.order, pipeline.pretrain.feed) on real patch files: every rank the
same steps, no sample twice in an epoch, a resume that starts where the checkpoint stood (on as many ranks
or on others), and an order drawn anew each epoch from the seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipeline.patchfile import PatchShardWriter
from pipeline.pretrain.feed import Feed
from pipeline.pretrain.feed_plan import Corpus, FeedPlan
from pipeline.pretrain.order import EpochOrder, extend_lineage, rank_spans
from vit.patches import PatchGeometry
from vit.recipe import BatchSplit

GEOMETRY = PatchGeometry(image_size=8, patch_size=4, channels=1)  # 64 bytes a sample


def write_corpus(folder, counts: list[int], rows_per_group: int = 7) -> Corpus:
    """Patch files whose every sample is its own id: as label, and as every byte (mod 256) of its patches."""
    files, first = [], 0
    for index, count in enumerate(counts):
        path = str(folder / f"part-{index:03d}.parquet")
        writer = PatchShardWriter(pafs.LocalFileSystem(), path, GEOMETRY, f"shard-{index}", "none")
        writer.rows_per_group = rows_per_group  # several row groups a file, as 224 px photos have
        for sample in range(first, first + count):
            writer.add(str(sample), sample, np.full(GEOMETRY.shape, sample % 256, np.uint8))
        writer.close({"config_hash": "test"})
        files.append(path)
        first += count
    return Corpus(tuple(files), tuple(counts), GEOMETRY)


def plan_of(
    corpus: Corpus, *, window: int = 16, global_batch: int = 8, micro: int = 2, seed: int = 0
) -> FeedPlan:
    steps = sum(corpus.counts) // global_batch
    return FeedPlan(corpus, seed, window, steps, BatchSplit(global_batch, micro), threads=2, depth=3)


def read(plan: FeedPlan, world: int, step: int, until: int, lineage=None) -> list[list[int]]:
    """What each rank reads from `step` to `until` (global steps), as the loop asks for it."""
    per_rank: list[list[int]] = []
    for rank in range(world):
        epoch, position = divmod(step, plan.steps_per_epoch)
        feed = Feed(plan, rank, world, step, lineage or extend_lineage(None, position, world), pin=False)
        ids: list[int] = []
        at = step
        accum = plan.batch.on(world).accumulation
        while at < until:
            epoch, position = divmod(at, plan.steps_per_epoch)
            batches = feed.batches(epoch, position)
            for _ in range(position, plan.steps_per_epoch):
                if at == until:
                    break
                for _ in range(accum):
                    patches, labels = next(batches)
                    assert (patches[:, 0, 0].long() == labels % 256).all(), "patches and labels apart"
                    ids.extend(labels.tolist())
                at += 1
        feed.close()
        per_rank.append(ids)
    return per_rank


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("feed"), [13, 29, 5, 20, 17])  # 84 samples, 10 steps of 8


def test_every_rank_reads_the_same_steps_and_no_sample_twice_in_an_epoch(corpus):
    plan = plan_of(corpus)
    ranks = read(plan, world=2, step=0, until=plan.steps_per_epoch)
    assert len(ranks[0]) == len(ranks[1]) == plan.epoch_samples // 2
    epoch = ranks[0] + ranks[1]
    assert len(set(epoch)) == len(epoch) == plan.epoch_samples  # 80 of the 84: the tail is dropped
    assert set(epoch) <= set(range(84))


def test_the_order_is_drawn_anew_each_epoch_and_the_same_for_the_same_seed(corpus):
    plan = plan_of(corpus)
    two_epochs = read(plan, world=1, step=0, until=2 * plan.steps_per_epoch)[0]
    first, second = two_epochs[: plan.epoch_samples], two_epochs[plan.epoch_samples :]
    assert first != second
    assert len(set(second)) == len(second)
    assert read(plan, world=1, step=0, until=2 * plan.steps_per_epoch)[0] == two_epochs
    assert read(plan_of(corpus, seed=1), world=1, step=0, until=plan.steps_per_epoch)[0] != first
    # the shuffle window mixes rows across files, and 0 keeps each file's own row order
    order = EpochOrder(corpus.counts, seed=0, epoch=0, window=0)
    piece = order.positions(0, order.samples)
    for file in range(len(corpus.counts)):
        assert list(piece.rows[piece.files == file]) == list(range(corpus.counts[file]))


def test_a_resume_starts_at_the_checkpoint_s_position_without_reading_what_came_before(corpus):
    plan = plan_of(corpus)
    whole = read(plan, world=2, step=0, until=2 * plan.steps_per_epoch)
    for stop in (3, 10, 13):  # mid-epoch, at the boundary, in the second epoch
        resumed = read(plan, world=2, step=stop, until=2 * plan.steps_per_epoch)
        done = stop * plan.batch.global_batch // 2
        assert resumed == [ids[done:] for ids in whole]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_a_resume_on_another_number_of_ranks_reads_the_rest_of_the_epoch_once(corpus, before, after):
    plan = plan_of(corpus)
    stop = 3
    head = read(plan, world=before, step=0, until=stop)
    lineage = extend_lineage([(0, before)], stop, after)
    tail = read(plan, world=after, step=stop, until=plan.steps_per_epoch, lineage=lineage)
    epoch = [i for ids in head + tail for i in ids]
    assert len(epoch) == len(set(epoch)) == plan.epoch_samples
    assert len({len(ids) for ids in tail}) == 1  # the new ranks still read equal shares
    # and a second change in the same epoch keeps it so
    again = extend_lineage(lineage, 6, before)
    tail_a = read(plan, world=after, step=stop, until=6, lineage=lineage)
    tail_b = read(plan, world=before, step=6, until=plan.steps_per_epoch, lineage=again)
    epoch = [i for ids in head + tail_a + tail_b for i in ids]
    assert len(epoch) == len(set(epoch)) == plan.epoch_samples


def test_a_study_subset_reads_only_its_rows(tmp_path):
    full = write_corpus(tmp_path, [10, 10])
    chosen = ((1, 4, 5, 9), (0, 2, 3, 7))
    subset = Corpus(full.files, (4, 4), GEOMETRY, chosen)
    plan = plan_of(subset, window=4, global_batch=4, micro=2)
    ids = read(plan, world=1, step=0, until=2)[0]
    assert sorted(ids) == [1, 4, 5, 9, 10, 12, 13, 17]


def test_rank_spans_split_the_rest_of_an_epoch_equally():
    assert rank_spans(12, [(0, 2)], 1, 0, 4) == [(6, 12)]
    assert rank_spans(12, [(0, 2), (1, 1)], 0, 1, 4) == [(2, 6), (8, 12)]
    assert rank_spans(12, [(0, 1), (1, 2)], 1, 1, 4) == [(8, 12)]
    with pytest.raises(ValueError, match="not split"):
        rank_spans(12, [(0, 5)], 0, 1, 4)


def test_the_feed_refuses_a_position_other_than_where_it_stands(tmp_path):
    """The loop asks for an epoch's batches from an optimizer step on; the feed reads from where it was
    started (step 2 of epoch 0), and from 0 in every later epoch: another position is a bug, named."""
    plan = plan_of(write_corpus(tmp_path, [10, 10]), window=4, global_batch=4, micro=2)
    feed = Feed(plan, 0, 1, 2, [(0, 1)], pin=False)
    with pytest.raises(RuntimeError, match="the feed stands at step 2 of epoch 0, not 0"):
        feed.batches(0, 0)
    with pytest.raises(RuntimeError, match="the feed stands at step 0 of epoch 1, not 2"):
        feed.batches(1, 2)
    patches, labels = next(iter(feed.batches(0, 2)))
    assert (patches.shape[0], labels.shape[0]) == (2, 2)
    feed.close()


def test_a_damaged_or_shortened_patch_file_is_named_when_read(tmp_path):
    corpus = write_corpus(tmp_path, [10, 10])
    plan = plan_of(corpus, window=4, global_batch=4, micro=2)
    Path(corpus.files[1]).write_bytes(b"PAR1 not parquet")  # replaced after preprocessing
    feed = Feed(plan, 0, 1, 0, [(0, 1)], pin=False)
    with pytest.raises(OSError, match=r"part-001\.parquet"):
        list(feed.batches(0, 0))
    feed.close()
    (tmp_path / "short").mkdir()
    short = write_corpus(tmp_path / "short", [10, 4])  # the manifest said 10 rows; the file holds 4
    plan = plan_of(Corpus(short.files, (10, 10), GEOMETRY), window=4, global_batch=4, micro=2)
    feed = Feed(plan, 0, 1, 0, [(0, 1)], pin=False)
    with pytest.raises(ValueError, match=r"part-001\.parquet: holds 4 rows, fewer than the run's plan reads"):
        list(feed.batches(0, 0))
    feed.close()
