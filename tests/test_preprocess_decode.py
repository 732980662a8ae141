"""Image bytes to a model-sized uint8 array: modes, orientation, resize policies, JPEG draft, bad bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from sklearn.datasets import load_sample_image

from pipeline.config import PreprocessConfig
from pipeline.preprocess.decode import DecodeError, decode_image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def config(**overrides) -> PreprocessConfig:
    return PreprocessConfig(**{"image_size": 16, "patch_size": 4, **overrides})


def reference(image: Image.Image, size: int) -> np.ndarray:
    """Full decode, central square, Pillow's antialiased bilinear resize: the slow, obvious way."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.convert("RGB").crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (8, 8), 77), (77, 77, 77)),
        (Image.new("1", (8, 8), 1), (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent -> white
        (Image.new("RGBA", (8, 8), (0, 0, 0, 255)), (0, 0, 0)),
        (Image.new("LA", (8, 8), (0, 128)), (127, 127, 127)),  # half-transparent black over white
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("I;16", (8, 8), 65535), (255, 255, 255)),
        (Image.new("I;16", (8, 8), 257 * 40), (40, 40, 40)),
        (Image.new("I", (8, 8), 257 * 200), (200, 200, 200)),
    ],
    ids=["L", "1", "RGBA-clear", "RGBA-opaque", "LA-half", "CMYK", "16bit-max", "16bit-40", "I-200"],
)
def test_every_mode_becomes_rgb(image, expected):
    fmt = "JPEG" if image.mode == "CMYK" else "TIFF" if image.mode in ("LA", "I") else "PNG"
    pixels = decode_image(encode(image, fmt), config())
    assert pixels.shape == (16, 16, 3)
    assert pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), expected, atol=3)


def test_palette_with_transparency_is_composited_on_white():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    pixels = decode_image(encode(palette), config())
    assert (pixels == 255).all()
    opaque = Image.new("P", (8, 8), 0)
    opaque.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    assert (decode_image(encode(opaque), config()).reshape(-1, 3) == (0, 0, 255)).all()


def test_grayscale_output_uses_luma():
    pixels = decode_image(encode(Image.new("RGB", (8, 8), (255, 0, 0))), config(channels=1))
    assert pixels.shape == (16, 16, 1)
    assert abs(int(pixels.mean()) - 76) <= 1  # ITU-R 601 luma of pure red


def three_bands(width: int, height: int) -> Image.Image:
    """Red, green and blue vertical bands of equal width."""
    pixels = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    pixels[:, :third, 0] = pixels[:, third : 2 * third, 1] = pixels[:, 2 * third :, 2] = 255
    return Image.fromarray(pixels)


def test_center_crop_keeps_the_middle_square():
    pixels = decode_image(encode(three_bands(96, 32)), config())
    assert (pixels[..., 1] == 255).all()
    assert (pixels[..., [0, 2]] == 0).all()


def test_squash_keeps_everything_and_pad_letterboxes_on_black():
    squashed = decode_image(encode(three_bands(96, 32)), config(image_size=12, resize="squash"))
    assert squashed[:, 0, 0].min() == 255
    assert squashed[:, -1, 2].min() == 255
    padded = decode_image(encode(Image.new("RGB", (64, 32), "white")), config(resize="pad"))
    assert (padded[:4] == 0).all()
    assert (padded[12:] == 0).all()
    assert (padded[4:12] == 255).all()


def test_exif_orientation_is_applied():
    upright = three_bands(48, 24)  # bands left to right
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer must turn it 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    pixels = decode_image(encode(stored, "JPEG", quality=95, exif=exif), config(resize="pad"))
    # Upright again and letterboxed: red band on the left, blue on the right.
    assert pixels[8, 1, 0] > 200
    assert pixels[8, 14, 2] > 200


@pytest.mark.parametrize("size", [(500, 375), (2000, 1500)], ids=["imagenet-size", "large"])
def test_jpeg_fast_path_matches_a_full_decode_and_resize(size):
    photo = Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.Resampling.BICUBIC)
    data = encode(photo, "JPEG", quality=90)
    fast = decode_image(data, config(image_size=224, patch_size=16)).astype(np.int16)
    slow = reference(Image.open(io.BytesIO(data)), 224).astype(np.int16)
    difference = np.abs(fast - slow)
    assert difference.mean() < 0.5, difference.mean()
    assert np.percentile(difference, 99) <= 2


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(load_sample_image("flower.jpg")), "JPEG")
    return data[: len(data) // 3]


def corrupt_jpeg() -> bytes:
    data = bytearray(encode(Image.new("RGB", (32, 32), "red"), "JPEG"))
    start = data.index(b"\xff\xc0")  # start of frame: break its marker and length
    data[start + 2 : start + 9] = b"\xff" * 7
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"<html>not an image</html>", "not an image"),
        (truncated_jpeg(), "corrupt image"),
        (corrupt_jpeg(), "corrupt image"),
        (png_bomb(100_000, 100_000), "too many pixels"),
    ],
    ids=["zero-byte", "html", "truncated", "corrupt", "bomb"],
)
def test_bad_bytes_raise_a_named_reason(data, reason):
    with pytest.raises(DecodeError, match=f"^{reason}"):
        decode_image(data, config())


def test_pixel_limit_is_the_configured_one():
    data = encode(Image.new("RGB", (200, 100)))
    with pytest.raises(DecodeError, match=r"200x100 = 20,000 > max_pixels 10,000"):
        decode_image(data, config(max_pixels=10_000))
    assert decode_image(data, config(max_pixels=20_000)).shape == (16, 16, 3)


def test_large_jpegs_are_decoded_at_reduced_dct_scale(monkeypatch):
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        before = self.size
        result = original(self, mode, size)
        scales.append(before[0] // self.size[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = encode(Image.new("RGB", (2000, 1500), "gray"), "JPEG")
    decode_image(data, config(image_size=224, patch_size=16))
    assert scales == [2]  # 1500/2 = 750 >= 2 x 224
    decode_image(data, config(image_size=64, patch_size=16))
    assert scales[-1] == 2  # 1/8 would still leave 187 >= 2 x 64, but its 1x1 IDCT aliases
    decode_image(data, config(image_size=384, patch_size=16))
    assert len(scales) == 2  # 750 < 2 x 384: decoded in full
