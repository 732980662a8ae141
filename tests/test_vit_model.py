"""The ViT itself: variants, pooling, the uint8 stem, initialisation, regularisers and input checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from vit.build import build_model
from vit.config import BiTConfig, ViTConfig
from vit.model import VisionTransformer, drop_path_rates
from vit.patches import patchify
from vit.variants import VARIANTS

TINY = {"width": 32, "depth": 2, "mlp_dim": 64, "heads": 2}


def tiny(**overrides) -> ViTConfig:
    return ViTConfig(**{"image_size": 32, "patch_size": 8, "num_classes": 5, **TINY, **overrides})


def uint8_patches(config: ViTConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.image_size, config.image_size, config.channels)
    return patchify(torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator), config.patch_size)


# Dosovitskiy et al., Table 1 (Ti and S from DeiT / big_vision): width, depth, MLP size, heads.
PAPER_TABLE = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_variant_configs_follow_the_paper_table(name):
    config = ViTConfig.from_variant(f"{name}/14", image_size=224)
    assert (config.width, config.depth, config.mlp_dim, config.heads) == PAPER_TABLE[name]
    assert set(VARIANTS) == set(PAPER_TABLE)
    assert config.patch_size == 14
    assert config.geometry.num_patches == 256
    assert config.seq_len == 257


def test_vit_b16_has_the_reference_parameter_count():
    model = VisionTransformer(ViTConfig.from_variant("B/16", num_classes=1000))
    # timm's vit_base_patch16_224 and HF's google/vit-base-patch16-224 both have 86,567,656 parameters.
    assert sum(p.numel() for p in model.parameters()) == 86_567_656


@pytest.mark.parametrize(
    ("overrides", "seq_len", "feature_dim"),
    [
        ({}, 17, 32),
        ({"pool": "gap"}, 16, 32),
        ({"representation_size": 24}, 17, 24),
        ({"channels": 1}, 17, 32),
    ],
)
def test_forward_shapes_for_pooling_choices(overrides, seq_len, feature_dim):
    config = tiny(**overrides)
    model = VisionTransformer(config).eval()
    patches = uint8_patches(config, batch=3)
    assert model.encode(patches).shape == (3, seq_len, 32)
    assert model.features(patches).shape == (3, feature_dim)
    assert model(patches).shape == (3, 5)
    assert (model.cls_token is None) == (config.pool == "gap")


def test_gap_pools_the_mean_of_all_patch_tokens_and_cls_the_first_token():
    patches = uint8_patches(tiny())
    cls_model = VisionTransformer(tiny()).eval()
    gap_model = VisionTransformer(tiny(pool="gap")).eval()
    with torch.no_grad():
        assert torch.equal(cls_model.features(patches), cls_model.encode(patches)[:, 0])
        torch.testing.assert_close(gap_model.features(patches), gap_model.encode(patches).mean(dim=1))


def test_pre_logits_layer_is_a_tanh_projection():
    model = VisionTransformer(tiny(representation_size=24)).eval()
    patches = uint8_patches(model.config)
    with torch.no_grad():
        pooled = model.encode(patches)[:, 0]
        expected = torch.tanh(pooled @ model.pre_logits[0].weight.T + model.pre_logits[0].bias)
        torch.testing.assert_close(model.features(patches), expected)


def test_head_starts_at_zero_and_the_rest_is_randomly_initialised():
    model = VisionTransformer(tiny())
    assert not model.head.weight.any()
    assert not model.head.bias.any()
    assert not model(uint8_patches(model.config)).any()
    assert model.stem.proj.weight.std() > 0
    assert model.pos_embed.std() > 0
    assert not model.cls_token.any()
    # LeCun normal: the patch embedding's variance is 1/fan_in.
    big = VisionTransformer(ViTConfig.from_variant("Ti/16", depth=1))
    assert big.stem.proj.weight.var().item() == pytest.approx(1 / 768, rel=0.05)


def test_stem_normalises_uint8_pixels_with_the_configured_mean_and_std():
    config = tiny(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    model = VisionTransformer(config)
    patches = uint8_patches(config)
    image_channels = patches.reshape(2, 16, 8 * 8, 3).float() / 255
    expected = (image_channels - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.5, 0.25, 0.125])
    torch.testing.assert_close(model.normalize(patches), expected.reshape(2, 16, 192))
    with torch.no_grad():
        torch.testing.assert_close(
            model(patches, normalized=False), model(model.normalize(patches), normalized=True)
        )


def test_dropout_and_drop_path_act_in_training_only():
    config = tiny(dropout=0.1, drop_path=0.2, attention_dropout=0.1)
    model = VisionTransformer(config)
    torch.nn.init.normal_(model.head.weight)
    patches = uint8_patches(config, batch=4)
    assert [block.drop_path.rate for block in model.blocks] == pytest.approx([0.0, 0.2])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(patches), model(patches))
        model.train()
        assert not torch.equal(model(patches), model(patches))


def test_every_parameter_receives_a_gradient():
    config = tiny(representation_size=16)
    model = VisionTransformer(config)
    torch.nn.init.normal_(model.head.weight)
    loss = torch.nn.functional.cross_entropy(model(uint8_patches(config)), torch.tensor([0, 1]))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_wrong_patch_size_is_rejected_with_what_was_expected():
    model = VisionTransformer(tiny())  # 8x8x3 patches, 4x4 grid
    wrong = patchify(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), 16)
    with pytest.raises(
        ValueError, match=r"expects patches \[batch, 16, 192\] \(4x4 patches of 8x8x3 for 32px images\)"
    ):
        model(wrong)
    with pytest.raises(ValueError, match=r"got shape \[2, 4, 768\] \(fits 16x16x3 patches\)"):
        model(wrong)


def test_wrong_channel_count_is_rejected():
    model = VisionTransformer(tiny())
    gray = patchify(torch.zeros(2, 32, 32, 1, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match=r"got shape \[2, 16, 64\] \(fits 8x8x1 patches\)"):
        model(gray)


def test_float_input_is_rejected_unless_marked_normalized():
    model = VisionTransformer(tiny())
    patches = uint8_patches(model.config)
    with pytest.raises(
        ValueError, match=r"expects uint8 patches .* got torch.float32 \(pass normalized=True"
    ):
        model(patches.float())
    with pytest.raises(ValueError, match=r"normalized=True expects floating-point patches; got torch.uint8"):
        model(patches, normalized=True)
    with pytest.raises(ValueError, match=r"got shape \[16, 192\]"):
        model(patches[0])


def test_invalid_configs_list_every_problem():
    with pytest.raises(
        ValueError,
        match=r"image_size 30 is not a multiple of patch_size 8.*width 32 is not divisible by heads 3",
    ):
        ViTConfig(image_size=30, patch_size=8, **{**TINY, "heads": 3})
    with pytest.raises(ValueError, match=r"mean has 3 values for 1 channel\(s\)"):
        ViTConfig(channels=1, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\) \(got 1.5\)"):
        ViTConfig(drop_path=1.5)
    with pytest.raises(ValueError, match=r"unknown variant 'Q'"):
        ViTConfig.from_variant("Q/16")


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys():
    config = tiny(channels=1, pool="gap", representation_size=8)
    assert ViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"model/config.json: unknown ViT config key\(s\) hidden_size"):
        ViTConfig.from_dict({**config.to_dict(), "hidden_size": 3}, source="model/config.json")


def test_patches_from_numpy_preprocessing_feed_the_model():
    config = tiny(channels=1)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    logits = VisionTransformer(config)(torch.from_numpy(patchify(images, 8)))
    assert logits.shape == (2, 5)


def test_vit_package_imports_neither_pipeline_nor_ray():
    code = (
        "import sys, vit.model, vit.weights, vit.hf, vit.flops, vit.posemb, vit.patches; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pipeline', 'ray')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_config_schema_and_the_vit_package_import_no_torch():
    code = (
        "import sys, vit, pipeline.config; "
        "print(sorted(m for m in ('torch', 'deepspeed', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# Parameter counts with 1000 classes at 224 px, as timm's vit_*_224 models (and HF's, for B/16) have them.
PUBLISHED_PARAMETERS = {
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "B/16": 86_567_656,
    "B/32": 88_224_232,
    "L/16": 304_326_632,
    "H/14": 632_045_800,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_every_variant_builds_on_the_meta_device_without_memory(name):
    config = ViTConfig.from_variant(name, num_classes=1000, drop_path=0.1)
    with torch.device("meta"):
        model = VisionTransformer(config)
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    model.reset_parameters()  # initialising on meta reads no values either (build_model(config, "meta"))
    assert model.blocks[-1].drop_path.rate == 0.1


@pytest.mark.parametrize(
    "config",
    [
        tiny(pool="gap", channels=1, representation_size=16, drop_path=0.1, mean=(0.2,), std=(0.3,)),
        ViTConfig.from_variant("B/16", num_classes=10),
        BiTConfig(image_size=32, patch_size=4, num_classes=10, depth=26, base_width=8, groups=8),
        BiTConfig.from_variant("R50x1", num_classes=10),
    ],
    ids=["tiny-vit-every-option", "B/16", "tiny-bit", "R50x1"],
)
def test_build_model_under_a_meta_device_context_builds_every_family_with_the_cpu_builds_parameters(config):
    cpu = build_model(config)
    with torch.device("meta"):
        in_context = build_model(config)
    built_for_meta = build_model(config, device="meta")
    for model in (in_context, built_for_meta):
        assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
        assert {n: p.shape for n, p in model.named_parameters()} == {
            n: p.shape for n, p in cpu.named_parameters()
        }
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in cpu.parameters())


def eager_and_materialised(config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """From the same seed, an eager build of `config` (ViT or BiT) and one materialised from the meta
    device, checked to make the same draws in the same order: every weight, the derived (unsaved)
    normalisation buffers, and the generator afterwards (what is drawn next, e.g. the first batch, does
    not depend on how the model was built)."""
    torch.manual_seed(0)
    eager = build_model(config)
    eager_rng = torch.get_rng_state()
    torch.manual_seed(0)
    materialised = build_model(config, device="cpu")
    expected = {**eager.state_dict(), **dict(eager.named_buffers())}
    got = {**materialised.state_dict(), **dict(materialised.named_buffers())}
    assert expected.keys() == got.keys()
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    assert torch.equal(torch.get_rng_state(), eager_rng)
    return eager, materialised


@pytest.mark.parametrize(
    "config",
    [
        tiny(depth=3, drop_path=0.2, representation_size=16, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125)),
        tiny(pool="gap", channels=1),
        ViTConfig.from_variant("Ti/16"),
    ],
    ids=["tiny-cls-prelogits", "tiny-gap-1ch", "Ti/16"],
)
def test_a_model_materialised_from_meta_is_bit_identical_to_the_eager_build(config):
    eager, materialised = eager_and_materialised(config)
    assert [b.drop_path.rate for b in materialised.blocks] == [b.drop_path.rate for b in eager.blocks]
    patches = uint8_patches(config)
    with torch.no_grad():
        assert torch.equal(materialised.eval().encode(patches), eager.eval().encode(patches))


def test_drop_path_rates_ramp_from_zero_to_exactly_the_configured_rate():
    rates = drop_path_rates(0.1, 12)
    assert rates[0] == 0.0
    assert rates[-1] == 0.1
    assert rates == pytest.approx(torch.linspace(0.0, 0.1, 12).tolist())
    assert drop_path_rates(0.1, 1) == [0.0]


def blocks_entered(model: VisionTransformer) -> list[int]:
    """Count each time any block's forward starts (a recompute stops early, so no post-forward hook)."""
    entered: list[int] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: entered.append(1))
    return entered


def seeded_step(model: torch.nn.Module, patches: torch.Tensor, checkpointed: bool):
    """Loss, every parameter's gradient and the generator's state after one seeded forward+backward."""
    model.set_activation_checkpointing(checkpointed)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout and drop-path draws for both
    loss = torch.nn.functional.cross_entropy(model(patches), torch.arange(len(patches)) % 5)
    loss.backward()
    return (
        loss.detach(),
        {name: p.grad.clone() for name, p in model.named_parameters()},
        torch.get_rng_state(),
    )


def test_activation_checkpointing_leaves_loss_and_every_gradient_unchanged_with_dropout_and_drop_path():
    config = tiny(depth=3, dropout=0.2, attention_dropout=0.2, drop_path=0.3)
    torch.manual_seed(0)
    model = VisionTransformer(config)
    torch.nn.init.normal_(model.head.weight)  # a zero head gives the blocks zero gradients
    patches = uint8_patches(config, batch=4)
    entered = blocks_entered(model)
    loss, grads, rng = seeded_step(model, patches, checkpointed=False)
    assert len(entered) == 3
    entered.clear()
    loss_checkpointed, grads_checkpointed, rng_checkpointed = seeded_step(model, patches, checkpointed=True)
    assert len(entered) == 6  # each block ran again in the backward pass: it was checkpointed
    assert torch.equal(loss_checkpointed, loss)
    assert [name for name in grads if not torch.equal(grads[name], grads_checkpointed[name])] == []
    assert torch.equal(rng_checkpointed, rng)  # the recompute replays the draws, it takes none of its own


def test_activation_checkpointing_acts_only_in_training_with_grad_and_not_on_the_attention_path():
    model = VisionTransformer(tiny())
    model.set_activation_checkpointing(True)
    patches = uint8_patches(model.config)
    entered = blocks_entered(model)
    model.eval()(patches).sum().backward()
    with torch.no_grad():
        model.train()(patches)
    _, weights = model.train().encode_with_attention(patches)
    weights[0].sum().backward()
    assert len(entered) == 3 * 2  # three passes of two blocks, none recomputed
    assert len(weights) == 2


def test_activation_checkpointing_is_a_switch_not_a_weight():
    plain = VisionTransformer(tiny())
    checkpointed = VisionTransformer(tiny())
    checkpointed.set_activation_checkpointing(True)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    checkpointed.load_state_dict(plain.state_dict())
    plain.load_state_dict(checkpointed.state_dict())
    assert checkpointed.activation_checkpointing
    assert not plain.activation_checkpointing
    checkpointed.set_activation_checkpointing(False)
    assert not checkpointed.activation_checkpointing
