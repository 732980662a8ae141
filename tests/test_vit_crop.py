"""The crops of the recipe on the patch layout (vit.augment): a known box of a known image gives the
expected patches (against PIL's crop + antialiased bilinear resize), evaluation takes the centre, and the
random boxes stay within the configured area and aspect ranges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vit.augment import center_crop, hflip_patches, inception_boxes, resized_crop, stored_geometry
from vit.build import build_model
from vit.config import BiTConfig, ViTConfig
from vit.model import VisionTransformer
from vit.objective import training_loss, training_view
from vit.patches import PatchGeometry, patchify, unpatchify
from vit.recipe import BatchSplit, Crop, Optimizer, Recipe, Schedule

STORED = PatchGeometry(image_size=32, patch_size=4, channels=3)
MODEL = PatchGeometry(image_size=16, patch_size=4, channels=3)


def photo(size: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth colour image with detail at every scale (gradients plus noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size], -1) + rng.normal(
        0, 20, (size, size, 3)
    )
    return image.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("box", [(4, 6, 16, 16), (0, 0, 32, 32), (3, 5, 10, 22), (10, 2, 20, 9)])
def test_a_known_box_of_a_known_image_gives_pil_s_crop_and_resize(box):
    image = photo()
    top, left, height, width = box
    patches = torch.from_numpy(patchify(image, 4)).unsqueeze(0)
    out = resized_crop(patches, STORED, MODEL, torch.tensor([box], dtype=torch.float32))
    got = unpatchify(out[0], 4, 3).numpy()
    pil = (
        Image.fromarray(image).crop((left, top, left + width, top + height)).resize((16, 16), Image.BILINEAR)
    )
    expected = np.asarray(pil).astype(np.float32)
    assert out.shape == (1, MODEL.num_patches, MODEL.patch_dim)
    assert out.dtype == torch.float32
    assert np.abs(got - expected).mean() < 1.0
    assert np.abs(got - expected).max() <= 3.0


def test_a_box_of_the_model_s_size_is_the_pixels_themselves():
    image = photo()
    patches = torch.from_numpy(patchify(image, 4)).unsqueeze(0)
    out = resized_crop(patches, STORED, MODEL, torch.tensor([[8.0, 4.0, 16.0, 16.0]]))
    assert torch.equal(out[0], torch.from_numpy(patchify(image[8:24, 4:20], 4)).float())


def test_evaluation_takes_the_centre_crop_of_larger_stored_images():
    images = np.stack([photo(seed=s) for s in range(3)])
    patches = torch.from_numpy(patchify(images, 4))
    centre = center_crop(patches, STORED, MODEL)
    assert centre.dtype == torch.uint8
    assert torch.equal(centre, torch.from_numpy(patchify(images[:, 8:24, 8:24], 4)))
    # the step without a random crop does the same, and images stored at the model's size pass unchanged
    recipe = Recipe(Optimizer(), Schedule(), total_steps=1, batch=BatchSplit(3, 3), input_size=32, flip=False)
    assert torch.equal(training_view(patches, MODEL, recipe), centre)
    whole = Recipe(Optimizer(), Schedule(), 1, BatchSplit(3, 3), flip=False)
    assert training_view(centre, MODEL, whole) is centre
    assert stored_geometry(MODEL, None) == MODEL


def test_random_boxes_stay_inside_the_image_and_the_configured_ranges():
    crop = Crop(area=(0.25, 0.5), aspect=(0.5, 2.0))
    boxes = inception_boxes(20_000, 64, crop, torch.device("cpu"), torch.Generator().manual_seed(0))
    top, left, height, width = boxes.T
    assert (top >= 0).all()
    assert (left >= 0).all()
    assert (top + height <= 64).all()
    assert (left + width <= 64).all()
    area = height * width / 64**2
    ratio = width / height
    # whole pixels: a box's area and ratio are within rounding of the drawn ones
    assert area.min() >= 0.25 * 0.9
    assert area.max() <= 0.5 * 1.1
    assert ratio.min() >= 0.5 * 0.9
    assert ratio.max() <= 2.0 * 1.1
    assert abs(area.mean().item() - 0.375) < 0.01  # uniform in the area range
    assert abs(ratio.log().mean().item()) < 0.02  # log-uniform about 1
    assert boxes.unique(dim=0).shape[0] > 10_000  # and different for each image


def test_draws_that_never_fit_fall_back_to_the_whole_image():
    boxes = inception_boxes(100, 16, Crop(area=(1.0, 1.0), aspect=(3.0, 4.0)), torch.device("cpu"))
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(100, 4))


def test_the_recipe_crop_is_random_per_image_and_the_config_checks_its_ranges():
    images = np.stack([photo(seed=0)] * 4)
    recipe = Recipe(Optimizer(), Schedule(), 1, BatchSplit(4, 4), crop=Crop(), input_size=32)
    torch.manual_seed(0)
    out = training_view(torch.from_numpy(patchify(images, 4)), MODEL, recipe)
    assert out.shape == (4, MODEL.num_patches, MODEL.patch_dim)
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) == 4
    with pytest.raises(ValueError, match="area must be"):
        Crop(area=(0.0, 1.0))
    with pytest.raises(ValueError, match="aspect must be"):
        Crop(aspect=(2.0, 1.0))
    assert math.isclose(Crop().aspect[1], 4 / 3)


def test_the_flip_folded_into_the_crop_mirrors_the_cropped_image():
    images = np.stack([photo(seed=s) for s in range(4)])
    patches = torch.from_numpy(patchify(images, 4))
    boxes = torch.tensor([[3.0, 5.0, 10.0, 22.0]] * 4)
    flip = torch.tensor([True, False, True, False])
    plain = resized_crop(patches, STORED, MODEL, boxes)
    folded = resized_crop(patches, STORED, MODEL, boxes, flip)
    torch.testing.assert_close(folded, hflip_patches(plain, MODEL, flip))
    assert not torch.equal(folded[0], plain[0])


@pytest.mark.parametrize("family", ["vit", "bit"])
def test_a_training_step_on_images_stored_larger_than_the_model_trains_on_its_crops(family):
    if family == "vit":
        config = ViTConfig(image_size=16, patch_size=4, num_classes=3, width=16, depth=1, heads=1, mlp_dim=32)
    else:
        config = BiTConfig(image_size=16, patch_size=4, num_classes=3, depth=26, base_width=8, groups=8)
    model = build_model(config)
    patches = torch.from_numpy(patchify(np.stack([photo(seed=s) for s in range(4)]), 4))
    labels = torch.tensor([0, 1, 2, 0])
    for crop in (Crop(), None):
        batch = BatchSplit(4, 4)
        recipe = Recipe(Optimizer(), Schedule(), 1, batch, crop=crop, input_size=32, mixup_alpha=0.2)
        result = training_loss(model, patches, labels, recipe, np.random.default_rng(0))
        result.loss.backward()
        assert torch.isfinite(result.loss)
        assert result.images == 4


def test_normalising_uint8_or_float_pixels_gives_the_same_values_and_leaves_the_input_alone():
    config = ViTConfig(image_size=16, patch_size=4, num_classes=3, width=16, depth=1, heads=1, mlp_dim=32)
    model = VisionTransformer(config)
    pixels = torch.from_numpy(patchify(photo(16)[None], 4))
    floats = pixels.float()
    expected = (pixels.double() / 255 - torch.tensor(model.config.mean).repeat(16).double()) / torch.tensor(
        model.config.std
    ).repeat(16).double()
    torch.testing.assert_close(model.normalize(pixels).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.normalize(floats).double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(floats, pixels.float())  # the crop's float output is not scaled in place
