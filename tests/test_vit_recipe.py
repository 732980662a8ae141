"""The recipe and the one training step of `vit/`: parameter groups, schedules, patch-space augmentation,
the soft-target loss, and the DeepSpeed config a recipe becomes."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from vit.augment import hflip_patches, mixup, soft_targets
from vit.config import ViTConfig
from vit.engine import deepspeed_config
from vit.flops import gpu_peak_flops, measured_matmul_flops
from vit.model import VisionTransformer
from vit.objective import param_groups, soft_cross_entropy, training_loss
from vit.patches import PatchGeometry, patchify
from vit.recipe import BatchSplit, Optimizer, Recipe, Schedule, Zero

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
    schedule = Schedule(warmup_steps=10, decay=decay, min_lr_ratio=0.1)
    at = lambda step: schedule.multiplier(step, total_steps=110)  # noqa: E731
    assert [at(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert at(9) == pytest.approx(1.0)
    assert at(10) == pytest.approx(1.0)
    assert at(60) == pytest.approx(0.55)  # halfway: both shapes pass the midpoint
    assert at(110) == pytest.approx(0.1)
    assert at(500) == pytest.approx(0.1)
    values = [at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_constant_schedule_stays_at_the_peak_after_warmup():
    schedule = Schedule(warmup_steps=0, decay="constant")
    assert {schedule.multiplier(s, 100) for s in (0, 50, 99)} == {1.0}


def test_the_rate_of_a_step_follows_the_run_s_own_budget_so_an_extended_run_decays_anew():
    """The rate is a function of (step, recipe): resuming step 80 of a run extended from 80 to 160 steps
    trains at the longer schedule's rate, not the one a saved scheduler state would carry."""
    short = Recipe(Optimizer(lr=1.0), Schedule(warmup_steps=0), total_steps=80, batch=BatchSplit(1, 1))
    extended = Recipe(Optimizer(lr=1.0), Schedule(warmup_steps=0), total_steps=160, batch=BatchSplit(1, 1))
    assert short.lr_at(80) == pytest.approx(0.0)
    assert extended.lr_at(80) == pytest.approx(0.5)
    assert extended.lr_at(40) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))


@pytest.mark.parametrize(
    ("section", "changes", "message"),
    [
        (Optimizer, {"lr": 0.0}, "lr must be positive"),
        (Optimizer, {"betas": (0.9, 1.0)}, r"betas\[1\] must be in \[0, 1\)"),
        (Optimizer, {"grad_clip": -1.0}, "grad_clip must be positive"),
        (Schedule, {"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\]"),
        (Zero, {"stage": 4}, "ZeRO stage must be 0, 1, 2 or 3"),
    ],
)
def test_recipe_sections_refuse_values_that_cannot_train(section, changes, message):
    required = {"stage": 2} if section is Zero else {}
    with pytest.raises(ValueError, match=message):
        section(**{**required, **changes})


def test_flip_in_patch_space_equals_patchifying_the_mirrored_image():
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    patches = torch.from_numpy(patchify(images, 4))
    mirrored = torch.from_numpy(patchify(images[:, :, ::-1].copy(), 4))
    geometry = PatchGeometry(16, 4, 3)
    assert torch.equal(hflip_patches(patches, geometry), mirrored)
    chosen = hflip_patches(patches, geometry, torch.tensor([True, False, True]))
    assert torch.equal(chosen[0], mirrored[0])
    assert torch.equal(chosen[1], patches[1])
    assert torch.equal(hflip_patches(hflip_patches(patches, geometry), geometry), patches)


def test_flip_of_a_non_square_patch_count_is_refused_not_guessed():
    patches = torch.zeros(2, 15, 48, dtype=torch.uint8)  # 15 patches: no 16px / patch 4 image
    with pytest.raises(RuntimeError):
        hflip_patches(patches, PatchGeometry(16, 4, 3))


def test_label_smoothing_and_mixup_keep_targets_distributions():
    targets = soft_targets(torch.tensor([0, 2]), num_classes=4, smoothing=0.2)
    assert targets[0].tolist() == pytest.approx([0.85, 0.05, 0.05, 0.05])
    assert targets.sum(1).tolist() == pytest.approx([1.0, 1.0])
    images = torch.randn(2, 3, 8)
    mixed, mixed_targets = mixup(images.clone(), targets.clone(), 0.7)
    assert torch.allclose(mixed[0], 0.7 * images[0] + 0.3 * images[1])
    assert mixed_targets[0].tolist() == pytest.approx((0.7 * targets[0] + 0.3 * targets[1]).tolist())


def test_deepspeed_config_splits_the_batch_and_merges_extra_keys():
    recipe = Recipe(
        Optimizer(grad_clip=1.0), Schedule(), total_steps=10, batch=BatchSplit(64, 8, 2), bf16=True
    )
    extra = {"zero_optimization": {"sub_group_size": 10**8}, "comms_logger": {"enabled": False}}
    zero = Zero(
        3,
        offload_optimizer=True,
        extra=extra,
        overlap_comm=False,
        reduce_bucket_size=2**20,
        allgather_bucket_size=2**18,
    )
    config = deepspeed_config(recipe, zero, world_size=2)
    assert config["train_batch_size"] == 64
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "overlap_comm": False,
        "reduce_bucket_size": 2**20,
        "stage3_prefetch_bucket_size": 2**18,
        "contiguous_gradients": True,
        "sub_group_size": 10**8,
    }
    # No all-gather size of vitpipe's own by default: DeepSpeed's (5e8 at stages 1-2, 5e7 at stage 3).
    assert "stage3_prefetch_bucket_size" not in deepspeed_config(recipe, Zero(3), 2)["zero_optimization"]
    with pytest.raises(ValueError, match="the recipe's batch is split for 2 rank"):
        deepspeed_config(recipe, zero, world_size=1)
    assert config["timers"] == {"throughput": {"enabled": False}}  # its timer syncs every micro-batch
    assert config["bf16"] == {"enabled": True}
    assert config["comms_logger"] == {"enabled": False}
    assert "scheduler" not in config  # the loop sets each step's rate itself
    assert deepspeed_config(recipe, zero, 2, load_universal=True)["checkpoint"] == {"load_universal": True}


def test_deepspeed_keys_vitpipe_derives_cannot_be_overridden():
    with pytest.raises(ValueError, match=r"\['train_batch_size'\] are derived from vitpipe"):
        Zero(2, extra={"train_batch_size": 99})
    with pytest.raises(ValueError, match=r"zero_optimization.overlap_comm.*set those instead"):
        Zero(2, extra={"zero_optimization": {"overlap_comm": False}})


def test_peak_flops_come_from_the_datasheet_table_or_a_measurement():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", bf16=True) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", bf16=True) == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", bf16=False) == 156e12
    assert gpu_peak_flops("Some Future GPU", bf16=True) is None
    assert measured_matmul_flops(size=256, seconds=0.05) > 1e8


def test_soft_cross_entropy_of_one_hot_targets_is_cross_entropy():
    logits = torch.randn(4, 5, dtype=torch.bfloat16)
    labels = torch.tensor([0, 3, 4, 1])
    expected = torch.nn.functional.cross_entropy(logits.float(), labels)
    assert soft_cross_entropy(logits, soft_targets(labels, 5)).item() == pytest.approx(expected.item())


def test_the_training_step_flips_smooths_and_mixes_as_the_recipe_says():
    """`training_loss` is the step of every loop: with flip and mixup off its loss is the plain
    cross-entropy of the model's logits against smoothed targets; flip changes what the model sees."""
    torch.manual_seed(0)
    model = VisionTransformer(TINY)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would give every input the same logits
    patches = torch.randint(0, 256, (6, *TINY.geometry.shape), dtype=torch.uint8)
    labels = torch.arange(6) % TINY.num_classes
    plain = Recipe(
        Optimizer(), Schedule(), total_steps=1, batch=BatchSplit(6, 6), flip=False, label_smoothing=0.1
    )

    def loss(recipe: Recipe) -> float:
        return training_loss(model, patches, labels, recipe, np.random.default_rng(0)).loss.item()

    result = training_loss(model, patches, labels, plain, np.random.default_rng(0))
    logits = model(patches)
    expected = soft_cross_entropy(logits, soft_targets(labels, TINY.num_classes, 0.1))
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert result.correct == int((logits.argmax(-1) == labels).sum())
    assert result.images == 6
    assert loss(dataclasses.replace(plain, mixup_alpha=0.4)) != pytest.approx(result.loss.item())
    torch.manual_seed(1)
    assert loss(dataclasses.replace(plain, flip=True)) != pytest.approx(result.loss.item())
