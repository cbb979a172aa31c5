"""Safe image loading (limits, EXIF, modes), Qwen-VL pixel budgets, and encoding for sending."""

from __future__ import annotations

import base64
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

# PIL's own decompression-bomb threshold (89 MP); HR-Bench 8K images are 33 MP.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
MAX_ASPECT_RATIO = 200
# Qwen3-VL: 16-pixel patches merged 2x2, so image sides are multiples of 32.
QWEN_FACTOR = 32


class ImageError(ValueError):
    """An input image that cannot be used; the message is the per-sample reason."""


@dataclass(frozen=True)
class PixelBudget:
    """Qwen-VL pixel budgets: the first image gets `max_pixels`, crops get `crop_max_pixels`."""

    max_pixels: int = 4096 * 32 * 32
    min_pixels: int = 16 * 32 * 32
    crop_max_pixels: int = 4096 * 32 * 32
    factor: int = QWEN_FACTOR

    def for_image(self, index: int) -> int:
        return self.max_pixels if index == 0 else self.crop_max_pixels


# The release trains with smart_resize to at most 2,097,152 pixels.
TRAIN_BUDGET = PixelBudget(max_pixels=2_097_152, crop_max_pixels=2_097_152)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's rule: sides rounded to multiples of `factor`, area kept within [min, max] pixels."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def fit_to_budget(image: Image.Image, max_pixels: int, min_pixels: int, factor: int = QWEN_FACTOR) -> Image.Image:
    """Resize to the size the Qwen-VL processor would pick, so every backend sees the same pixels."""
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    if (w, h) == image.size:
        return image
    return image.resize((w, h), Image.Resampling.BICUBIC)


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: applies EXIF rotation, flattens transparency on white, converts CMYK/16-bit/palette."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping to white.
        peak = max(1, image.getextrema()[1] or 1)
        image = image.point(lambda v: v * 255 / peak).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(source: Any) -> Image.Image:
    """Open a path, bytes, data URL or PIL image as an upright RGB image, or raise ImageError with the reason."""
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _read_bytes(source)
        if not data:
            raise ImageError("empty image file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                _check_size(image.width, image.height)
                image.seek(0)  # first frame of an animation
                image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image too large: {exc}") from None
        except Exception as exc:  # PIL raises many types for corrupt data
            raise ImageError(f"unreadable image: {type(exc).__name__}: {exc}") from None
    _check_size(image.width, image.height)
    try:
        return to_rgb(image)
    except Exception as exc:
        raise ImageError(f"unsupported image mode {image.mode}: {exc}") from None


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"empty image {width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"image too large: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels")


def _read_bytes(source: Any) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, dict) and "bytes" in source:  # HF datasets' Image feature
        return source["bytes"] or (Path(source["path"]).read_bytes() if source.get("path") else b"")
    if isinstance(source, str) and source.startswith("data:"):
        try:
            return base64.b64decode(source.split(",", 1)[1], validate=True)
        except Exception as exc:
            raise ImageError(f"bad data URL: {exc}") from None
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {source}: {exc.strerror}") from None


def encode_image(image: Image.Image, fmt: str = "JPEG", quality: int = 95) -> bytes:
    """Encode for sending; JPEG by default since it is what servers decode fastest and smallest."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(image: Image.Image, fmt: str = "JPEG") -> str:
    """An image as a base64 data URL for OpenAI-compatible chat messages."""
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(encode_image(image, fmt)).decode()

