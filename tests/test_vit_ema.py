"""A rank's fragments of the fp32 master weights under every ZeRO stage, and the EMA kept on them: one-rank
gloo engines in this process (the 2 -> 1 -> 2 resharding of the EMA is in test_vit_engine.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.test_vit_engine import TINY
from vit.ema import Ema
from vit.engine import build_engine, train_micro_batch
from vit.fragments import (
    Fragment,
    Fragments,
    assemble,
    gather_full,
    load_fragments,
    local_fragments,
    parameter_shapes,
    save_fragments,
)
from vit.model import VisionTransformer
from vit.recipe import BatchSplit, Optimizer, Recipe, Schedule, Zero

DECAY = 0.9


def engine_of(stage: int, *, bf16: bool = False, offload: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    recipe = Recipe(
        Optimizer(lr=1e-2), Schedule(warmup_steps=0), total_steps=10, batch=BatchSplit(8, 8), bf16=bf16
    )
    return build_engine(VisionTransformer(TINY), recipe, Zero(stage, offload_optimizer=offload), 1), recipe


def train_steps(engine, recipe: Recipe, steps: int, after_each=lambda: None) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        patches = torch.randint(0, 256, (8, *TINY.geometry.shape), dtype=torch.uint8, generator=generator)
        labels = torch.arange(8) % TINY.num_classes
        train_micro_batch(engine, patches, labels, recipe, np.random.default_rng(0))
        after_each()


def master_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's fp32 master weights as DeepSpeed gathers them (ZeRO-0 has none: the module's own)."""
    # DeepSpeed picks its accelerator when first imported: after one_rank_group's DS_ACCELERATOR=cpu
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

    weights = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        weights[name] = (param if full is None else full).detach().float().cpu().clone()
    return weights


def test_ema_of_a_known_sequence_of_weights_is_the_closed_form(one_rank_group):
    """Weights set to w1..w5 through the live fragments, the EMA updated after each: it is
    decay^5 w0 + sum_k (1 - decay) decay^(5-k) w_k, computed in float64."""
    engine, _ = engine_of(2)
    fragments = local_fragments(engine)
    shapes = parameter_shapes(engine)
    ema = Ema(fragments, DECAY)
    expected = {name: DECAY**5 * w.double() for name, w in assemble(fragments, shapes).items()}
    generator = torch.Generator().manual_seed(5)
    for k in range(1, 6):
        with torch.no_grad():
            for piece in fragments:
                piece.tensor.copy_(torch.randn(piece.tensor.shape, generator=generator))
        ema.update()
        for name, w in assemble(fragments, shapes).items():
            expected[name] += (1 - DECAY) * DECAY ** (5 - k) * w.double()
    got = assemble(ema.pieces(), shapes)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor.float(), msg=name)


# (ZeRO stage, bf16, optimizer offload)
ENGINES = [(0, False, False), (0, True, False), (1, False, False), (1, True, False)]
ENGINES += [(2, False, False), (2, False, True), (3, False, False), (3, True, False)]


@pytest.mark.parametrize(("stage", "bf16", "offload"), ENGINES)
def test_fragments_are_the_engines_live_fp32_master_weights_and_the_ema_follows_them(
    stage, bf16, offload, one_rank_group
):
    """At every ZeRO stage (bf16 ZeRO-1 is DeepSpeed's BF16_Optimizer; ZeRO-0 bf16 runs under autocast;
    ZeRO-2 offload keeps its master on the CPU), the fragments taken before training are, after three
    steps, the master weights DeepSpeed gathers, exactly (they moved); the EMA updated after each step is,
    exactly, the EMA of the full weights read after each step."""
    engine, recipe = engine_of(stage, bf16=bf16, offload=offload)
    if stage == 1 and bf16:
        assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    fragments = local_fragments(engine)
    shapes = parameter_shapes(engine)
    assert fragments.replicated is (stage == 0)
    initial = master_weights(engine)
    ema, reference = Ema(fragments, DECAY), dict(initial)

    def after_step() -> None:
        ema.update()
        for name, weights in master_weights(engine).items():
            reference[name] = torch.lerp(reference[name], weights, 1 - DECAY)

    train_steps(engine, recipe, 3, after_step)
    master, assembled = master_weights(engine), assemble(fragments, shapes)
    assert not torch.equal(master["head.weight"], initial["head.weight"])
    assert assembled.keys() == master.keys() == gather_full(fragments, shapes).keys()
    averaged = assemble(ema.pieces(), shapes)
    for name, weights in master.items():
        torch.testing.assert_close(assembled[name], weights, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(gather_full(fragments, shapes)[name], weights, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(averaged[name], reference[name], rtol=0, atol=0, msg=name)


def test_an_ema_saved_as_rank_files_loads_exactly_into_a_fresh_engine_of_another_stage(
    one_rank_group, tmp_path
):
    """A ZeRO-2 run's EMA saved as two rank files (its pieces split between them, as two ranks would)
    loads into the fresh EMA of a ZeRO-3 engine with other weights: the same EMA, to the bit."""
    engine, recipe = engine_of(2)
    ema = Ema(local_fragments(engine), DECAY)
    train_steps(engine, recipe, 3, ema.update)
    pieces = ema.pieces().pieces
    files = [save_fragments(tmp_path / f"ema/rank-{r:05d}.safetensors", pieces[r::2]) for r in range(2)]

    other, _ = engine_of(3, seed=1)
    resumed = Ema(local_fragments(other), DECAY)
    shapes = parameter_shapes(other)
    before = assemble(resumed.pieces(), shapes)
    resumed.load(assemble(load_fragments(files), shapes))
    expected, got = assemble(ema.pieces(), shapes), assemble(resumed.pieces(), shapes)
    assert not torch.equal(before["head.weight"], expected["head.weight"])
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_assemble_refuses_a_missing_or_doubled_piece_naming_the_parameter():
    weights = torch.arange(6, dtype=torch.float32)
    halves = [Fragment("w", 0, weights[:4]), Fragment("w", 4, weights[4:])]
    assert torch.equal(assemble(reversed(halves), {"w": (2, 3)})["w"], weights.view(2, 3))
    with pytest.raises(ValueError, match=r"w: elements 4\.\.6 of 6 are in no piece"):
        assemble(halves[:1], {"w": (2, 3)})
    with pytest.raises(ValueError, match=r"w: elements 0\.\.4 of 6 are in no piece"):
        assemble(halves[1:], {"w": (2, 3)})
    with pytest.raises(ValueError, match=r"w: elements 4\.\.6 are in two pieces"):
        assemble([*halves, halves[1]], {"w": (2, 3)})
    with pytest.raises(ValueError, match=r"a piece of v .* no such parameter"):
        assemble([*halves, Fragment("v", 0, weights)], {"w": (2, 3)})
    with pytest.raises(ValueError, match="past its 6 elements"):
        assemble([Fragment("w", 2, weights)], {"w": (2, 3)})


def test_load_fragments_refuses_a_file_whose_keys_are_not_name_at_offset(tmp_path):
    path = tmp_path / "rank-00000.safetensors"
    save_file({"head.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"rank-00000.safetensors: key 'head.weight' is not NAME@OFFSET"):
        load_fragments([path])


def test_replicated_fragments_are_written_by_rank_zero_alone():
    replicated, sharded = Fragments([], replicated=True), Fragments([], replicated=False)
    assert [replicated.writes(rank) for rank in range(3)] == [True, False, False]
    assert [sharded.writes(rank) for rank in range(3)] == [True, True, True]


def test_a_compiled_engine_keeps_the_module_parameter_names(one_rank_group):
    """`engine.compile()` compiles the module in place (nn.Module.compile): no `_orig_mod.` prefix in
    the names the fragments, checkpoints and EMA files use."""
    names = [name for name, _ in VisionTransformer(TINY).named_parameters()]
    torch.manual_seed(0)
    recipe = Recipe(Optimizer(), Schedule(warmup_steps=0), total_steps=1, batch=BatchSplit(8, 8))
    engine = build_engine(VisionTransformer(TINY), recipe, Zero(2), 1, compile_model=True)
    assert engine.is_compiled
    assert [name for name, _ in engine.module.named_parameters()] == names
    assert [piece.name for piece in local_fragments(engine)] == names
