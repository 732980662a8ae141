"""DeepSpeed engines and the pretraining loop of `vit/`, without Ray: one-rank gloo groups in this process,
batches from memory, checkpoints in a temporary folder."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from tests.conftest import free_port
from vit.bit import ResNetV2
from vit.config import BiTConfig, ViTConfig
from vit.ema import Ema
from vit.engine import (
    build_engine,
    consolidated_state,
    copied_asynchronously,
    load_checkpoint,
    save_checkpoint,
    stage_checkpoint,
    to_host,
    to_universal,
    train_micro_batch,
    wait_for_host_copies,
    write_staged,
)
from vit.fragments import (
    assemble,
    gather_full,
    load_fragments,
    local_fragments,
    parameter_shapes,
    save_fragments,
)
from vit.loop import DataExhaustedError, Hooks, LoopEnd, Throughput, pretrain_loop
from vit.model import VisionTransformer
from vit.recipe import BatchSplit, Cadence, Optimizer, Recipe, Schedule, Zero
from vit.weights import load_state, state_digest

TINY = ViTConfig(
    image_size=16, patch_size=4, channels=3, num_classes=5, width=32, depth=2, heads=2, mlp_dim=64
)


@pytest.mark.parametrize(("stage", "offload"), [(0, False), (2, False), (3, False), (2, True)])
def test_bf16_deepspeed_engine_trains_on_uint8_patches(stage, offload, one_rank_group):
    """The GPU recipe's path (bf16 compute, fp32 loss) on DeepSpeed's CPU accelerator: the engine runs the
    ZeRO stage and offload asked for, and it learns a batch. ZeRO >= 1 keeps bf16 weights (fp32 master
    partitions in its optimizer); ZeRO-0 keeps fp32 weights under bf16 autocast, its only master copy."""
    torch.manual_seed(0)
    recipe = Recipe(
        Optimizer(lr=3e-3), Schedule(warmup_steps=0), total_steps=30, batch=BatchSplit(8, 8), bf16=True
    )
    zero = Zero(stage, offload_optimizer=offload)
    engine = build_engine(VisionTransformer(TINY), recipe, zero, world_size=1)
    assert engine.zero_optimization_stage() == stage
    assert engine.zero_cpu_offload() is offload
    assert engine.bfloat16_enabled() is (stage > 0)
    assert engine.torch_autocast_enabled() is (stage == 0)
    assert next(engine.module.parameters()).dtype == (torch.bfloat16 if stage else torch.float32)
    patches = torch.randint(0, 256, (8, *TINY.geometry.shape), dtype=torch.uint8)
    labels = torch.arange(8) % TINY.num_classes
    rng = np.random.default_rng(0)
    losses = [float(train_micro_batch(engine, patches, labels, recipe, rng).loss.detach()) for _ in range(30)]
    assert losses[-1] < losses[0] / 2
    assert train_micro_batch(engine, patches, labels, recipe, rng).correct == 8


@pytest.mark.parametrize("stage", [2, 3])
def test_bit_trains_in_bf16_in_the_deepspeed_engine_and_its_checkpoint_consolidates_into_its_weights(
    stage, one_rank_group, tmp_path
):
    """The BiT baseline goes through the same engine as the ViT, on the GPU recipe's bf16 path: ZeRO, the
    shared training step, no step dropped, a checkpoint whose consolidated fp32 weights load into a fresh
    ResNetV2 and, rounded to bf16 as the engine's are, give the engine's logits to bf16's resolution.
    (At 16 px BiT's last stage runs 3x3/2 convolutions on 1x1 maps, where oneDNN's bf16 weight gradient
    was NaN now and then: DeepSpeed skipped those steps and BiT learned ~10x slower,
    benchmarks/results/bf16.json.)"""
    torch.manual_seed(0)
    config = BiTConfig(image_size=16, patch_size=4, num_classes=5, depth=26, base_width=8, groups=8)
    recipe = Recipe(
        Optimizer(lr=3e-3), Schedule(warmup_steps=0), total_steps=20, batch=BatchSplit(8, 8), bf16=True
    )
    initial = ResNetV2(config)
    untrained = state_digest(initial)
    engine = build_engine(initial, recipe, Zero(stage), world_size=1)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    patches = torch.randint(0, 256, (8, *config.geometry.shape), dtype=torch.uint8)
    labels = torch.arange(8) % config.num_classes
    rng = np.random.default_rng(0)
    losses = [float(train_micro_batch(engine, patches, labels, recipe, rng).loss.detach()) for _ in range(20)]
    assert engine.skipped_steps == 0
    assert losses[-1] < losses[0] / 10, losses
    save_checkpoint(engine, tmp_path, "step20", {"step": 20})
    model = ResNetV2(config)
    load_state(model, consolidated_state(tmp_path, "step20"), str(tmp_path))
    assert next(iter(consolidated_state(tmp_path, "step20").values())).dtype == torch.float32
    assert state_digest(model) != untrained
    engine.eval()
    with torch.no_grad():
        expected = engine(patches).float()
        got = model.to(torch.bfloat16).eval()(patches).float()
    assert expected.abs().max() > 1  # trained logits, not the zero head's
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # bf16 keeps 8 bits: 2^-8 = 0.4%


@pytest.mark.parametrize("family", ["bit", "vit"])
def test_bf16_training_tracks_fp32_from_the_same_seed(family, one_rank_group):
    """Same seed, same batches, same 30 steps at ZeRO-2: bf16's loss curve ends where fp32's does (the
    last five steps' mean within 0.1; fp32 ends near 0.05 for BiT, 0.4 for the ViT) and no step is
    dropped. Before the fix, bf16 BiT ended near 1.35 with 15 of 20 steps skipped."""
    if family == "bit":
        config = BiTConfig(image_size=16, patch_size=4, num_classes=5, depth=26, base_width=8, groups=8)
    else:
        config = TINY
    generator = torch.Generator().manual_seed(4)
    patches = torch.randint(0, 256, (8, *config.geometry.shape), dtype=torch.uint8, generator=generator)
    labels = torch.arange(8) % config.num_classes
    curves = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = ResNetV2(config) if family == "bit" else VisionTransformer(config)
        recipe = Recipe(
            Optimizer(lr=3e-3), Schedule(warmup_steps=0), total_steps=30, batch=BatchSplit(8, 8), bf16=bf16
        )
        engine = build_engine(model, recipe, Zero(2), world_size=1)
        rng = np.random.default_rng(0)
        curves[bf16] = [
            float(train_micro_batch(engine, patches, labels, recipe, rng).loss.detach()) for _ in range(30)
        ]
        assert engine.skipped_steps == 0, bf16
    fp32, bf16 = np.mean(curves[False][-5:]), np.mean(curves[True][-5:])
    assert fp32 < curves[False][0] / 3, curves[False]  # there is a curve to track
    assert abs(bf16 - fp32) < 0.1, (curves[False], curves[True])


# ---------------------------------------------------------------- the loop

DATA_ROWS, MICRO, ACCUM = 64, 8, 2
STEPS_PER_EPOCH = DATA_ROWS // (MICRO * ACCUM)
RECIPE = Recipe(
    Optimizer(lr=1e-2, weight_decay=0.05),
    Schedule(warmup_steps=4),
    total_steps=24,
    batch=BatchSplit(MICRO * ACCUM, MICRO),
    flip=False,
)
ZERO = Zero(2)


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(DATA_ROWS) % TINY.num_classes
    patches = torch.randint(0, 256, (DATA_ROWS, *TINY.geometry.shape), dtype=torch.uint8, generator=generator)
    patches[:, :, : TINY.geometry.patch_dim // 2] = (labels * 50).view(-1, 1, 1).to(torch.uint8)  # learnable
    return patches, labels


class Memory:
    """The loop's hooks over an in-memory dataset, remembering what the loop asked and recorded."""

    def __init__(self, checkpoints: Path) -> None:
        self.patches, self.labels = dataset()
        self.checkpoints, self.engine = checkpoints, None
        self.records: list[dict] = []
        self.epochs: list[tuple[int, int]] = []
        self.saved: list[int] = []

    def batches(self, epoch: int, position: int):
        self.epochs.append((epoch, position))
        for start in range(position * ACCUM * MICRO, DATA_ROWS, MICRO):
            yield self.patches[start : start + MICRO], self.labels[start : start + MICRO]

    def save(self, step: int, epoch: int) -> None:
        save_checkpoint(self.engine, self.checkpoints, f"step{step}", {"step": step})
        self.saved.append(step)

    def hooks(self, stop_after: int | None = None) -> Hooks:
        stop = (lambda: self.records[-1]["step"] >= stop_after) if stop_after else (lambda: False)
        return Hooks(self.batches, self.save, self.records.append, stop)


def run(
    hooks_of: Memory, engine, start_step: int, recipe: Recipe = RECIPE, stop_after: int | None = None
) -> LoopEnd:
    hooks_of.engine = engine
    throughput = Throughput(images_per_step=MICRO * ACCUM, flops_per_step=1e6, peak_flops=None, seq_len=17)
    return pretrain_loop(
        engine,
        recipe,
        hooks_of.hooks(stop_after),
        start_step=start_step,
        steps_per_epoch=STEPS_PER_EPOCH,
        cadence=Cadence(log_every=1, checkpoint_every=10),
        throughput=throughput,
        seed=0,
    )


def test_pretraining_loop_trains_without_ray_and_resumes_with_the_weights_it_saved(one_rank_group, tmp_path):
    """The loop on a one-rank gloo engine: epochs from position 0, the scheduled rate at each step,
    checkpoints on the cadence and at the end. A second engine started from other weights and resumed from
    step 10 continues with the saved weights: its first steps' losses are the first run's, far below a
    fresh start's."""
    torch.manual_seed(0)
    first = Memory(tmp_path / "checkpoints")
    assert run(first, build_engine(VisionTransformer(TINY), RECIPE, ZERO, world_size=1), 0) == LoopEnd(
        24, "finished"
    )
    losses = {record["step"]: record["loss"] for record in first.records}
    assert sorted(losses) == list(range(1, 25))
    assert first.saved == [10, 20, 24]
    assert first.epochs[:3] == [(0, 0), (1, 0), (2, 0)]
    assert [record["lr"] for record in first.records] == pytest.approx([RECIPE.lr_at(s) for s in range(24)])
    assert losses[24] < losses[1] / 2

    torch.manual_seed(1)  # other initial weights: a resume that kept them would show it in the loss
    second = Memory(tmp_path / "checkpoints")
    engine = build_engine(VisionTransformer(TINY), RECIPE, ZERO, world_size=1)
    assert load_checkpoint(engine, tmp_path / "checkpoints", "step10")["step"] == 10
    assert run(second, engine, start_step=10).step == 24
    assert second.epochs[0] == (2, 2)  # step 10 is 2 steps into epoch 2
    resumed = {record["step"]: record["loss"] for record in second.records}
    assert sorted(resumed) == list(range(11, 25))
    assert resumed[11] == pytest.approx(losses[11], rel=1e-4)
    assert resumed[24] == pytest.approx(losses[24], rel=1e-3)
    assert resumed[11] < losses[1] / 2


def test_a_rank_whose_data_runs_out_stops_with_a_clear_error(one_rank_group, tmp_path):
    memory = Memory(tmp_path)
    memory.batches = lambda epoch, skip: iter([(memory.patches[:MICRO], memory.labels[:MICRO])])
    engine = build_engine(VisionTransformer(TINY), RECIPE, ZERO, world_size=1)
    with pytest.raises(DataExhaustedError, match="the data ran out during step 1"):
        run(memory, engine, 0)


def test_a_non_finite_loss_stops_the_loop_at_that_step_and_saves_nothing(one_rank_group, tmp_path):
    exploding = dataclasses.replace(
        RECIPE,
        optimizer=Optimizer(name="sgd", lr=1e30, weight_decay=0.0, grad_clip=None),
        schedule=Schedule(warmup_steps=0, decay="constant"),
    )
    memory = Memory(tmp_path)
    end = run(memory, build_engine(VisionTransformer(TINY), exploding, ZERO, world_size=1), 0, exploding)
    assert end.reason == "diverged"
    assert end.step < 10
    assert "loss" in end.detail or "grad_norm" in end.detail
    assert memory.records[-1]["step"] == end.step  # the bad step is recorded, for the message and the plot
    assert memory.saved == []  # nothing of the diverged state is kept


def test_a_requested_stop_checkpoints_the_step_just_trained(one_rank_group, tmp_path):
    memory = Memory(tmp_path)
    end = run(memory, build_engine(VisionTransformer(TINY), RECIPE, ZERO, world_size=1), 0, stop_after=3)
    assert end == LoopEnd(3, "stopped")
    assert memory.saved == [3]


def test_a_checkpoint_notice_saves_the_step_and_training_carries_on(one_rank_group, tmp_path):
    """A node's preemption notice: the step just trained is checkpointed at once, and the loop goes on."""
    memory = Memory(tmp_path)
    hooks = dataclasses.replace(memory.hooks(), notice=lambda step: "checkpoint" if step == 3 else "")
    memory.hooks = lambda stop_after=None: hooks
    end = run(memory, build_engine(VisionTransformer(TINY), RECIPE, ZERO, world_size=1), 0)
    assert end == LoopEnd(24, "finished")
    assert memory.saved == [3, 10, 20, 24]


def test_a_regroup_notice_checkpoints_and_ends_the_loop_there(one_rank_group, tmp_path):
    """Room for more ranks: the loop saves the step and ends it "regroup", for the caller to start the
    group again; a notice on a step the cadence saved anyway saves it once."""
    memory = Memory(tmp_path)
    hooks = dataclasses.replace(memory.hooks(), notice=lambda step: "regroup" if step in (5, 10) else "")
    memory.hooks = lambda stop_after=None: hooks
    engine = build_engine(VisionTransformer(TINY), RECIPE, ZERO, world_size=1)
    assert run(memory, engine, 0) == LoopEnd(5, "regroup")
    assert memory.saved == [5]
    assert run(memory, engine, 5) == LoopEnd(10, "regroup")
    assert memory.saved == [5, 10]


# ---------------------------------------------------------------- ZeRO state across group sizes

RESHARD_STAGES = (1, 2, 3)
EMA_DECAY = 0.9


def _reshard_phase(
    rank: int, world: int, port: int, folder: str, load: str | None, save: str | None, steps: range
) -> None:
    """One group of `world` gloo ranks (a spawned process each): for every ZeRO stage, an engine loaded from
    the universal checkpoint `load` (or fresh) trains `steps` (global step numbers: the same 16 images for
    a step on any number of ranks), saving `save` before the last of them. Each rank keeps an EMA of its
    fragments, updated after every step, saved as its rank file beside the checkpoint and loaded from all
    the previous group's files. Rank 0 writes the full fp32 weights, gathered by DeepSpeed, and the full
    EMA (`gather_full`) after the load and the save and at the end."""
    # DeepSpeed picks its accelerator when first imported: not as pytest collects this module, before
    # one_rank_group's DS_ACCELERATOR=cpu
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

    os.environ.update(
        {
            "DS_ACCELERATOR": "cpu",
            "LOCAL_RANK": str(rank),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    recipe = dataclasses.replace(RECIPE, batch=BatchSplit(16, MICRO, world), optimizer=Optimizer(lr=1e-2))

    def dump(engine, ema: Ema, name: str) -> None:
        weights = {
            n: safe_get_full_fp32_param(p).detach().cpu().contiguous()
            for n, p in engine.module.named_parameters()
        }
        averaged = gather_full(ema.pieces(), parameter_shapes(engine))
        if rank == 0:
            save_file(weights, Path(folder) / f"state-{name}.safetensors")
            save_file(averaged, Path(folder) / f"ema-{name}.safetensors")

    for stage in RESHARD_STAGES:
        torch.manual_seed(stage)
        universal = load is not None
        checkpoints = Path(folder) / f"zero-{stage}"
        engine = build_engine(VisionTransformer(TINY), recipe, Zero(stage), world, load_universal=universal)
        if universal:
            load_checkpoint(engine, Path(folder) / f"universal-{stage}", load)
        ema = Ema(local_fragments(engine), EMA_DECAY)  # the fragments of the loaded engine
        if universal:
            files = sorted((checkpoints / load / "ema").glob("rank-*.safetensors"))
            ema.load(assemble(load_fragments(files), parameter_shapes(engine)))
            dump(engine, ema, f"{stage}-loaded-{load}")
        for step in steps:
            if save is not None and step == steps[-1]:
                _save_with_ema(engine, ema, checkpoints, save, step, rank)
                dump(engine, ema, f"{stage}-saved-{save}")
            _train_step(engine, recipe, step, rank)
            ema.update()
        if save is not None and not steps:
            _save_with_ema(engine, ema, checkpoints, save, 0, rank)
        dump(engine, ema, f"{stage}-end-{load or 'fresh'}")
        dist.barrier()
    dist.destroy_process_group()


def _train_step(engine, recipe: Recipe, step: int, rank: int) -> None:
    """Global step `step` on this rank: its own rows of the step's 16 images, whatever the group's size."""
    patches, labels = dataset()
    accumulation = recipe.batch.accumulation
    for micro in range(accumulation):
        start = (step * 16 + (rank * accumulation + micro) * MICRO) % DATA_ROWS
        rng = np.random.default_rng(0)
        train_micro_batch(engine, patches[start : start + MICRO], labels[start : start + MICRO], recipe, rng)


def _save_with_ema(engine, ema: Ema, checkpoints: Path, tag: str, step: int, rank: int) -> None:
    save_checkpoint(engine, checkpoints, tag, {"step": step})
    if ema.pieces().writes(rank):
        save_fragments(checkpoints / tag / "ema" / f"rank-{rank:05d}.safetensors", ema.pieces())


def _spawn_group(world: int, *args) -> None:
    torch.multiprocessing.spawn(_reshard_phase, args=(world, free_port(), *args), nprocs=world, join=True)


@pytest.mark.slow
def test_zero_state_is_resharded_exactly_across_a_two_one_two_cycle(tmp_path):
    """What an elastic run does to its optimizer on every resize, on real gloo groups of spawned ranks, for
    ZeRO 1, 2 and 3: two ranks train 3 steps, save, and train a 4th; one rank loads DeepSpeed's universal
    conversion of the save and saves again; two ranks load the conversion of that and train the 4th step.
    The weights are the saved ones after each load, and the 4th step lands exactly where the unbroken run's
    did: Adam's moments and step count came through both reshards (lost moments change the update). The
    EMA, saved per rank and loaded by a group of another size, comes through the same way, exactly."""

    def state(name: str) -> dict[str, torch.Tensor]:
        return load_file(tmp_path / f"{name}.safetensors")

    _spawn_group(2, str(tmp_path), None, "two", range(4))
    for stage in RESHARD_STAGES:
        to_universal(tmp_path / f"zero-{stage}", "two", tmp_path / f"universal-{stage}")
    _spawn_group(1, str(tmp_path), "two", "one", range(0))
    for stage in RESHARD_STAGES:
        to_universal(tmp_path / f"zero-{stage}", "one", tmp_path / f"universal-{stage}")
    _spawn_group(2, str(tmp_path), "one", None, range(3, 4))
    for stage in RESHARD_STAGES:
        saved, unbroken = state(f"state-{stage}-saved-two"), state(f"state-{stage}-end-fresh")
        assert not torch.equal(saved["head.weight"], unbroken["head.weight"])  # the 4th step moved them
        ema_saved, ema_unbroken = state(f"ema-{stage}-saved-two"), state(f"ema-{stage}-end-fresh")
        assert not torch.equal(ema_saved["head.weight"], ema_unbroken["head.weight"])
        assert not torch.equal(ema_unbroken["head.weight"], unbroken["head.weight"])  # an average, not a copy
        pairs = {
            "2->1 weights": (state(f"state-{stage}-loaded-two"), saved),
            "1->2 weights": (state(f"state-{stage}-loaded-one"), saved),
            "2->1->2 then a step": (state(f"state-{stage}-end-one"), unbroken),
            "2->1 EMA": (state(f"ema-{stage}-loaded-two"), ema_saved),
            "1->2 EMA": (state(f"ema-{stage}-loaded-one"), ema_saved),
            "2->1->2 EMA then a step": (state(f"ema-{stage}-end-one"), ema_unbroken),
        }
        for what, (got, expected) in pairs.items():
            assert got.keys() == expected.keys()
            for name, tensor in expected.items():
                torch.testing.assert_close(
                    got[name], tensor, rtol=0, atol=0, msg=f"ZeRO-{stage} {what}: {name} differs"
                )


# ---------------------------------------------------------------- staged checkpoints


def assert_same_state(written, reference, where: str = "") -> None:
    """Two loaded checkpoint files hold the same values: every tensor equal, bit for bit."""
    if torch.is_tensor(reference):
        assert torch.equal(written, reference), f"{where} differs"
    elif isinstance(reference, dict):
        assert written.keys() == reference.keys(), where
        for key, value in reference.items():
            assert_same_state(written[key], value, f"{where}/{key}")
    elif isinstance(reference, list | tuple):
        assert len(written) == len(reference), where
        for index, value in enumerate(reference):
            assert_same_state(written[index], value, f"{where}[{index}]")


@pytest.mark.parametrize(("stage", "bf16"), [(0, False), (1, True), (2, False), (3, False)])
def test_a_staged_checkpoint_holds_the_state_of_its_step_however_training_goes_on(
    stage, bf16, one_rank_group, tmp_path
):
    """What a staged save writes is the engine's state when it was staged: the files written after a
    further optimizer step equal, bit for bit, those DeepSpeed's own save wrote at the staged step (model,
    fp32 master and Adam's moments under every ZeRO stage), and they load, while the engine's weights have
    moved on."""
    torch.manual_seed(0)
    recipe = dataclasses.replace(RECIPE, bf16=bf16, batch=BatchSplit(MICRO, MICRO))
    engine = build_engine(VisionTransformer(TINY), recipe, Zero(stage), world_size=1)
    patches, labels = dataset()
    rng = np.random.default_rng(0)
    for start in (0, MICRO):
        train_micro_batch(engine, patches[start : start + MICRO], labels[start : start + MICRO], recipe, rng)
    engine.save_checkpoint(
        str(tmp_path / "at-once"), tag="step2", client_state={"step": 2}
    )  # DeepSpeed's own
    staged = stage_checkpoint(engine, tmp_path / "staged", "step2", {"step": 2})
    train_micro_batch(engine, patches[:MICRO], labels[:MICRO], recipe, rng)  # step 3 changes every tensor
    save_checkpoint(engine, tmp_path / "later", "step3", {"step": 3})
    write_staged(staged)

    names = sorted(path.name for path in (tmp_path / "at-once" / "step2").glob("*.pt"))
    assert names == sorted(file.path.name for file in staged)
    for name in names:
        reference = torch.load(tmp_path / "at-once" / "step2" / name, weights_only=False)
        assert_same_state(
            torch.load(tmp_path / "staged" / "step2" / name, weights_only=False), reference, name
        )
    before = consolidated_state(tmp_path / "staged", "step2")
    after = consolidated_state(tmp_path / "later", "step3")
    assert all(not torch.equal(before[name], after[name]) for name in ("head.weight", "stem.proj.weight"))
    resumed = build_engine(VisionTransformer(TINY), recipe, Zero(stage), world_size=1)
    assert load_checkpoint(resumed, tmp_path / "staged", "step2")["step"] == 2
    save_checkpoint(resumed, tmp_path / "resaved", "step2", {"step": 2})
    for name, tensor in consolidated_state(tmp_path / "resaved", "step2").items():
        assert torch.equal(tensor, before[name]), name


def test_to_host_copies_a_view_alone_and_keeps_it_apart_from_its_source():
    """A view into a flat buffer (ZeRO's weights and partitions are) is copied as its own elements, not
    with the whole buffer, and the copy does not follow later writes to the source."""
    flat = torch.arange(1000, dtype=torch.float32)
    view = flat[10:20]
    copied = to_host(view)
    flat.zero_()
    assert copied.untyped_storage().nbytes() == 10 * 4
    assert torch.equal(copied, torch.arange(10, 20, dtype=torch.float32))


def test_host_copies_are_waited_for_on_a_gpu_and_done_at_once_on_a_cpu(monkeypatch):
    """Both answers on a CPU: a GPU's copy into pinned memory is asynchronous, so each GPU copied from is
    synchronised once (recorded here in place of CUDA); a CPU's is a clone, and nothing is waited for."""
    cpu, gpu0, gpu1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert copied_asynchronously(gpu0)
    assert not copied_asynchronously(cpu)
    synchronised: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", synchronised.append)
    wait_for_host_copies([cpu, cpu])
    assert synchronised == []
    wait_for_host_copies([gpu0, cpu, gpu0, gpu1])
    assert sorted(synchronised, key=str) == [gpu0, gpu1]
