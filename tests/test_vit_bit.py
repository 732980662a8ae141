"""The BiT ResNet-v2 baseline: weight standardisation and GroupNorm as defined, the patch input it shares
with the ViT, any image size and channel count, the published R50x1 size, weights saved and reloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_vit_model import eager_and_materialised
from vit.bit import PreActBottleneck, ResNetV2, StdConv2d, standardize_weight
from vit.build import build_model
from vit.config import BiTConfig
from vit.evaluate import extract_features
from vit.objective import training_loss
from vit.patches import patchify
from vit.recipe import BatchSplit, Optimizer, Recipe, Schedule
from vit.weights import load_pretrained, read_checkpoint, save_pretrained

TOY = BiTConfig(image_size=32, patch_size=4, channels=3, num_classes=10, depth=26, base_width=8, groups=8)


def random_patches(config: BiTConfig, batch: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.image_size, config.image_size, config.channels)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return patchify(images, config.patch_size)


def test_weight_standardisation_gives_each_filter_zero_mean_and_unit_variance_over_its_inputs():
    weight = torch.randn(6, 4, 3, 3) * 5 + 2
    flat = weight.reshape(6, -1).double().numpy()
    expected = (flat - flat.mean(axis=1, keepdims=True)) / np.sqrt(flat.var(axis=1, keepdims=True) + 1e-8)
    standardized = standardize_weight(weight)
    np.testing.assert_allclose(standardized.reshape(6, -1).numpy(), expected, rtol=1e-5, atol=1e-5)
    conv = StdConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(weight)
    x = torch.randn(2, 4, 8, 8)
    reference = F.conv2d(x, torch.from_numpy(expected.reshape(6, 4, 3, 3)).float(), padding=1)
    torch.testing.assert_close(conv(x), reference, rtol=1e-4, atol=1e-4)
    # Scaling a filter changes nothing: what the standardisation is for.
    with torch.no_grad():
        conv.weight.mul_(7.0)
    torch.testing.assert_close(conv(x), reference, rtol=1e-4, atol=1e-4)


def test_group_norm_normalises_each_group_of_channels_per_sample():
    model = ResNetV2(TOY)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms
    assert all(norm.num_groups == TOY.groups for norm in norms)
    unit = model.body[0]
    assert isinstance(unit, PreActBottleneck)
    x = torch.randn(2, TOY.stem_width, 5, 5) * 3 + 1
    grouped = x.reshape(2, TOY.groups, -1)
    mean, var = grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True)
    expected = ((grouped - mean) / torch.sqrt(var + unit.norm1.eps)).reshape_as(x)
    torch.testing.assert_close(unit.norm1(x), expected, rtol=1e-5, atol=1e-5)


def test_bit_reads_the_patch_tensors_as_the_image_they_were_cut_from():
    model = ResNetV2(TOY)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    rebuilt = model.image(model.normalize(patchify(images, 4)))
    expected = (images.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(rebuilt, expected.permute(0, 3, 1, 2))


@pytest.mark.parametrize(
    "config",
    [
        TOY,
        BiTConfig(image_size=16, patch_size=16, channels=1, num_classes=10, depth=26, base_width=8, groups=8),
        TOY.replace(image_size=48, patch_size=8, depth=50, width_factor=2),
    ],
    ids=["32px-3ch", "16px-1ch-one-patch", "48px-R50x2"],
)
def test_any_image_size_and_channel_count_gives_logits_and_features(config):
    model = ResNetV2(config).eval()
    patches = random_patches(config)
    logits, features = model(patches), model.features(patches)
    assert logits.shape == (4, config.num_classes)
    assert torch.equal(logits, torch.zeros_like(logits))  # the zero-initialised head
    assert features.shape == (4, config.feature_dim) == (4, 32 * config.stem_width)
    assert features.std() > 0


def test_r50x1_has_the_published_size():
    model = ResNetV2(BiTConfig.from_variant("R50x1", num_classes=1000))
    parameters = sum(p.numel() for p in model.parameters())
    assert 25.4e6 < parameters < 25.7e6  # ResNet-50: 25.5M
    assert BiTConfig.from_variant("R101x3").feature_dim == 2048 * 3


def test_a_wrong_patch_tensor_is_refused_with_what_bit_expects():
    model = ResNetV2(TOY)
    with pytest.raises(ValueError, match=r"BiT expects patches \[batch, 64, 48\]"):
        model(torch.zeros(2, 16, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="BiT expects uint8 patches"):
        model(torch.zeros(2, 64, 48))


def test_training_step_lowers_the_loss_through_the_shared_recipe():
    torch.manual_seed(0)
    model = ResNetV2(TOY)
    recipe = Recipe(Optimizer(lr=1e-2, weight_decay=0.0), Schedule(), total_steps=20, batch=BatchSplit(8, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    patches, labels = random_patches(TOY, batch=8), torch.arange(8) % 10
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(15):
        step = training_loss(model, patches, labels, recipe, rng)
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        losses.append(float(step.loss.detach()))
    # AdamW at 1e-2 on 8 images oscillates (a last step of 0.1 or 0.9 on fp32 rounding alone): the last five.
    assert np.mean(losses[-5:]) < losses[0] / 3, losses


def test_saved_bit_reloads_with_a_new_head_at_another_resolution_and_patch_size(tmp_path):
    torch.manual_seed(0)
    model = ResNetV2(TOY)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    save_pretrained(model, tmp_path, labels=[str(i) for i in range(10)])
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint.config == TOY
    assert checkpoint.labels == [str(i) for i in range(10)]

    same = load_pretrained(tmp_path)
    patches = random_patches(TOY)
    torch.testing.assert_close(same.eval()(patches), model.eval()(patches))

    moved = load_pretrained(tmp_path, image_size=48, patch_size=16, num_classes=3)
    assert moved.config.image_size == 48
    assert moved.head.weight.shape == (3, TOY.feature_dim)
    assert torch.equal(moved.head.weight, torch.zeros_like(moved.head.weight))
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(moved.state_dict()[name], tensor), name
    batches = [(random_patches(moved.config), np.zeros(4))]
    features, _ = extract_features(moved, batches, torch.device("cpu"))
    assert features.shape == (4, TOY.feature_dim)

    with pytest.raises(ValueError, match="channels: the checkpoint has 3"):
        load_pretrained(tmp_path, channels=1)


# Parameter counts with 1000 classes, as timm's resnetv2_*_bit models have them (BiT's published set).
PUBLISHED_PARAMETERS = {
    "R50x1": 25_549_352,
    "R50x3": 217_319_080,
    "R101x1": 44_541_480,
    "R101x3": 387_934_888,
    "R152x2": 236_335_208,
    "R152x4": 936_533_224,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_every_bit_variant_builds_on_the_meta_device_without_memory(name):
    model = build_model(BiTConfig.from_variant(name, num_classes=1000), device="meta")
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize(
    "config",
    [TOY, TOY.replace(channels=1, image_size=16, mean=(0.2,), std=(0.3,))],
    ids=["toy", "toy-1ch-own-normalisation"],
)
def test_a_bit_materialised_from_meta_is_bit_identical_to_the_eager_build(config):
    # BiT's convolutions keep PyTorch's default init: the replay must draw it in the constructor's order.
    eager, materialised = eager_and_materialised(config)
    with torch.no_grad():
        patches = random_patches(config)
        assert torch.equal(materialised.eval().features(patches), eager.eval().features(patches))


def seeded_step(model: ResNetV2, patches: torch.Tensor, checkpointed: bool):
    """Loss and every parameter's gradient after one seeded forward+backward."""
    model.set_activation_checkpointing(checkpointed)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = F.cross_entropy(model(patches), torch.arange(len(patches)) % 10)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_activation_checkpointing_per_unit_leaves_loss_and_every_gradient_unchanged():
    torch.manual_seed(0)
    model = ResNetV2(TOY)
    torch.nn.init.normal_(model.head.weight)  # a zero head gives the body zero gradients
    patches = random_patches(TOY, batch=2)
    entered: list[int] = []
    for unit in model.body:
        unit.register_forward_pre_hook(lambda *_: entered.append(1))
    loss, grads = seeded_step(model, patches, checkpointed=False)
    assert len(entered) == len(model.body)
    entered.clear()
    loss_checkpointed, grads_checkpointed = seeded_step(model, patches, checkpointed=True)
    assert len(entered) == 2 * len(model.body)  # each unit ran again in the backward pass
    assert torch.equal(loss_checkpointed, loss)
    assert [name for name in grads if not torch.equal(grads[name], grads_checkpointed[name])] == []
    entered.clear()
    model.eval()(patches).sum().backward()
    assert len(entered) == len(model.body)  # evaluation is not checkpointed
    assert model.state_dict().keys() == ResNetV2(TOY).state_dict().keys()
