"""The paper's analyses of a ViT against answers known in closed form: hand-built attention patterns,
sinusoidal position embeddings, filters of known structure; and the model's fused attention path against
the textbook one."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vit.analysis import (
    analyze_vit,
    attention_rollout,
    embedding_components,
    fit_images,
    mean_attention_distance,
    patch_distances,
    position_similarity,
    rollout_map,
)
from vit.config import ViTConfig
from vit.model import VisionTransformer
from vit.patches import PatchGeometry, patchify, unpatchify

GRID, PATCH = 4, 8  # a 32-pixel image of 8-pixel patches


def one_hot_attention(keys: list[int], tokens: int, heads: int = 2) -> torch.Tensor:
    """[1, heads, T, T]: query i attends only to key keys[i]."""
    attention = torch.zeros(1, heads, tokens, tokens)
    attention[..., torch.arange(tokens), torch.tensor(keys)] = 1.0
    return attention


def brute_mean_pairwise_distance(grid: int, patch: int) -> float:
    cells = list(itertools.product(range(grid), repeat=2))
    return sum(math.dist(a, b) * patch for a in cells for b in cells) / len(cells) ** 2


# --------------------------------------------------------------------------- attention distance


def test_attention_distance_of_every_patch_attending_to_itself_is_zero():
    tokens = 1 + GRID * GRID
    attention = one_hot_attention(list(range(tokens)), tokens)
    distance = mean_attention_distance(attention, patch_distances(GRID, PATCH), prefix=1)
    assert distance.shape == (1, 2)
    assert torch.equal(distance, torch.zeros(1, 2, dtype=distance.dtype))


def test_attention_distance_of_uniform_attention_is_the_grids_mean_pairwise_distance():
    tokens = 1 + GRID * GRID  # the class token's share is left out and the rest renormalised
    attention = torch.full((3, 2, tokens, tokens), 1.0 / tokens)
    distance = mean_attention_distance(attention, patch_distances(GRID, PATCH), prefix=1)
    expected = brute_mean_pairwise_distance(GRID, PATCH)
    assert expected > PATCH  # a number that a wrong weighting would miss
    torch.testing.assert_close(distance, torch.full((3, 2), expected, dtype=torch.float64))


def test_attention_distance_is_in_pixels_and_weights_each_key_by_its_attention():
    # no class token; every patch gives 3/4 of its attention to itself and 1/4 to the patch diagonally
    # opposite in the grid: the distance is a quarter of each patch's distance to its opposite
    tokens = GRID * GRID
    opposite = [(GRID - 1 - i // GRID) * GRID + (GRID - 1 - i % GRID) for i in range(tokens)]
    attention = 0.75 * one_hot_attention(list(range(tokens)), tokens) + 0.25 * one_hot_attention(
        opposite, tokens
    )
    distance = mean_attention_distance(attention, patch_distances(GRID, PATCH), prefix=0)
    expected = (
        sum(
            0.25 * PATCH * math.hypot(GRID - 1 - 2 * (i // GRID), GRID - 1 - 2 * (i % GRID))
            for i in range(tokens)
        )
        / tokens
    )
    torch.testing.assert_close(distance, torch.full((1, 2), expected, dtype=torch.float64))


# --------------------------------------------------------------------------- rollout


def test_rollout_of_identity_attention_is_the_identity():
    tokens = 1 + GRID * GRID
    layers = [one_hot_attention(list(range(tokens)), tokens) for _ in range(3)]
    torch.testing.assert_close(attention_rollout(layers)[0], torch.eye(tokens, dtype=torch.float64))


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_rollout_of_layers_all_attending_to_one_token_has_its_closed_form(depth):
    # each layer: 0.5 P + 0.5 I with P = 1 e_j^T (P^2 = P), so L layers give (1 - 2^-L) P + 2^-L I
    tokens, j = 6, 2
    layers = [one_hot_attention([j] * tokens, tokens) for _ in range(depth)]
    every_to_j = torch.zeros(tokens, tokens, dtype=torch.float64)
    every_to_j[:, j] = 1.0
    expected = (1 - 2**-depth) * every_to_j + 2**-depth * torch.eye(tokens, dtype=torch.float64)
    torch.testing.assert_close(attention_rollout(layers)[0], expected)


def test_rollout_averages_the_heads():
    tokens = 5
    heads = torch.stack([one_hot_attention([0] * tokens, tokens, 1)[0, 0], torch.eye(tokens)])[None]
    expected = 0.5 * (0.5 * one_hot_attention([0] * tokens, tokens, 1)[0, 0] + 0.5 * torch.eye(tokens))
    expected += 0.5 * torch.eye(tokens)
    torch.testing.assert_close(attention_rollout([heads])[0], expected.double())


def test_the_rollout_multiplies_the_layers_from_the_first_to_the_last():
    # Abnar & Zuidema (2020), eq. 1: R_i = Ã_i R_{i-1}, so R = Ã_2 Ã_1. Layer 1 sends every query to key 1;
    # layer 2's heads send query i to key i+1 and to itself. These do not commute, so the other order
    # (Ã_1 Ã_2) gives a different matrix that a reversed product would be caught by.
    tokens = 5
    first = one_hot_attention([1] * tokens, tokens)
    shift = [(i + 1) % tokens for i in range(tokens)]
    second = torch.cat(
        [one_hot_attention(shift, tokens, 1), one_hot_attention(list(range(tokens)), tokens, 1)], dim=1
    )

    def mixed(attention: torch.Tensor) -> np.ndarray:
        """One layer by hand: heads averaged, the residual's identity half added, rows renormalised."""
        averaged = 0.5 * attention[0].numpy().astype(np.float64).mean(axis=0) + 0.5 * np.eye(tokens)
        return averaged / averaged.sum(axis=1, keepdims=True)

    first_to_last = mixed(second) @ mixed(first)
    last_to_first = mixed(first) @ mixed(second)
    assert np.abs(first_to_last - last_to_first).max() > 0.1  # the two orders really differ
    rollout = attention_rollout([first, second])[0].numpy()
    np.testing.assert_allclose(rollout, first_to_last, rtol=0, atol=1e-12)
    assert np.abs(rollout - last_to_first).max() > 0.1


def test_rollout_map_reads_the_class_token_row_or_the_mean_of_every_row():
    rollout = torch.arange(2 * 5 * 5, dtype=torch.float64).reshape(2, 5, 5)
    torch.testing.assert_close(rollout_map(rollout, 2, prefix=1), rollout[:, 0, 1:].reshape(2, 2, 2))
    no_prefix = rollout[:, 1:, 1:]
    torch.testing.assert_close(rollout_map(no_prefix, 2, prefix=0), no_prefix.mean(dim=1).reshape(2, 2, 2))


# --------------------------------------------------------------------------- position embeddings


def sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The transformer's sinusoidal embedding: (sin, cos) of each position at dim/2 frequencies."""
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_kernel(offset: torch.Tensor, dim: int) -> torch.Tensor:
    """Cosine similarity of two sinusoidal embeddings `offset` apart: the mean of cos(w_k * offset)."""
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    return torch.cos(offset.double()[..., None] * frequencies).mean(dim=-1)


def test_position_similarity_of_a_1d_sinusoidal_embedding_depends_only_on_the_offset():
    length, dim = 12, 32
    embedding = torch.cat([torch.randn(1, dim, dtype=torch.float64), sincos(torch.arange(length), dim)])
    similarity = position_similarity(embedding[None], prefix=1)  # the class token's row is left out
    offsets = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    torch.testing.assert_close(similarity, sincos_kernel(offsets, dim))


def test_position_similarity_of_a_2d_sinusoidal_embedding_is_the_mean_of_row_and_column_kernels():
    grid, dim = 5, 64
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    embedding = torch.cat([sincos(rows.flatten(), dim // 2), sincos(cols.flatten(), dim // 2)], dim=1)
    similarity = position_similarity(embedding[None], prefix=0)
    dr = rows.flatten()[:, None] - rows.flatten()[None, :]
    dc = cols.flatten()[:, None] - cols.flatten()[None, :]
    torch.testing.assert_close(similarity, 0.5 * (sincos_kernel(dr, dim // 2) + sincos_kernel(dc, dim // 2)))
    # the paper's reading: a patch's own row and column are more alike than the far corner
    tile = similarity[0].reshape(grid, grid)
    assert tile[0, 0] == pytest.approx(1.0)
    assert tile[0, 1] > tile[grid - 1, grid - 1]


# --------------------------------------------------------------------------- embedding filters


def test_embedding_components_recover_the_patterns_the_filters_are_made_of():
    patch, channels, width = 4, 3, 64
    patterns = torch.linalg.qr(torch.randn(patch * patch * channels, 3, dtype=torch.float64))[0].T  # [3, 48]
    mixing = torch.randn(width, 3, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    filters = mixing @ patterns + torch.randn(
        1, patch * patch * channels, dtype=torch.float64
    )  # + a shared mean
    components, explained = embedding_components(filters, patch, channels, count=5)
    assert components.shape == (5, patch, patch, channels)
    assert explained.shape == (5,)
    assert float(explained[:3].sum()) == pytest.approx(1.0)
    assert float(explained[3:].sum()) == pytest.approx(0.0, abs=1e-12)
    first3 = components[:3].reshape(3, -1)
    torch.testing.assert_close(first3 @ first3.T, torch.eye(3, dtype=torch.float64))  # orthonormal
    in_span = first3 @ patterns.T @ patterns  # projected onto the patterns' span, unchanged
    torch.testing.assert_close(in_span, first3)
    flat = components.reshape(5, -1)
    assert (flat.gather(1, flat.abs().argmax(dim=1, keepdim=True)) > 0).all()  # the sign rule


# --------------------------------------------------------------------------- images


def test_fit_images_resizes_whole_images_to_the_models_geometry():
    stored, model = PatchGeometry(32, 4, 3), PatchGeometry(16, 8, 3)
    images = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    images[:, :16] = 200  # the top half bright: still the top half after the resize
    fitted = fit_images(patchify(images, 4), stored, model)
    assert fitted.shape == (2, 4, 8 * 8 * 3)
    assert fitted.dtype == torch.uint8
    resized = unpatchify(fitted, 8, 3)
    assert (resized[:, :7] == 200).all()
    assert (resized[:, 9:] == 0).all()
    assert float(resized.float().mean()) == pytest.approx(100, abs=0.5)
    same = patchify(images, 4)
    assert fit_images(same, stored, stored) is same
    with pytest.raises(ValueError, match="1 channel"):
        fit_images(torch.zeros(1, 64, 16, dtype=torch.uint8), PatchGeometry(32, 4, 1), stored)


# --------------------------------------------------------------------------- the model's own attention


def small_vit(pool: str = "cls") -> VisionTransformer:
    config = ViTConfig(
        image_size=16, patch_size=4, width=32, depth=3, heads=4, mlp_dim=64, num_classes=5, pool=pool
    )
    model = VisionTransformer(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random everywhere, so that attention is far from uniform
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return patchify(torch.randint(0, 256, (count, 16, 16, 3), dtype=torch.uint8, generator=generator), 4)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_the_fused_attention_path_gives_the_explicit_paths_probabilities_and_tokens(pool):
    model, batch = small_vit(pool), images(3)
    with torch.no_grad():
        plain = model.encode(batch)
        fused_tokens, fused = model.encode_with_attention(batch)
        explicit_tokens, explicit = model.encode_with_attention(batch, explicit=True)
    tokens = model.config.seq_len
    assert len(fused) == 3
    assert fused[0].shape == (3, 4, tokens, tokens)
    assert torch.equal(fused_tokens, plain)  # asking for the probabilities changes nothing the model does
    torch.testing.assert_close(explicit_tokens, plain, atol=1e-5, rtol=0)
    for ours, textbook in zip(fused, explicit, strict=True):
        torch.testing.assert_close(ours, textbook, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.sum(dim=-1), torch.ones(ours.shape[:-1]), atol=1e-6, rtol=0)
    assert fused[1].amax() > 5 * fused[1].mean()  # not near-uniform: the comparison means something


def test_the_analyses_on_the_fused_path_equal_those_on_the_explicit_path():
    model = small_vit()
    batches = [images(5, seed) for seed in range(3)]
    fused = analyze_vit(model, batches, rollout_images=6, max_images=12)
    explicit = analyze_vit(model, batches, rollout_images=6, max_images=12, explicit=True)
    assert fused.images_seen == 12
    assert fused.rollout.shape == (6, 4, 4)
    assert fused.images.shape == (6, 16, 16, 3)
    assert fused.distances.shape == (3, 4)
    torch.testing.assert_close(fused.distances, explicit.distances, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused.rollout, explicit.rollout, atol=1e-6, rtol=0)
    assert fused.distances.std() > 0.1  # heads differ: the numbers are of the model, not a constant
    assert float(fused.distances.min()) > 0
    assert float(fused.distances.max()) < 16 * math.sqrt(2)


def test_analyze_vit_averages_distances_over_exactly_the_images_it_reads():
    model = small_vit()
    batches = [images(4, seed) for seed in range(3)]
    whole = analyze_vit(model, batches, rollout_images=2, max_images=6)
    first, second = batches[0], batches[1][:2]
    with torch.no_grad():
        _, attentions = model.encode_with_attention(torch.cat([first, second]))
    distances = patch_distances(4, 4)
    expected = torch.stack([mean_attention_distance(a, distances, 1).mean(dim=0) for a in attentions])
    assert whole.images_seen == 6
    torch.testing.assert_close(whole.distances, expected.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(whole.similarity, position_similarity(model.pos_embed, 1).float())
    weight = model.stem.proj.weight
    components, _ = embedding_components(weight, 4, 3)
    assert whole.components.shape == (28, 4, 4, 3)
    torch.testing.assert_close(whole.components, components.float())


def test_attention_probabilities_are_refused_while_attention_dropout_is_on():
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        width=32,
        depth=1,
        heads=4,
        mlp_dim=64,
        num_classes=5,
        attention_dropout=0.1,
    )
    model = VisionTransformer(config).train()
    with pytest.raises(ValueError, match="eval mode"):
        model.encode_with_attention(images(1))
