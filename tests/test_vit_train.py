"""The training math of `vit/`: parameter groups, schedules, patch-space augmentation, DeepSpeed config."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vit.augment import hflip_patches, mixup, soft_targets
from vit.config import ViTConfig
from vit.flops import gpu_peak_flops, measured_matmul_flops
from vit.model import VisionTransformer
from vit.optim import WarmupDecay, param_groups
from vit.patches import patchify
from vit.train import TrainSpec, deepspeed_config

TINY = ViTConfig(
    image_size=16, patch_size=4, channels=3, num_classes=5, width=32, depth=2, heads=2, mlp_dim=64
)


def test_weight_decay_applies_to_weight_matrices_only():
    model = VisionTransformer(TINY)
    decayed, plain = param_groups(model, weight_decay=0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert decayed["weight_decay"] == 0.1
    assert plain["weight_decay"] == 0.0
    assert "stem.proj.weight" in decayed_names
    assert "blocks.0.attn.qkv.weight" in decayed_names
    assert "head.weight" in decayed_names
    assert {"pos_embed", "cls_token", "stem.proj.bias", "blocks.0.norm1.weight", "norm.bias"} <= plain_names
    assert not any(name.endswith("bias") or "norm" in name for name in decayed_names)
    assert len(decayed_names) + len(plain_names) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out_of_the_groups():
    model = VisionTransformer(TINY)
    model.pos_embed.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert all(p is not model.pos_embed for group in groups for p in group["params"])


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warms_up_linearly_then_decays_to_the_floor(decay):
    schedule = WarmupDecay(total_steps=110, warmup_steps=10, decay=decay, floor=0.1)
    assert [schedule(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)  # halfway: both shapes pass the midpoint
    assert schedule(110) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_constant_schedule_stays_at_the_peak_after_warmup():
    schedule = WarmupDecay(total_steps=100, warmup_steps=0, decay="constant")
    assert {schedule(s) for s in (0, 50, 99)} == {1.0}


def test_lr_scheduler_state_saves_the_schedule_settings():
    model = VisionTransformer(TINY)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(100, 10))
    state = scheduler.state_dict()
    assert state["lr_lambdas"][0] == {"total_steps": 100, "warmup_steps": 10, "decay": "cosine", "floor": 0.0}


def test_flip_in_patch_space_equals_patchifying_the_mirrored_image():
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    patches = torch.from_numpy(patchify(images, 4))
    mirrored = torch.from_numpy(patchify(images[:, :, ::-1].copy(), 4))
    assert torch.equal(hflip_patches(patches, 4, 3), mirrored)
    chosen = hflip_patches(patches, 4, 3, torch.tensor([True, False, True]))
    assert torch.equal(chosen[0], mirrored[0])
    assert torch.equal(chosen[1], patches[1])
    assert torch.equal(hflip_patches(hflip_patches(patches, 4, 3), 4, 3), patches)


def test_label_smoothing_and_mixup_keep_targets_distributions():
    targets = soft_targets(torch.tensor([0, 2]), num_classes=4, smoothing=0.2)
    assert targets[0].tolist() == pytest.approx([0.85, 0.05, 0.05, 0.05])
    assert targets.sum(1).tolist() == pytest.approx([1.0, 1.0])
    images = torch.randn(2, 3, 8)
    mixed, mixed_targets = mixup(images.clone(), targets.clone(), 0.7)
    assert torch.allclose(mixed[0], 0.7 * images[0] + 0.3 * images[1])
    assert mixed_targets[0].tolist() == pytest.approx((0.7 * targets[0] + 0.3 * targets[1]).tolist())


def test_deepspeed_config_splits_the_batch_and_merges_extra_keys():
    spec = TrainSpec(
        total_steps=10, micro_batch_size=8, grad_accum=4, zero_stage=3, offload_optimizer=True, bf16=True,
        grad_clip=1.0,
        extra_deepspeed={"zero_optimization": {"overlap_comm": True}, "comms_logger": {"enabled": False}},
    )  # fmt: skip
    config = deepspeed_config(spec, world_size=2)
    assert config["train_batch_size"] == 64
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}, "overlap_comm": True,
    }  # fmt: skip
    assert config["bf16"] == {"enabled": True}
    assert config["comms_logger"] == {"enabled": False}
    assert deepspeed_config(spec, 2, load_universal=True)["checkpoint"] == {"load_universal": True}


def test_deepspeed_keys_vitpipe_derives_cannot_be_overridden():
    spec = TrainSpec(total_steps=1, micro_batch_size=8, extra_deepspeed={"train_batch_size": 99})
    with pytest.raises(ValueError, match=r"\['train_batch_size'\] are derived from vitpipe"):
        deepspeed_config(spec, 1)


def test_peak_flops_come_from_the_datasheet_table_or_a_measurement():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", bf16=True) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", bf16=True) == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", bf16=False) == 156e12
    assert gpu_peak_flops("Some Future GPU", bf16=True) is None
    assert measured_matmul_flops(size=256, seconds=0.05) > 1e8


@pytest.mark.parametrize(("stage", "offload"), [(0, False), (2, False), (3, False), (2, True)])
def test_bf16_deepspeed_engine_trains_on_uint8_patches(stage, offload, one_rank_group):
    """The GPU recipe's path (bf16 weights, fp32 loss) on DeepSpeed's CPU accelerator: it learns a batch,
    with the optimizer state offloaded too."""
    from vit.train import build_engine, train_micro_batch

    torch.manual_seed(0)
    spec = TrainSpec(
        total_steps=30, micro_batch_size=8, zero_stage=stage, offload_optimizer=offload, bf16=True,
        warmup_steps=0, lr=3e-3,
    )  # fmt: skip
    engine = build_engine(VisionTransformer(TINY), spec, world_size=1)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    patches = torch.randint(0, 256, (8, TINY.num_patches, TINY.patch_dim), dtype=torch.uint8)
    labels = torch.arange(8) % TINY.num_classes
    rng = np.random.default_rng(0)
    results = [train_micro_batch(engine, patches, labels, spec, rng) for _ in range(30)]
    assert results[-1].loss < results[0].loss / 2
    assert results[-1].correct == 8


def test_soft_cross_entropy_of_one_hot_targets_is_cross_entropy():
    from vit.train import soft_cross_entropy

    logits = torch.randn(4, 5, dtype=torch.bfloat16)
    labels = torch.tensor([0, 3, 4, 1])
    expected = torch.nn.functional.cross_entropy(logits.float(), labels)
    assert soft_cross_entropy(logits, soft_targets(labels, 5)).item() == pytest.approx(expected.item())
