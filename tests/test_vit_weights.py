"""Saving and loading vitpipe weights: safetensors + config.json, adapted on load, clear errors when not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vit.config import ViTConfig
from vit.model import VisionTransformer
from vit.patches import patchify
from vit.weights import load_pretrained, load_state, read_checkpoint, save_pretrained

CONFIG = ViTConfig(image_size=32, patch_size=8, num_classes=5, width=32, depth=2, mlp_dim=64, heads=2)


def trained_like(config: ViTConfig = CONFIG) -> VisionTransformer:
    model = VisionTransformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def patches(config: ViTConfig = CONFIG) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (2, config.image_size, config.image_size, config.channels), generator=generator
    )
    return patchify(images.to(torch.uint8), config.patch_size)


def test_save_and_load_round_trip_exactly(tmp_path):
    model = trained_like(CONFIG.replace(mean=(0.4, 0.5, 0.6), representation_size=16))
    save_pretrained(model, tmp_path, labels=list("abcde"))
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["format"] == "vitpipe.vit/1"
    assert config_json["labels"] == list("abcde")
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())

    loaded = load_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert read_checkpoint(tmp_path).labels == list("abcde")
    with torch.no_grad():
        assert torch.equal(loaded(patches()), model(patches()))


def test_new_class_count_gets_a_zero_head_and_keeps_the_backbone(tmp_path):
    model = trained_like()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, num_classes=3).eval()
    assert loaded.head.weight.shape == (3, 32)
    assert not loaded.head.weight.any()
    assert not loaded.head.bias.any()
    with torch.no_grad():
        assert torch.equal(loaded.features(patches()), model.features(patches()))


def test_higher_resolution_resamples_position_embeddings_only(tmp_path):
    model = trained_like()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, image_size=64)
    assert loaded.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(loaded.pos_embed[:, 0], model.pos_embed[:, 0])
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)
    assert loaded(patches(loaded.config)).shape == (2, 5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"channels": 1}, r"channels: the checkpoint has 3, the model asks for 1"),
        ({"patch_size": 4}, r"patch_size: the checkpoint has 8, the model asks for 4"),
        ({"depth": 3}, r"depth: the checkpoint has 2, the model asks for 3"),
        ({"pool": "gap"}, r"pool: the checkpoint has 'cls', the model asks for 'gap'"),
    ],
)
def test_architecture_changes_that_cannot_load_are_named(tmp_path, override, message):
    save_pretrained(trained_like(), tmp_path)
    with pytest.raises(ValueError, match=rf"model.safetensors cannot be loaded into this model: {message}"):
        load_pretrained(tmp_path, **override)


def test_weights_that_do_not_match_their_config_name_the_key_and_both_shapes(tmp_path):
    save_pretrained(trained_like(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["blocks.0.attn.qkv.weight"] = torch.zeros(48, 32)
    del state["norm.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="weights do not fit the model") as error:
        load_pretrained(tmp_path)
    message = str(error.value)
    assert "model.safetensors: weights do not fit the model" in message
    assert (
        "'blocks.0.attn.qkv.weight' has shape [48, 32] in the checkpoint, the model expects [96, 32]"
        in message
    )
    assert "missing key(s) ['norm.bias']" in message
    assert "unexpected key(s) ['extra.weight']" in message


def test_load_state_reports_mismatches_without_touching_the_model():
    model = VisionTransformer(CONFIG)
    before = model.stem.proj.weight.clone()
    other = VisionTransformer(CONFIG.replace(width=48, heads=3, mlp_dim=96)).state_dict()
    with pytest.raises(ValueError, match=r"other.safetensors: .*'stem.proj.weight' has shape \[48, 192\]"):
        load_state(model, other, "other.safetensors")
    assert torch.equal(model.stem.proj.weight, before)


def test_corrupt_or_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json; not a saved vitpipe or HF ViT model"):
        load_pretrained(tmp_path)
    save_pretrained(trained_like(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match=r"neither a vitpipe model .* nor an HF ViT"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "vitpipe.vit/1", "vit": {"widht": 3}}))
    with pytest.raises(ValueError, match=r"config.json: unknown ViT config key\(s\) widht"):
        load_pretrained(tmp_path)


def test_saving_over_an_earlier_model_replaces_it_and_leaves_no_partial_files(tmp_path):
    save_pretrained(trained_like(), tmp_path)
    second = trained_like(CONFIG.replace(num_classes=2))
    save_pretrained(second, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_pretrained(tmp_path).head.weight, second.head.weight)


def test_unknown_override_is_named(tmp_path):
    save_pretrained(trained_like(), tmp_path)
    with pytest.raises(ValueError, match=r"unknown ViT config field\(s\) \['widht'\]"):
        load_pretrained(tmp_path, widht=64)


def test_weights_holding_nan_or_inf_are_refused_at_load_naming_the_key(tmp_path):
    save_pretrained(trained_like(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["norm.weight"][0] = float("nan")
    state["head.bias"][1] = float("inf")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"model.safetensors: .*NaN or infinite values in \['head.bias', 'norm.weight'\]"
    ):
        load_pretrained(tmp_path)
