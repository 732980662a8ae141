"""The fine-tuning loop: the paper's recipe, best-on-validation weights, linear probe, accumulation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.test_vit_device import count_host_reads
from vit.config import ViTConfig
from vit.finetune import finetune, freeze_backbone
from vit.model import VisionTransformer
from vit.recipe import BatchSplit, Optimizer, Recipe, Schedule

CPU = torch.device("cpu")
CONFIG = ViTConfig(image_size=8, patch_size=4, num_classes=3, width=16, depth=1, heads=2, mlp_dim=32)


def batches(size: int, seed: int = 0):
    """An endless stream of a fixed set of 24 samples, in `size`-sample batches, always in the same order."""
    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 256, (24, 4, 48), dtype=np.uint8)
    labels = rng.integers(0, 3, 24)
    for start in itertools.cycle(range(0, 24, size)):
        yield patches[start : start + size], labels[start : start + size]


def paper_spec(lr: float = 0.03, **changes) -> Recipe:
    optimizer = Optimizer(name="sgd", lr=lr, momentum=0.9, weight_decay=0.0, grad_clip=1.0)
    settings = {"total_steps": 6, "batch": BatchSplit(8, 8), "flip": False, **changes}
    return Recipe(optimizer, Schedule(warmup_steps=2, decay="cosine"), **settings)


def model(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(CONFIG)


def test_records_follow_the_warmup_and_cosine_schedule_of_sgd_momentum():
    records = finetune(model(), batches(8), paper_spec(), device=CPU, log_every=1).records
    lrs = [r["lr"] for r in records]
    assert lrs[:2] == pytest.approx([0.015, 0.03])  # linear warmup over two steps
    assert lrs[2:] == sorted(lrs[2:], reverse=True)
    assert all(r["grad_norm"] >= 0 and 0 <= r["accuracy"] <= 1 for r in records)


def test_the_weights_of_the_best_validation_score_are_returned():
    scores = iter([0.2, 0.7, 0.4])
    seen = {}
    net = model()

    def validate(candidate):
        seen[len(seen)] = {k: v.clone() for k, v in candidate.state_dict().items()}
        return next(scores)

    outcome = finetune(net, batches(8), paper_spec(), device=CPU, validate=validate, validate_every=2)
    assert outcome.best_step == 4
    assert outcome.best_score == 0.7
    for key, tensor in seen[1].items():
        torch.testing.assert_close(outcome.best_state[key], tensor)
    assert not torch.equal(outcome.best_state["head.weight"], net.state_dict()["head.weight"])
    assert [r["val_top1"] for r in outcome.records if "val_top1" in r] == [0.2, 0.7, 0.4]


def test_without_validation_the_final_weights_are_kept():
    net = model()
    outcome = finetune(net, batches(8), paper_spec(), device=CPU)
    assert outcome.best_step == 6
    assert outcome.best_score is None
    for key, tensor in net.state_dict().items():
        torch.testing.assert_close(outcome.best_state[key], tensor)


def test_a_frozen_backbone_trains_the_head_alone():
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainable = freeze_backbone(net)
    assert trainable == net.head.weight.numel() + net.head.bias.numel()
    finetune(net, batches(8), paper_spec(lr=0.3), device=CPU)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}


def test_accumulated_micro_batches_make_the_same_step_as_one_batch():
    whole, split = model(), model()
    finetune(whole, batches(8), paper_spec(), device=CPU)
    finetune(split, batches(4), paper_spec(batch=BatchSplit(4 * 2, 4)), device=CPU)
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_nothing_trainable_is_an_error():
    net = model()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter is trainable"):
        finetune(net, batches(8), paper_spec(), device=CPU)


def exploding_recipe() -> Recipe:
    optimizer = Optimizer(name="sgd", lr=1e30, weight_decay=0.0, grad_clip=None)
    schedule = Schedule(warmup_steps=0, decay="constant")
    return Recipe(optimizer, schedule, total_steps=20, batch=BatchSplit(8, 8), flip=False)


def test_a_diverging_fine_tune_stops_at_the_step_naming_the_values():
    with pytest.raises(FloatingPointError, match=r"fine-tuning diverged at step \d+: loss"):
        finetune(model(), batches(8), exploding_recipe(), device=CPU, log_every=1)


def test_divergence_is_found_at_the_next_record_naming_the_steps_since_the_last():
    with pytest.raises(FloatingPointError, match=r"fine-tuning diverged in steps 1-5: loss"):
        finetune(model(), batches(8), exploding_recipe(), device=CPU, log_every=5)


def test_the_loop_reads_values_back_from_the_device_only_at_record_steps(monkeypatch):
    """On a GPU every read of a value waits for the queued steps: one a micro-batch (a loss, a correct
    count, a gradient norm) would leave the GPU idle between steps. Here 6 steps of 2 micro-batches,
    recorded every 2 steps: three records, one read each."""
    net = model()
    counts = count_host_reads(monkeypatch)
    outcome = finetune(net, batches(4), paper_spec(batch=BatchSplit(4 * 2, 4)), device=CPU, log_every=2)
    reads = dict(counts)
    assert len(outcome.records) == 3
    assert reads == {"tolist": 3}
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in outcome.records)


@pytest.mark.slow  # inductor compiles the forward and backward graphs to C++: about 45 s here, cold
def test_a_compiled_fine_tune_computes_what_the_eager_one_does():
    """`compile_forward` trains through a compiled forward: the same losses step by step (fused kernels
    reorder float sums, hence a tolerance) and the same weights, kept on the plain module."""
    eager, compiled = model(), model()
    spec = paper_spec(total_steps=5)
    eager_losses = [r["loss"] for r in finetune(eager, batches(8), spec, device=CPU, log_every=1).records]
    outcome = finetune(compiled, batches(8), spec, device=CPU, log_every=1, compile_forward=True)
    assert [r["loss"] for r in outcome.records] == pytest.approx(eager_losses, rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), outcome.best_state.values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
