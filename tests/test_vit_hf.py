"""Equivalence with HF transformers' ViT, the third-party reference: weights both ways, files both ways."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

from vit.config import Architecture, ViTConfig
from vit.hf import config_from_hf, export_hf, from_hf_state_dict, hf_config_dict, to_hf_state_dict
from vit.model import VisionTransformer
from vit.patches import patchify
from vit.weights import load_pretrained, read_checkpoint

logging.getLogger("transformers").setLevel(logging.ERROR)

CONFIGS = {
    "Ti/16@224": ViTConfig.from_variant("Ti/16", image_size=224, num_classes=10, layer_norm_eps=1e-12),
    "S/8@32 1ch": ViTConfig.from_variant("S/8", image_size=32, channels=1, num_classes=7),
    "w48 d3 p12@48": ViTConfig(
        image_size=48,
        patch_size=12,
        num_classes=3,
        width=48,
        depth=3,
        mlp_dim=96,
        heads=4,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
}


def hf_model(config: ViTConfig, **extra) -> torch.nn.Module:
    fields = {k: v for k, v in hf_config_dict(config).items() if k != "architectures"}
    return transformers.ViTForImageClassification(transformers.ViTConfig(**{**fields, **extra})).eval()


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere, LayerNorms and biases included, so a swapped tensor cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def images_for(config: Architecture, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [B, H, W, C] and the same images as HF's normalised pixel_values [B, C, H, W]."""
    generator = torch.Generator().manual_seed(1)
    shape = (batch, config.image_size, config.image_size, config.channels)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    pixels = (images.float() / 255 - torch.tensor(config.mean)) / torch.tensor(config.std)
    return images, pixels.permute(0, 3, 1, 2)


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.abs().max() > 0.1, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_weights_converted_into_vitpipe_give_the_same_logits(name):
    config = CONFIGS[name]
    theirs = perturb(hf_model(config))
    converted = config_from_hf(theirs.config.to_dict(), theirs.state_dict(), None, "hf")
    assert converted.replace(mean=config.mean, std=config.std) == config
    ours = VisionTransformer(converted.replace(mean=config.mean, std=config.std)).eval()
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), converted))
    images, pixels = images_for(config)
    with torch.no_grad():
        assert_same_logits(ours(patchify(images, config.patch_size)), theirs(pixel_values=pixels).logits)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vitpipe_weights_converted_into_hf_give_the_same_logits(name):
    config = CONFIGS[name]
    ours = perturb(VisionTransformer(config).eval())
    theirs = hf_model(config)
    theirs.load_state_dict(to_hf_state_dict(ours, layout="modules"), strict=True)
    images, pixels = images_for(config)
    with torch.no_grad():
        assert_same_logits(ours(patchify(images, config.patch_size)), theirs(pixel_values=pixels).logits)


def test_exported_folder_loads_in_hf_with_its_image_processor_and_agrees(tmp_path):
    config = CONFIGS["w48 d3 p12@48"]
    ours = perturb(VisionTransformer(config).eval())
    export_hf(ours, tmp_path / "hf", labels=["cat", "dog", "bird"])

    theirs, info = transformers.ViTForImageClassification.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert theirs.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    images, _ = images_for(config)
    pixels = processor(images=list(images.numpy()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert_same_logits(
            ours(patchify(images, config.patch_size)), theirs.eval()(pixel_values=pixels).logits
        )


def test_hf_saved_folder_loads_as_a_vitpipe_model(tmp_path):
    config = CONFIGS["Ti/16@224"]
    theirs = perturb(hf_model(config, id2label={i: f"class{i}" for i in range(10)}))
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    assert read_checkpoint(tmp_path / "hf").labels == [f"class{i}" for i in range(10)]
    images, pixels = images_for(config)
    with torch.no_grad():
        assert_same_logits(ours(patchify(images, config.patch_size)), theirs(pixel_values=pixels).logits)


def test_sharded_hf_checkpoint_loads(tmp_path):
    config = CONFIGS["w48 d3 p12@48"]
    theirs = perturb(hf_model(config))
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_pretrained(tmp_path / "hf").eval()
    images, _ = images_for(ours.config)
    pixels = (images.float() / 255 - 0.5) / 0.5  # no preprocessor_config.json: HF ViT's default 0.5/0.5
    with torch.no_grad():
        assert_same_logits(ours(patchify(images, 12)), theirs(pixel_values=pixels.permute(0, 3, 1, 2)).logits)


def test_headless_vit_model_with_pooler_becomes_pre_logits_then_is_dropped_for_fine_tuning(tmp_path):
    config = CONFIGS["S/8@32 1ch"]
    fields = {k: v for k, v in hf_config_dict(config).items() if k != "architectures"}
    backbone = perturb(transformers.ViTModel(transformers.ViTConfig(**fields), add_pooling_layer=True).eval())
    backbone.save_pretrained(tmp_path / "in21k")
    images, pixels = images_for(config)
    with torch.no_grad():
        reference = backbone(pixel_values=pixels)

    with_pooler = load_pretrained(tmp_path / "in21k", num_classes=4).eval()
    assert with_pooler.config.representation_size == 384
    assert not with_pooler.head.weight.any()
    fine_tune = load_pretrained(tmp_path / "in21k", num_classes=4, representation_size=None).eval()
    with torch.no_grad():
        patches = patchify(images, 8)
        torch.testing.assert_close(with_pooler.features(patches), reference.pooler_output, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            fine_tune.features(patches), reference.last_hidden_state[:, 0], atol=1e-4, rtol=0
        )


EXECUTED: list[str] = []


def _record_execution() -> None:
    EXECUTED.append("pickled code ran")


class Payload:
    """Unpickling this calls _record_execution: the kind of object a malicious weights file carries."""

    def __reduce__(self):
        return (_record_execution, ())


def test_pytorch_bin_weights_are_read_without_executing_pickled_code(tmp_path):
    config = CONFIGS["w48 d3 p12@48"]
    theirs = perturb(hf_model(config))
    (tmp_path / "config.json").write_text(json.dumps(theirs.config.to_dict()))
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    assert load_pretrained(tmp_path).config.width == 48

    torch.save({"payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot be read with weights_only=True"):
        load_pretrained(tmp_path)
    assert not EXECUTED, "unpickling ran code from the weights file"


@pytest.mark.parametrize(
    ("overrides", "what"),
    [({"pool": "gap"}, "pool='gap'"), ({"representation_size": 8}, "representation_size=8")],
)
def test_export_refuses_what_hf_vit_cannot_express(tmp_path, overrides, what):
    model = VisionTransformer(CONFIGS["w48 d3 p12@48"].replace(**overrides))
    with pytest.raises(ValueError, match=rf"classifies the class token with no pre-logits layer.*{what}"):
        export_hf(model, tmp_path)


def test_checkpoint_without_qkv_biases_converts_with_zero_biases():
    config = CONFIGS["w48 d3 p12@48"]
    theirs = perturb(hf_model(config, qkv_bias=False))
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), config))
    assert not ours.blocks[0].attn.qkv.bias.any()
    images, pixels = images_for(config)
    with torch.no_grad():
        assert_same_logits(ours(patchify(images, 12)), theirs(pixel_values=pixels).logits)


def test_incomplete_hf_config_or_weights_are_named():
    theirs = hf_model(CONFIGS["w48 d3 p12@48"])
    hf_config = theirs.config.to_dict()
    del hf_config["hidden_size"]
    with pytest.raises(ValueError, match=r"x/config.json: HF config lacks \['hidden_size'\]"):
        config_from_hf(hf_config, theirs.state_dict(), None, "x/config.json")
    state = dict(theirs.state_dict())
    del state["vit.layers.2.mlp.fc1.weight"]
    with pytest.raises(ValueError, match=r"HF weight 'encoder.layer.2.intermediate.dense.weight' missing"):
        from_hf_state_dict(state, CONFIGS["w48 d3 p12@48"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "relu"}, r"hidden_act 'relu' is not supported \(ViT uses 'gelu'\)"),
        ({"image_size": [48, 96]}, r"non-square image_size \[48, 96\] is not supported"),
    ],
)
def test_hf_configs_vitpipe_cannot_express_are_refused(change, message):
    theirs = hf_model(CONFIGS["w48 d3 p12@48"])
    with pytest.raises(ValueError, match=rf"x/config.json: {message}"):
        config_from_hf({**theirs.config.to_dict(), **change}, theirs.state_dict(), None, "x/config.json")


def test_hf_folder_without_weights_is_named(tmp_path):
    hf_model(CONFIGS["w48 d3 p12@48"]).config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors, model.safetensors.index.json or"):
        load_pretrained(tmp_path)


def test_the_attention_the_analyses_read_is_hf_transformers_attention():
    config = CONFIGS["w48 d3 p12@48"]
    ours = perturb(VisionTransformer(config).eval())
    theirs = hf_model(config, attn_implementation="eager")  # HF's textbook attention returns its weights
    theirs.load_state_dict(to_hf_state_dict(ours, layout="modules"), strict=True)
    images, pixels = images_for(config)
    with torch.no_grad():
        _, attentions = ours.encode_with_attention(patchify(images, config.patch_size))
        reference = theirs(pixel_values=pixels, output_attentions=True).attentions
    assert len(attentions) == len(reference) == config.depth
    for layer, (mine, hf) in enumerate(zip(attentions, reference, strict=True)):
        assert mine.shape == hf.shape == (3, config.heads, config.seq_len, config.seq_len)
        torch.testing.assert_close(mine, hf, atol=1e-5, rtol=0, msg=f"layer {layer}")
