"""What the pretraining loop and its engine must do on a GPU, proven on one-rank gloo groups: every rank
draws its own randomness and a resume draws what an unbroken run drew; the host reads the device only at
log steps; optimizer state sits where its optimizer steps; gradients travel and accumulate in fp32 under
bf16; ZeRO-0 under bf16 keeps and exports fp32 master weights."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from tests.test_vit_engine import ACCUM, MICRO, RECIPE, STEPS_PER_EPOCH, Memory
from vit import loop as loop_module
from vit.config import ViTConfig
from vit.engine import (
    build_engine,
    consolidated_state,
    deepspeed_config,
    load_checkpoint,
    place_optimizer_state,
    train_micro_batch,
)
from vit.loop import Hooks, LoopEnd, Throughput, peak_memory_gb, pretrain_loop
from vit.model import VisionTransformer
from vit.objective import step_randomness, training_view
from vit.recipe import BatchSplit, Cadence, Crop, Optimizer, Recipe, Schedule, Zero

# Every source of randomness on: dropout, drop-path, the random crop, flips, mixup.
NOISY = ViTConfig(
    image_size=16,
    patch_size=4,
    channels=3,
    num_classes=5,
    width=32,
    depth=2,
    heads=2,
    mlp_dim=64,
    dropout=0.1,
    drop_path=0.2,
)
NOISY_RECIPE = dataclasses.replace(RECIPE, flip=True, mixup_alpha=0.4, crop=Crop(), total_steps=6)
THROUGHPUT = Throughput(images_per_step=MICRO * ACCUM, flops_per_step=1e6, peak_flops=None, seq_len=17)


def train(
    memory: Memory,
    engine,
    start: int,
    recipe: Recipe,
    *,
    log_every: int = 1,
    checkpoint_every: int = 3,
    stop_after: int | None = None,
    hooks: Hooks | None = None,
    seed: int = 11,
) -> LoopEnd:
    """The loop on `engine` from step `start`, with `memory`'s hooks (or `hooks`, which save to it)."""
    memory.engine = engine
    return pretrain_loop(
        engine,
        recipe,
        hooks or memory.hooks(stop_after),
        start_step=start,
        steps_per_epoch=STEPS_PER_EPOCH,
        cadence=Cadence(log_every, checkpoint_every),
        throughput=THROUGHPUT,
        seed=seed,
    )


def fresh_engine(recipe: Recipe = NOISY_RECIPE, zero: Zero | None = None):
    torch.manual_seed(0)  # identical initial weights, as on every rank
    return build_engine(VisionTransformer(NOISY), recipe, zero or Zero(2), world_size=1)


def weights(engine) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in engine.module.state_dict().items()}


# ---------------------------------------------------------------- randomness


def test_each_rank_draws_its_own_crops_and_masks_and_the_same_rank_and_step_draw_the_same():
    config = NOISY
    patches = torch.randint(0, 256, (8, *config.geometry.shape), dtype=torch.uint8)
    model = VisionTransformer(config).train()

    def draw(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        rng = step_randomness(11, rank, step)
        view = training_view(patches, config.geometry, NOISY_RECIPE)
        return view, model.blocks[1].drop_path(torch.ones(8, 1, 1)).flatten(), float(rng.beta(0.4, 0.4))

    rank0, again, rank1, later = draw(0, 5), draw(0, 5), draw(1, 5), draw(0, 6)
    for part in range(3):
        assert torch.equal(torch.as_tensor(rank0[part]), torch.as_tensor(again[part]))
    assert not torch.equal(rank0[0], rank1[0])  # another rank: other crop boxes and flips
    assert not torch.equal(rank0[0], later[0])  # another step: other draws
    assert rank0[2] != rank1[2]  # mixup's weight too


class RankedAs:
    """torch.distributed as vit/loop.py sees it, but for the rank it reports (DeepSpeed's own view of the
    one-rank group is left alone)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __getattr__(self, name: str):
        return getattr(torch.distributed, name)

    def get_rank(self, group=None) -> int:
        return self.rank


def test_the_loop_draws_per_rank(one_rank_group, tmp_path, monkeypatch):
    """One step from identical weights as rank 0 twice and as rank 1: rank 0 lands on the same weights both
    times, rank 1 elsewhere (its crops, flips, dropout and mixup differ). A loop seeding by step alone
    would put rank 1 on rank 0's weights."""
    one_step = dataclasses.replace(NOISY_RECIPE, total_steps=1)
    ends = {}
    for name, rank in (("first", 0), ("again", 0), ("rank1", 1)):
        monkeypatch.setattr(loop_module, "dist", RankedAs(rank))
        engine = fresh_engine(one_step)
        train(Memory(tmp_path / name), engine, 0, one_step, checkpoint_every=100)
        ends[name] = weights(engine)
    assert all(torch.equal(ends["first"][k], ends["again"][k]) for k in ends["first"])
    assert not all(torch.equal(ends["first"][k], ends["rank1"][k]) for k in ends["first"])


def test_a_resumed_run_draws_exactly_what_the_unbroken_run_drew(one_rank_group, tmp_path):
    """With every random draw on, 6 steps unbroken against 3 steps, a checkpoint, and 3 more on a new
    engine from other weights: the same weights at the end, bit for bit."""
    unbroken = Memory(tmp_path / "unbroken")
    engine = fresh_engine()
    assert train(unbroken, engine, 0, NOISY_RECIPE) == LoopEnd(6, "finished")
    expected = weights(engine)

    assert train(Memory(tmp_path / "first"), fresh_engine(), 0, NOISY_RECIPE, stop_after=3) == LoopEnd(
        3, "stopped"
    )
    torch.manual_seed(99)
    resumed = build_engine(VisionTransformer(NOISY), NOISY_RECIPE, Zero(2), world_size=1)
    load_checkpoint(resumed, tmp_path / "first", "step3")
    train(Memory(tmp_path / "second"), resumed, 3, NOISY_RECIPE)
    got = weights(resumed)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


# ---------------------------------------------------------------- host reads


READS = ("item", "tolist", "__float__", "__int__", "__bool__")


def test_the_loop_reads_the_device_only_at_log_steps(one_rank_group, tmp_path, monkeypatch):
    """Every read of a tensor's value (item, tolist, float, int, bool) made by vit/'s own code is counted
    per micro-batch: with log_every 3 over 6 steps, reads happen after the last micro-batch of steps 1
    (the first step logs), 3 and 6, and nowhere else; DeepSpeed's own reads are not vitpipe's to move."""
    vit_dir = str(Path(loop_module.__file__).parent)
    reads: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(vit_dir):
                reads.append(f"{_name} in {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    memory = Memory(tmp_path)
    marks: list[int] = []  # reads counted when each micro-batch was handed out
    batches = memory.batches

    def marked(epoch: int, position: int):
        for batch in batches(epoch, position):
            marks.append(len(reads))
            yield batch

    memory.batches = marked
    end = train(
        memory,
        fresh_engine(),
        0,
        dataclasses.replace(NOISY_RECIPE, total_steps=6),
        log_every=3,
        checkpoint_every=100,
    )
    monkeypatch.undo()
    assert end == LoopEnd(6, "finished")
    marks.append(len(reads))  # after the last step
    between = [marks[i + 1] - marks[i] for i in range(len(marks) - 1)]
    reading = {i for i, count in enumerate(between) if count}  # micro-batch i was followed by reads
    last_micro_of = {step: step * ACCUM - 1 for step in (1, 3, 6)}
    assert reading == set(last_micro_of.values()), (between, reads)
    assert [record["step"] for record in memory.records] == [1, 3, 6]


# ---------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_state_is_placed_on_its_parameters_device_in_its_dtype(fused):
    """A universal load's state (a `step` shared by the group's parameters, float64 moments, on the CPU)
    for parameters on another device (the meta device stands in for a GPU): moments move to the
    parameter's device and dtype; `step` becomes float32 and each parameter's own, on the parameter's
    device for a fused optimizer, on the CPU for torch's loop."""
    parameters = [torch.nn.Parameter(torch.empty(3, device="meta")) for _ in range(2)]
    optimizer = torch.optim.AdamW(parameters)
    optimizer.param_groups[0]["fused"] = fused
    shared_step = torch.tensor(7, dtype=torch.int64)
    for parameter in parameters:
        optimizer.state[parameter] = {
            "step": shared_step,
            "exp_avg": torch.zeros(3, dtype=torch.float64),
            "exp_avg_sq": torch.zeros(3, dtype=torch.float64),
        }
    place_optimizer_state(optimizer)
    steps = [optimizer.state[p]["step"] for p in parameters]
    for parameter, step in zip(parameters, steps, strict=True):
        state = optimizer.state[parameter]
        assert step.dtype == torch.float32
        assert step.device.type == ("meta" if fused else "cpu")
        for moment in ("exp_avg", "exp_avg_sq"):
            assert (state[moment].device, state[moment].dtype) == (parameter.device, parameter.dtype)
    assert steps[0] is not steps[1]
    if not fused:
        assert float(steps[1]) == 7


def test_the_fused_optimizer_trains_a_resumed_engine_on_the_cpu(one_rank_group, tmp_path):
    """The engine's optimizer is torch's fused AdamW on the CPU too; after a load its state is placed and
    the next step runs (fused kernels refuse state on another device or dtype)."""
    engine = fresh_engine()
    assert engine.optimizer.optimizer.param_groups[0]["fused"] is True
    train(Memory(tmp_path), engine, 0, dataclasses.replace(NOISY_RECIPE, total_steps=3))
    resumed = fresh_engine()
    load_checkpoint(resumed, tmp_path, "step3")
    torch_optimizer = resumed.optimizer.optimizer
    for parameter, state in torch_optimizer.state.items():
        assert state["step"].dtype == torch.float32
        assert state["step"].device == parameter.device
    patches, labels = Memory(tmp_path).patches[:MICRO], Memory(tmp_path).labels[:MICRO]
    train_micro_batch(resumed, patches, labels, NOISY_RECIPE, step_randomness(0, 0, 3))


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize(("stage", "reduce_dtype"), [(2, "fp32"), (2, "bf16"), (1, "fp32"), (3, "fp32")])
def test_gradients_are_reduced_and_accumulated_in_fp32_under_bf16_by_default(
    stage, reduce_dtype, one_rank_group
):
    bf16 = dataclasses.replace(NOISY_RECIPE, bf16=True)
    zero = Zero(stage, grad_reduce_dtype=reduce_dtype)
    config = deepspeed_config(bf16, zero, 1)
    assert config["communication_data_type"] == reduce_dtype
    accumulation = config.get("data_types", {}).get("grad_accum_dtype")
    assert accumulation == ("fp32" if reduce_dtype == "fp32" else None)
    engine = fresh_engine(bf16, zero)
    wanted = torch.float32 if reduce_dtype == "fp32" else torch.bfloat16
    assert engine.communication_data_type == wanted
    assert engine.get_data_types()[1] == wanted  # the gradient accumulation dtype


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_bf16_checkpoint_consolidates_into_the_fp32_master_weights(stage, one_rank_group, tmp_path):
    """Under bf16 with fp32 accumulation ZeRO-1 is DeepSpeed's BF16_Optimizer, whose files zero_to_fp32
    does not read (an export of such a run failed after all its training); every stage's checkpoint gives
    the fp32 master weights the engine holds, bit for bit."""
    # DeepSpeed picks its accelerator when first imported: not at collection, before one_rank_group's
    # DS_ACCELERATOR=cpu
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

    bf16 = dataclasses.replace(NOISY_RECIPE, bf16=True, total_steps=3)
    engine = fresh_engine(bf16, Zero(stage))
    assert (type(engine.optimizer).__name__ == "BF16_Optimizer") is (stage == 1)
    train(Memory(tmp_path), engine, 0, bf16)
    exported = consolidated_state(tmp_path, "step3")
    assert set(exported) == {name for name, _ in engine.module.named_parameters()}
    for name, parameter in engine.module.named_parameters():
        assert torch.equal(exported[name], safe_get_full_fp32_param(parameter).float()), name


def test_deepspeed_does_not_synchronise_the_device_at_each_micro_batch(one_rank_group, monkeypatch):
    """DeepSpeed's throughput timer (on by default) synchronises the accelerator as each micro-batch
    starts and steps: two host-device syncs a micro-batch on a GPU. Counted through the accelerator, which
    the timer calls on CPUs too."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (as above)

    accelerator = get_accelerator()
    calls = []
    synchronize = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: calls.append(1) or synchronize(*a, **k))
    engine = fresh_engine(dataclasses.replace(NOISY_RECIPE, bf16=True))
    losses_of(engine, NOISY_RECIPE, 10)  # 5 steps: the timer starts timing at the third
    assert calls == []


def test_zero0_under_bf16_keeps_and_exports_fp32_master_weights(one_rank_group, tmp_path):
    """ZeRO-0's own bf16 mode trains bf16 weights and a checkpoint holds nothing finer; vitpipe runs it as
    bf16 autocast over fp32 weights: what a checkpoint consolidates is those fp32 weights, bit for bit, and
    they hold updates smaller than bf16 can represent."""
    bf16 = dataclasses.replace(NOISY_RECIPE, bf16=True, total_steps=3)
    engine = fresh_engine(bf16, Zero(0))
    assert engine.torch_autocast_enabled()
    assert not engine.bfloat16_enabled()
    train(Memory(tmp_path), engine, 0, bf16)
    exported = consolidated_state(tmp_path, "step3")
    for name, parameter in engine.module.named_parameters():
        assert parameter.dtype == torch.float32
        assert torch.equal(exported[name], parameter.detach()), name
    assert any(not torch.equal(t, t.bfloat16().float()) for t in exported.values())  # finer than bf16


def test_a_zero0_bf16_checkpoint_resumes_with_its_fp32_weights(one_rank_group, tmp_path):
    bf16 = dataclasses.replace(NOISY_RECIPE, bf16=True, total_steps=3)
    engine = fresh_engine(bf16, Zero(0))
    train(Memory(tmp_path), engine, 0, bf16)
    resumed = fresh_engine(bf16, Zero(0))
    load_checkpoint(resumed, tmp_path, "step3")
    for name, tensor in weights(engine).items():
        assert torch.equal(weights(resumed)[name], tensor), name


# ---------------------------------------------------------------- speed options compute the same thing


def losses_of(engine, recipe: Recipe, steps: int) -> list[float]:
    memory = Memory(Path("unused"))
    losses = []
    for step in range(steps):
        rng = step_randomness(11, 0, step)
        start = step * MICRO % len(memory.labels)
        batch = memory.patches[start : start + MICRO], memory.labels[start : start + MICRO]
        losses.append(float(train_micro_batch(engine, *batch, recipe, rng).loss.detach()))
    return losses


@pytest.mark.parametrize("stage", [2, 3])
def test_activation_checkpointing_in_the_engine_trains_the_same_steps(stage, one_rank_group):
    """Per-block recomputation under DeepSpeed's hooks (ZeRO-3 gathers each block's weights again for the
    recompute): the same losses, step for step, as without it, dropout and drop-path included."""
    recipe = dataclasses.replace(NOISY_RECIPE, batch=BatchSplit(MICRO, MICRO))
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = VisionTransformer(NOISY)
        model.set_activation_checkpointing(checkpointing)
        runs.append(losses_of(build_engine(model, recipe, Zero(stage), world_size=1), recipe, 4))
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


@pytest.mark.slow
def test_a_compiled_engine_trains_within_a_tolerance_of_eager(one_rank_group):
    """`pretrain.compile`: DeepSpeed's engine.compile (torch.compile of the module in place) on the CPU's
    inductor, with activation checkpointing; 4 steps from the same weights and draws (crops, flips and
    mixup outside the model) give eager's losses within rel 1e-4, and the parameter names (what
    checkpoints hold) are unchanged. Dropout and drop-path are off: inside a compiled graph they draw from
    inductor's own generator, another stream than eager's."""
    recipe = dataclasses.replace(NOISY_RECIPE, batch=BatchSplit(MICRO, MICRO))
    config = dataclasses.replace(NOISY, dropout=0.0, drop_path=0.0)
    runs, names = [], []
    for compiled in (False, True):  # compiled with activation checkpointing: the two together, as on GPUs
        torch.manual_seed(0)
        model = VisionTransformer(config)
        model.set_activation_checkpointing(compiled)
        engine = build_engine(model, recipe, Zero(2), world_size=1, compile_model=compiled)
        assert engine.is_compiled is compiled
        runs.append(losses_of(engine, recipe, 4))
        names.append(list(engine.module.state_dict()))
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)
    assert names[0] == names[1]


def test_peak_memory_is_read_from_cuda_s_allocator_and_is_none_elsewhere(monkeypatch):
    """The record's `peak_memory_gb`: CUDA's allocator statistic in GiB (a host-side number, no device
    read), None on a CPU."""
    assert peak_memory_gb(torch.device("cpu")) is None
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 3 * 2**30)
    assert peak_memory_gb(torch.device("cuda", 1)) == 3.0
    assert asked == [torch.device("cuda", 1)]


def test_a_non_finite_step_between_log_steps_is_not_checkpointed_by_a_notice(one_rank_group, tmp_path):
    """The loop reads the device only at log steps; a preemption notice at a step between them must still
    find a non-finite step before it saves: the run ends 'diverged' and nothing is saved."""
    exploding = dataclasses.replace(
        RECIPE,
        optimizer=Optimizer(name="sgd", lr=1e30, weight_decay=0.0, grad_clip=None),
        schedule=Schedule(warmup_steps=0, decay="constant"),
        total_steps=20,
    )
    memory = Memory(tmp_path)
    hooks = dataclasses.replace(memory.hooks(), notice=lambda step: "checkpoint" if step == 5 else "")
    end = train(
        memory,
        fresh_engine(exploding),
        0,
        exploding,
        log_every=100,
        checkpoint_every=100,
        hooks=hooks,
        seed=0,
    )
    assert end.reason == "diverged"
    assert end.step == 5
    assert memory.saved == []


def test_after_step_sees_each_optimizer_step_s_weights_before_its_checkpoint(one_rank_group, tmp_path):
    """The EMA and the probes hang on `after_step`: called once per optimizer step with its 1-based number,
    after the weights moved and before the step's checkpoint, so a checkpoint's EMA holds its own step."""
    memory = Memory(tmp_path)
    seen: list[tuple[int, int]] = []  # (step, checkpoints saved when it was called)
    moved: list[bool] = []
    previous = {}

    def after_step(step: int) -> None:
        now = weights(memory.engine)
        moved.append(bool(previous) and not torch.equal(now["head.weight"], previous["head.weight"]))
        previous.update(now)
        seen.append((step, len(memory.saved)))

    hooks = dataclasses.replace(memory.hooks(), after_step=after_step)
    memory.engine = engine = fresh_engine()
    previous.update(weights(engine))
    end = train(memory, engine, 0, NOISY_RECIPE, log_every=2, checkpoint_every=3, hooks=hooks, seed=0)
    assert end.reason == "finished"
    assert seen == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)]  # step 3's call came before its save
    assert all(moved)  # the weights had moved by each call
