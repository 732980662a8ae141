"""The analysis stage on real weights and real Ray: every model analysed into its own folder from its stored
weights, a BiT left out with the reason, a broken weights folder named while the others are kept; its numbers
recomputed outside vitpipe (numpy on the weights file, HF transformers' own attention); and a study's
attention distance by depth per pretraining size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
from transformers import ViTForImageClassification, ViTImageProcessorPil

from pipeline.analysis.launch import BY_DATA, _by_data, _plot_by_data, analyze
from pipeline.analysis.subjects import FINETUNED, PRETRAINED, Subject, run_subjects, study_subjects
from pipeline.analysis.task import PICTURES, ImageSource
from pipeline.config import AnalyzeConfig
from pipeline.transfer.data import SplitReader
from vit.build import build_model
from vit.config import BiTConfig
from vit.files import WEIGHTS_FILE
from vit.hf import export_hf
from vit.patches import PatchGeometry, unpatchify
from vit.weights import load_pretrained, save_pretrained


def test_every_model_gets_its_pictures_and_numbers_a_bit_is_skipped_and_a_broken_one_named(
    ray_local, pretrained_export, digits_patches, tmp_path
):
    bit = save_pretrained(
        build_model(BiTConfig(image_size=16, patch_size=4, depth=26, base_width=8, groups=8, num_classes=3)),
        tmp_path / "bit",
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    subjects = [
        Subject("pretrained", "pretrained", str(pretrained_export), PRETRAINED),
        Subject("bit", "a BiT", str(bit), PRETRAINED),
        Subject("broken", "broken", str(broken), FINETUNED),
    ]
    images = ImageSource("digits", digits_patches, "test")
    config = AnalyzeConfig(images=5, distance_images=40, components=6, cpus_per_task=0.5)
    result = analyze(subjects, images, config, str(tmp_path / "analysis"))

    assert [entry["name"] for entry in result.index["models"]] == ["pretrained"]
    assert result.index["skipped"] == [
        {"model": "bit", "reason": "BiT R26x1, base width 8: no attention to analyse"}
    ]
    [failure] = result.failures
    assert failure["model"] == "broken"
    assert str(broken / "config.json") in failure["error"]
    assert "1 model(s) analysed" in result.summary()
    assert "1 FAILED" in result.summary()

    folder = tmp_path / "analysis" / "pretrained"
    for picture in PICTURES.values():
        assert (folder / picture).stat().st_size > 3000, picture
    document = json.loads((folder / "analysis.json").read_text())
    # the digits are stored at 32 px and the model reads 16 px: each whole image is resized to it
    assert document["images"]["stored"].startswith("32px")
    assert document["images"]["seen_as"].startswith("16px")
    assert document["images"]["count"] == 40
    assert len(document["rollout"]["maps"]) == 5
    assert np.array(document["rollout"]["maps"]).shape == (5, 4, 4)
    distances = np.array(document["attention_distance"]["per_layer_and_head"])
    assert distances.shape == (2, 2)  # TINY_RUN: depth 2, 2 heads
    # the position-embedding similarity recomputed with numpy alone from the raw array in the weights file
    pos_embed = safetensors.numpy.load_file(pretrained_export / WEIGHTS_FILE)["pos_embed"]  # [1, 1 + N, D]
    patches = pos_embed[0, 1:].astype(np.float64)  # the class token's embedding left out
    unit = patches / np.linalg.norm(patches, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.testing.assert_allclose(document["position_embedding"]["similarity"], similarity, rtol=0, atol=1e-4)
    grid = document["position_embedding"]["grid"]
    tiles = similarity.reshape(grid, grid, grid, grid)  # tiles[r, c] is patch (r, c)'s tile, as in Figure 7
    side_by_side = [tiles[r, c, r, c + 1] for r in range(grid) for c in range(grid - 1)]
    side_by_side += [tiles[r, c, r + 1, c] for r in range(grid - 1) for c in range(grid)]
    assert document["position_embedding"]["neighbours"] == pytest.approx(np.mean(side_by_side), abs=1e-4)
    assert len(document["embedding_filters"]["explained_variance"]) == 6
    assert not (tmp_path / "analysis" / "bit").exists()


def _hf_eager_attentions(hf_folder: Path, stored: np.ndarray, geometry: PatchGeometry) -> list[np.ndarray]:
    """HF transformers' own attention probabilities [B, heads, T, T] per layer, on stored uint8 patches:
    each whole image resized as the analysis stage says it does (bilinear, antialiased, rounded to uint8),
    then rescaled and normalised by HF's image processor from the exported folder."""
    model = ViTForImageClassification.from_pretrained(hf_folder, attn_implementation="eager").eval()
    size = model.config.image_size
    images = torch.from_numpy(unpatchify(stored, geometry.patch_size, geometry.channels))
    resized = F.interpolate(
        images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear", antialias=True
    )
    pixels = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    inputs = ViTImageProcessorPil.from_pretrained(hf_folder)(images=list(pixels), return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], output_attentions=True)
    return [attention.double().numpy() for attention in out.attentions]


def _attention_distance(attention: np.ndarray, grid: int, patch_size: int) -> np.ndarray:
    """[heads] the paper's mean attention distance in pixels, averaged over the images: the class token's
    row and column dropped, each query's weights over the patches renormalised."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    pixels = patch_size * np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])
    weights = attention[..., 1:, 1:] / attention[..., 1:, 1:].sum(axis=-1, keepdims=True)
    return (weights * pixels).sum(axis=-1).mean(axis=(0, 2))


def test_attention_distances_on_real_weights_are_those_of_hugging_faces_own_attention(
    ray_local, pretrained_export, digits_patches, tmp_path
):
    """The stage's distances recomputed without vitpipe's model: its weights exported to HF transformers,
    HF's eager attention on the same test images, the distances by numpy."""
    wanted = 12
    config = AnalyzeConfig(images=2, distance_images=wanted, components=4, cpus_per_task=0.5)
    subject = Subject("pretrained", "pretrained", str(pretrained_export), PRETRAINED)
    result = analyze([subject], ImageSource("digits", digits_patches, "test"), config, str(tmp_path / "out"))
    assert not result.failures
    document = json.loads((tmp_path / "out" / "pretrained" / "analysis.json").read_text())

    reader = SplitReader(digits_patches, "test")
    rows = np.linspace(0, len(reader) - 1, wanted).round().astype(np.int64)  # spread over the split
    assert document["images"]["rows"] == rows.tolist()
    [(stored, _)] = reader.take(rows, wanted)
    hf_folder = export_hf(load_pretrained(pretrained_export), tmp_path / "hf")
    attentions = _hf_eager_attentions(hf_folder, stored, reader.geometry)
    grid = document["position_embedding"]["grid"]
    patch_size = document["architecture"]["patch_size"]
    expected = np.stack([_attention_distance(a, grid, patch_size) for a in attentions])
    assert expected.std() > 0.1  # heads and layers differ: a wrong image or layer would show
    found = np.array(document["attention_distance"]["per_layer_and_head"])
    np.testing.assert_allclose(found, expected, rtol=0, atol=2e-4)  # analysis.json keeps 4 decimals


def _document(name: str, role: str, point: dict, distances: list[list[float]]) -> dict:
    return {
        "subject": {"name": name, "label": name, "role": role, "point": point},
        "attention_distance": {"per_layer_and_head": distances, "uniform": 8.0},
    }


def test_a_study_has_distance_by_depth_per_pretraining_size_averaged_over_seeds(tmp_path):
    vit = {"model": "vit"}
    models = [
        _document("n400-s0", PRETRAINED, {**vit, "size": 400, "seed": 0}, [[6.0, 2.0], [7.0, 7.0]]),
        _document("n400-s1", PRETRAINED, {**vit, "size": 400, "seed": 1}, [[4.0, 2.0], [7.0, 5.0]]),
        _document("n100-s0", PRETRAINED, {**vit, "size": 100, "seed": 0}, [[3.0, 3.0], [6.0, 6.0]]),
        _document("n100-s0/digits", FINETUNED, {**vit, "size": 100, "seed": 0}, [[9.0, 9.0], [9.0, 9.0]]),
        _document("scratch/digits", FINETUNED, {**vit, "size": 0, "seed": 0}, [[1.0, 1.0], [2.0, 2.0]]),
        _document("run's own", PRETRAINED, {}, [[5.0, 5.0], [5.0, 5.0]]),
    ]
    by_data = _by_data(models)
    assert list(by_data) == ["vit"]
    entry = by_data["vit"]
    assert entry["sizes"] == [0, 100, 400]  # the fine-tuned model of a pretrained point is not a size's
    assert entry["seeds"] == [1, 1, 2]
    assert entry["per_layer_and_head"][2] == [[5.0, 2.0], [7.0, 6.0]]
    assert entry["lowest_layer_mean"] == [1.0, 3.0, 3.5]

    _plot_by_data(by_data, tmp_path / BY_DATA)
    assert (tmp_path / BY_DATA).stat().st_size > 10_000


def test_study_subjects_are_every_finished_vit_points_models(tmp_path):
    def point(name: str, size: int, model: str, weights: str | None) -> tuple[str, str]:
        folder = tmp_path / name
        folder.mkdir()
        summary = {
            "point": name,
            "size": size,
            "model": model,
            "seed": 0,
            "weights": weights,
            "results": [
                {
                    "target": "digits",
                    "mode": "pretrained" if size else "scratch",
                    "weights": f"/w/{name}/digits",
                }
            ],
        }
        (folder / "point.json").write_text(json.dumps(summary))
        return name, str(folder)

    points = [
        point("n400-vit", 400, "vit", "/w/n400"),
        point("n400-bit", 400, "bit", "/w/bit"),
        point("scratch-vit", 0, "vit", None),
        ("unfinished", str(tmp_path / "unfinished")),
    ]
    subjects = study_subjects(points, {"vit"})
    assert [(s.name, s.weights, s.role) for s in subjects] == [
        ("n400-vit/pretrained", "/w/n400", PRETRAINED),
        ("n400-vit/digits-pretrained", "/w/n400-vit/digits", FINETUNED),
        ("scratch-vit/digits-scratch", "/w/scratch-vit/digits", FINETUNED),
    ]
    assert subjects[2].point == {"size": 0, "model": "vit", "seed": 0}


@pytest.mark.parametrize("field", ["images", "distance_images", "components", "batch_size"])
def test_an_analyze_setting_below_one_is_refused(field):
    with pytest.raises(ValueError, match=field):
        AnalyzeConfig(**{field: 0})


def test_the_subjects_of_a_moved_run_folder_are_found_where_it_is_now(tmp_path):
    """`mv runs/x elsewhere`: results.json and point.json still name the old folder; the models are read
    where they are now."""
    old, now = "/gone/runs/x", tmp_path / "x"
    model = now / "transfer" / "digits" / "pretrained" / "lr-0.03" / "model"
    model.mkdir(parents=True)
    results = [
        {
            "target": "digits",
            "mode": "pretrained",
            "weights": f"{old}/transfer/digits/pretrained/lr-0.03/model",
        }
    ]
    (now / "transfer" / "results.json").write_text(json.dumps({"results": results}))
    (subject,) = run_subjects(None, str(now / "transfer"))
    assert subject.weights == str(model)

    point = now / "study" / "n100-vit-seed0"
    (point / "pretrain" / "export" / "vitpipe").mkdir(parents=True)
    (point / "transfer" / "digits" / "pretrained" / "lr-0.03" / "model").mkdir(parents=True)
    old_point = f"{old}/study/n100-vit-seed0"
    summary = {
        "size": 100,
        "model": "vit",
        "seed": 0,
        "weights": f"{old_point}/pretrain/export/vitpipe",
        "results": [{**results[0], "weights": f"{old_point}/transfer/digits/pretrained/lr-0.03/model"}],
    }
    (point / "point.json").write_text(json.dumps(summary))
    subjects = study_subjects([("n100-vit-seed0", str(point))], {"vit"})
    assert [s.weights for s in subjects] == [
        str(point / "pretrain" / "export" / "vitpipe"),
        str(point / "transfer" / "digits" / "pretrained" / "lr-0.03" / "model"),
    ]
