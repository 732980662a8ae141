"""Equivalence with HF transformers' BiT (`BitForImageClassification`, pre-activation), the third-party
reference of vit/bit.py: weights both ways at two depths, two widths and four filter scales, folders both
ways."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from tests.test_vit_hf import assert_same_logits, images_for
from vit.bit import ResNetV2, StdConv2d
from vit.config import BiTConfig
from vit.hf_bit import (
    bit_config_from_hf,
    from_hf_bit_state_dict,
    hf_bit_config_dict,
    to_hf_bit_state_dict,
)
from vit.patches import patchify
from vit.weights import export_hf_folder, load_pretrained, read_checkpoint

logging.getLogger("transformers").setLevel(logging.ERROR)

CONFIGS = {
    "R26 stem8 @32": BiTConfig(image_size=32, patch_size=4, num_classes=10, depth=26, base_width=8, groups=8),
    "R50 stem16 (8x2) @48 1ch": BiTConfig(
        image_size=48,
        patch_size=8,
        channels=1,
        num_classes=7,
        depth=50,
        base_width=8,
        width_factor=2,
        groups=4,
        mean=(0.45,),
        std=(0.27,),
    ),
    "R26 stem24 @16": BiTConfig(
        image_size=16, patch_size=4, num_classes=5, depth=26, base_width=24, groups=8
    ),
}


def hf_model(config: BiTConfig, **extra) -> torch.nn.Module:
    fields = {k: v for k, v in hf_bit_config_dict(config).items() if k != "architectures"}
    return transformers.BitForImageClassification(transformers.BitConfig(**{**fields, **extra})).eval()


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere, GroupNorm scales and shifts and the head included, so that a swapped or
    dropped tensor cannot go unnoticed; the head's small enough that logits stay near 1, where fp32's
    rounding over a deep network stays far below the 1e-4 compared."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        scale = 0.02 if name.startswith(("head.", "classifier.")) else 0.2
        param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def logits_of_both(config: BiTConfig, ours: ResNetV2, theirs: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    images, pixels = images_for(config)
    with torch.no_grad():
        return ours(patchify(images, config.patch_size)), theirs(pixel_values=pixels).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_bit_weights_converted_into_vitpipe_give_the_same_logits(name):
    config = CONFIGS[name]
    theirs = perturb(hf_model(config))
    converted = bit_config_from_hf(theirs.config.to_dict(), theirs.state_dict(), None, "hf")
    assert (converted.depth, converted.stem_width, converted.groups) == (
        config.depth,
        config.stem_width,
        config.groups,
    )
    ours = ResNetV2(config).eval()
    ours.load_state_dict(from_hf_bit_state_dict(theirs.state_dict(), converted), strict=True)
    assert_same_logits(*logits_of_both(config, ours, theirs))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vitpipe_bit_weights_converted_into_hf_give_the_same_logits(name):
    config = CONFIGS[name]
    ours = perturb(ResNetV2(config).eval())
    theirs = hf_model(config)
    theirs.load_state_dict(to_hf_bit_state_dict(ours), strict=True)
    assert_same_logits(*logits_of_both(config, ours, theirs))


FILTER_SCALES = (1.0, 1e-1, 1e-2, 1e-3)  # times the default init: trained filters can be this small


@torch.no_grad()
def with_filters_scaled(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """`perturb`'s random norms and head, and every convolution filter at the model's own default init times
    `factor`: the smaller the filters' variance, the more the standardisation's epsilon weighs."""
    filters = {name: param.clone() for name, param in model.named_parameters() if param.ndim == 4}
    perturb(model)
    for name, param in model.named_parameters():
        if name in filters:
            param.copy_(filters[name] * factor)
    return model


def assert_equal_logits(config: BiTConfig, ours: ResNetV2, theirs: torch.nn.Module) -> None:
    """Both models on the same normalised pixels (not uint8 normalised twice, 1e-7 apart): the same function
    gives the same logits to fp32's last bits, not merely within the 1e-4 of `assert_same_logits`."""
    _, pixels = images_for(config)
    with torch.no_grad():
        expected = theirs(pixel_values=pixels).logits
        logits = ours(patchify(pixels.permute(0, 2, 3, 1).contiguous(), config.patch_size), normalized=True)
    assert expected.abs().max() > 0.1, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", FILTER_SCALES)
def test_hf_bit_filters_of_any_scale_give_hf_logits_in_vitpipe(factor):
    config = CONFIGS["R26 stem8 @32"]
    theirs = with_filters_scaled(hf_model(config), factor)
    ours = ResNetV2(config).eval()
    ours.load_state_dict(from_hf_bit_state_dict(theirs.state_dict(), config), strict=True)
    assert_equal_logits(config, ours, theirs)


@pytest.mark.parametrize("factor", FILTER_SCALES)
def test_vitpipe_bit_filters_of_any_scale_give_vitpipe_logits_in_hf(factor):
    config = CONFIGS["R26 stem8 @32"]
    ours = with_filters_scaled(ResNetV2(config).eval(), factor)
    theirs = hf_model(config)
    theirs.load_state_dict(to_hf_bit_state_dict(ours), strict=True)
    assert_equal_logits(config, ours, theirs)


@pytest.mark.parametrize("factor", FILTER_SCALES)
def test_vitpipe_and_hf_standardise_the_same_filters_to_the_same_weights(factor):
    """Each side's standardisation on the other's convolution: HF's default-init filters through
    vitpipe's `standardize_weight`, vitpipe's through HF's `WeightStandardizedConv2d`."""
    hf_conv = hf_model(CONFIGS["R26 stem8 @32"]).bit.encoder.stages[0].layers[0].conv2
    ours = StdConv2d(hf_conv.in_channels, hf_conv.out_channels, 3, padding=1)
    x = torch.randn(2, hf_conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for source, target in ((hf_conv, ours), (ours, hf_conv)):
            source.weight.mul_(factor)
            target.weight.copy_(source.weight)
            torch.testing.assert_close(ours(x), hf_conv(x), rtol=1e-6, atol=1e-7)


def test_the_pooled_features_are_hf_bit_models_pooler_output():
    config = CONFIGS["R26 stem8 @32"]
    ours = perturb(ResNetV2(config).eval())
    backbone = transformers.BitModel(transformers.BitConfig(**hf_bit_config_dict(config))).eval()
    state = {k.removeprefix("bit."): v for k, v in to_hf_bit_state_dict(ours).items() if k.startswith("bit.")}
    backbone.load_state_dict(state, strict=True)
    images, pixels = images_for(config)
    with torch.no_grad():
        pooled = backbone(pixel_values=pixels).pooler_output.flatten(1)
        torch.testing.assert_close(ours.features(patchify(images, 4)), pooled, atol=1e-4, rtol=0)


def test_exported_bit_folder_loads_in_hf_with_its_image_processor_and_agrees(tmp_path):
    config = CONFIGS["R26 stem24 @16"]
    ours = perturb(ResNetV2(config.replace(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))).eval())
    export_hf_folder(ours, tmp_path / "hf", labels=["a", "b", "c", "d", "e"])
    theirs, info = transformers.BitForImageClassification.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert theirs.config.id2label == dict(enumerate("abcde"))
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    images, _ = images_for(ours.config)
    pixels = processor(images=list(images.numpy()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert_same_logits(ours(patchify(images, 4)), theirs.eval()(pixel_values=pixels).logits)


def test_hf_saved_bit_folder_loads_as_a_vitpipe_model_for_fine_tuning(tmp_path):
    config = CONFIGS["R50 stem16 (8x2) @48 1ch"]
    theirs = perturb(hf_model(config, id2label={i: f"class{i}" for i in range(7)}))
    theirs.save_pretrained(tmp_path / "hf")  # no preprocessor: vitpipe's 0.5/0.5 and HF's 224 px
    checkpoint = read_checkpoint(tmp_path / "hf")
    assert checkpoint.labels == [f"class{i}" for i in range(7)]
    assert (checkpoint.config.depth, checkpoint.config.stem_width) == (50, 16)

    same = load_pretrained(tmp_path / "hf", image_size=48, patch_size=8).eval()
    images = torch.randint(
        0, 256, (2, 48, 48, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    pixels = ((images.float() / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert_same_logits(same(patchify(images, 8)), theirs(pixel_values=pixels).logits)

    fine_tune = load_pretrained(tmp_path / "hf", image_size=48, patch_size=8, num_classes=3)
    assert not fine_tune.head.weight.any()  # a new zero head; the backbone is HF's, tensor by tensor
    hf_backbone = from_hf_bit_state_dict(theirs.state_dict(), checkpoint.config)
    for key, tensor in fine_tune.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(tensor, hf_backbone[key]), key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer_type": "bottleneck"}, r"layer_type='bottleneck' is not supported"),
        ({"global_padding": "SAME"}, r"global_padding='SAME' is not supported"),
        ({"depths": [2, 3, 4, 2]}, r"depths \[2, 3, 4, 2\] are no BiT depth vitpipe builds"),
        ({"hidden_sizes": [32, 64, 128, 512]}, r"hidden_sizes \[32, 64, 128, 512\] .* are not 4, 8, 16"),
    ],
)
def test_hf_bit_configs_vitpipe_cannot_express_are_refused(change, message):
    theirs = hf_model(CONFIGS["R26 stem8 @32"])
    with pytest.raises(ValueError, match=rf"x/config.json: {message}"):
        bit_config_from_hf({**theirs.config.to_dict(), **change}, theirs.state_dict(), None, "x/config.json")


def test_missing_or_unknown_hf_bit_weights_are_named():
    config = CONFIGS["R26 stem8 @32"]
    state = dict(hf_model(config).state_dict())
    del state["bit.encoder.stages.1.layers.0.downsample.conv.weight"]
    with pytest.raises(
        ValueError, match=r"HF weight 'encoder.stages.1.layers.0.downsample.conv.weight' missing"
    ):
        from_hf_bit_state_dict(state, config)
    state = {**hf_model(config).state_dict(), "bit.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"HF weights not understood: \['extra.weight'\]"):
        from_hf_bit_state_dict(state, config)
