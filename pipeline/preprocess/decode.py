"""Image bytes to a square uint8 array of the model's size: the per-sample core of preprocessing.

Speed comes from two places, both measured in benchmarks/bench_preprocess.py: JPEGs are decoded at a
reduced DCT scale when the target is much smaller (PIL `draft`, libjpeg-turbo's scaled IDCT), and the
antialiased resize runs in torch's vectorised uint8 kernel rather than Pillow's.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.config import PreprocessConfig
from pipeline.preprocess.samples import SampleError

DRAFT_GAP = 2
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class DecodeError(SampleError):
    """An image that cannot be used; the message starts with the kind of problem (`corrupt image: ...`)."""


def decode_image(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Decode, orient, convert and resize one image to `[image_size, image_size, channels]` uint8."""
    if not data:
        raise DecodeError("empty file: 0 bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise DecodeError(f"not an image: no image format recognises these {len(data)} bytes") from None
        except Image.DecompressionBombError as error:
            raise DecodeError(f"too many pixels: {error}") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise DecodeError(f"corrupt image: {error}") from None
        width, height = image.size
        if width * height > config.max_pixels:
            raise DecodeError(
                f"too many pixels: {width}x{height} = {width * height:,} > max_pixels {config.max_pixels:,} "
                "(a decompression bomb, or raise max_pixels)"
            )
        if image.format == "JPEG":
            _draft(image, config)
        try:
            image.load()
            image = _oriented(image)
            pixels = to_channels(image, config.channels)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise DecodeError(f"corrupt image: {error}") from None
    return fit(pixels, config.image_size, config.resize, config.resample)


def _draft(image: Image.Image, config: PreprocessConfig) -> None:
    """Let libjpeg decode at half scale (its scaled IDCT) when twice the target still fits in half.

    Against a full decode (mean |difference| per pixel, 0-255) half scale costs nothing visible:
    under 0.5 for 2000x1500 photos to 224 (tests/test_preprocess_decode.py), where decode+resize
    is 3.6x faster (benchmarks/bench_preprocess.py). Quarter and eighth scales differed by 1-4.6
    in a one-off check (their 2x2 and 1x1 IDCTs alias), so they are not used.
    """
    width, height = image.size
    side = max(width, height) if config.resize == "pad" else min(width, height)
    if DRAFT_GAP * config.image_size > side // 2:
        return
    mode = "L" if config.channels == 1 and image.mode == "RGB" else None
    image.draft(mode, (width // 2, height // 2))


def _oriented(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block leaves the image as stored."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
            return image  # upright already: no copy
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error):
        return image


def to_channels(image: Image.Image, channels: int) -> np.ndarray:
    """Any Pillow mode as `[H, W, channels]` uint8: 16-bit scaled to 8, transparency over white."""
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        image = Image.fromarray(rgb, mode="RGB")
    target = "RGB" if channels == 3 else "L"
    if image.mode != target:
        image = image.convert(target)
    pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def fit(pixels: np.ndarray, size: int, policy: str, resample: str) -> np.ndarray:
    """Resize `[H, W, C]` to `[size, size, C]` by the named policy, antialiased.

    shorter-side-center-crop: the central square, scaled to size (the shorter side becomes `size`).
    squash: both sides scaled to `size`, aspect ratio not kept.
    pad: the longer side scaled to `size`, centred on black.
    """
    height, width = pixels.shape[:2]
    if policy == "shorter-side-center-crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return _resize(pixels[top : top + side, left : left + side], size, size, resample)
    if policy == "squash":
        return _resize(pixels, size, size, resample)
    scale = size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    canvas = np.zeros((size, size, pixels.shape[2]), dtype=np.uint8)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    canvas[top : top + new_height, left : left + new_width] = _resize(pixels, new_height, new_width, resample)
    return canvas


def _resize(pixels: np.ndarray, height: int, width: int, resample: str) -> np.ndarray:
    if pixels.shape[:2] == (height, width):
        return np.ascontiguousarray(pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only array from Pillow; it is only read
        # [1, C, H, W] with channels-last strides: torch's uint8 kernel then reads and writes
        # interleaved pixels directly, and the result needs no transposing copy.
        batch = torch.from_numpy(pixels).unsqueeze(0).permute(0, 3, 1, 2)
    resized = F.interpolate(batch, size=(height, width), mode=resample, antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).numpy()
