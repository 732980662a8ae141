"""The one patch layout: patches[n] = img[r*P:(r+1)*P, c*P:(c+1)*P, :].reshape(-1), n = r*cols + c."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit.patches import describe_patch_dim, patchify, unpatchify


def reference_patches(image: np.ndarray, p: int) -> np.ndarray:
    """DESIGN.md's definition, written as the loop it describes."""
    rows, cols = image.shape[0] // p, image.shape[1] // p
    return np.stack(
        [
            image[r * p : (r + 1) * p, c * p : (c + 1) * p, :].reshape(-1)
            for r in range(rows)
            for c in range(cols)
        ]
    )


@pytest.mark.parametrize(
    ("height", "width", "channels", "p"), [(32, 32, 3, 4), (24, 40, 1, 8), (16, 48, 3, 16)]
)
def test_patchify_matches_the_documented_layout_for_numpy_and_torch(height, width, channels, p):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, height, width, channels), dtype=np.uint8)
    expected = np.stack([reference_patches(image, p) for image in images])

    from_numpy = patchify(images, p)
    from_torch = patchify(torch.from_numpy(images), p)

    assert from_numpy.dtype == np.uint8
    assert from_torch.dtype == torch.uint8
    assert from_numpy.shape == (2, (height // p) * (width // p), p * p * channels)
    np.testing.assert_array_equal(from_numpy, expected)
    np.testing.assert_array_equal(from_torch.numpy(), expected)
    np.testing.assert_array_equal(unpatchify(from_numpy, p, channels, grid=(height // p, width // p)), images)
    assert torch.equal(
        unpatchify(from_torch, p, channels, grid=(height // p, width // p)), torch.from_numpy(images)
    )


def test_single_image_without_batch_dimension_round_trips():
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    patches = patchify(image, 4)
    assert patches.shape == (4, 48)
    np.testing.assert_array_equal(patches[1], image[0:4, 4:8, :].reshape(-1))
    np.testing.assert_array_equal(unpatchify(patches, 4, 3), image)


def test_patchify_rejects_images_that_do_not_tile():
    with pytest.raises(ValueError, match=r"30x32 pixels is not a whole number of 16x16 patches"):
        patchify(np.zeros((30, 32, 3), np.uint8), 16)
    with pytest.raises(ValueError, match=r"expects images \[..., H, W, C\], got shape \(32, 32\)"):
        patchify(np.zeros((32, 32), np.uint8), 16)


def test_unpatchify_rejects_wrong_patch_length_and_non_square_grids():
    with pytest.raises(ValueError, match=r"length 192 do not hold 16x16x3 pixels \(expected 768\)"):
        unpatchify(np.zeros((4, 192), np.uint8), 16, 3)
    with pytest.raises(ValueError, match=r"6 patches is not a square grid; pass grid"):
        unpatchify(np.zeros((6, 48), np.uint8), 4, 3)
    with pytest.raises(ValueError, match=r"grid 2x2 holds 4 patches, got 6"):
        unpatchify(np.zeros((6, 48), np.uint8), 4, 3, grid=(2, 2))


def test_describe_patch_dim_names_the_patch_shapes_a_length_fits():
    assert describe_patch_dim(768) == " (fits 16x16x3 patches)"
    assert describe_patch_dim(64) == " (fits 8x8x1 patches)"
    assert describe_patch_dim(48) == " (fits 4x4x3 patches)"
    assert describe_patch_dim(50) == ""
