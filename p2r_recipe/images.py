"""Safe image loading (limits, EXIF, modes), Qwen-VL pixel budgets, and encoding for sending."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .release import (
    EVAL_MAX_PIXELS,
    EVAL_MIN_PIXELS,
    QWEN_FACTOR,
    TRAIN_JPEG_QUALITY,  # noqa: F401  (re-exported under its old name)
    TRAIN_MAX_PIXELS,
    TRAIN_MIN_PIXELS,
)

# PIL's own decompression-bomb threshold (89 MP); HR-Bench 8K images are 33 MP.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Pixels all the images of one request (p2r-serve) or one training row may decode to together, read
# from their headers before any is decoded: one largest allowed image's worth, so 16 small files
# cannot decode to 16 times the per-image limit (P2R's four images, the original and three crops
# of it, stay far below).
MAX_TOTAL_PIXELS = MAX_IMAGE_PIXELS
# Raster formats Pillow decodes in-process. Nothing else is even identified: EPS would run
# Ghostscript on the file's bytes, and no dataset of P2R's uses another format.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Pillow's JPEG reader returns multi-picture JPEGs (as phones write them) as MPO.
_OPENED_AS = {*IMAGE_FORMATS, "MPO"}
MAX_ASPECT_RATIO = 200
# Below this many pixels a resize is too quick to be worth splitting across threads.
_SPLIT_MIN_PIXELS = 1 << 20
_RESIZE_THREADS = min(8, os.cpu_count() or 1)
_resize_pool: ThreadPoolExecutor | None = None


def _renew_resize_pool() -> None:
    global _resize_pool
    _resize_pool = ThreadPoolExecutor(_RESIZE_THREADS, thread_name_prefix="p2r-resize") if _RESIZE_THREADS > 1 else None


_renew_resize_pool()
# A forked child (a DataLoader worker, say) inherits the pool without its threads: a resize there would wait forever.
os.register_at_fork(after_in_child=_renew_resize_pool)


class ImageError(ValueError):
    """An input image that cannot be used; the message is the per-sample reason."""


class PixelAllowance:
    """The decoded pixels a group of images (one request, one training row) may still take;
    `load_image` draws on it from each image's header, before decoding the image."""

    def __init__(self, total: int = MAX_TOTAL_PIXELS):
        self.total = self.left = total

    def take(self, width: int, height: int) -> None:
        if width * height > self.left:
            raise ImageError(
                f"images too large together: {width}x{height} would pass the {self.total} pixel budget "
                f"of one request or training row ({self.total - self.left} pixels already taken)"
            )
        self.left -= width * height


@dataclass(frozen=True)
class PixelBudget:
    """Qwen-VL pixel budgets: the first image gets `max_pixels`, crops get `crop_max_pixels` (default: the release's evaluation)."""

    max_pixels: int = EVAL_MAX_PIXELS
    min_pixels: int = EVAL_MIN_PIXELS
    crop_max_pixels: int = EVAL_MAX_PIXELS
    factor: int = QWEN_FACTOR

    def for_image(self, index: int) -> int:
        return self.max_pixels if index == 0 else self.crop_max_pixels

    def fit(self, images: list[Image.Image]) -> list[Image.Image]:
        """A prompt's images, each resized to its budget (the first to `max_pixels`, the rest as crops)."""
        return [fit_to_budget(im, self.for_image(i), self.min_pixels, self.factor) for i, im in enumerate(images)]


# The release trains with smart_resize to at most 2,097,152 pixels and at least 4,096 (qwen-vl-utils'
# default, which its rollouts and its service calls both use), every image alike.
TRAIN_BUDGET = PixelBudget(max_pixels=TRAIN_MAX_PIXELS, min_pixels=TRAIN_MIN_PIXELS, crop_max_pixels=TRAIN_MAX_PIXELS)


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
    return resize_bicubic(image, (w, h))


def resize_bicubic(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Exactly `image.resize(size, BICUBIC)`, split across threads for large RGB images.

    Pillow resizes in two passes: the horizontal pass maps each row on its own and the
    vertical pass each column on its own, with weights that depend only on the whole
    image's sizes. Row bands (horizontal pass) and column strips (vertical pass) resized
    separately therefore give the same bytes, and Pillow releases the GIL while it resamples.
    """
    width, height = size
    # Pillow >= 13 runs the vertical pass first when the height shrinks more than twice as much
    # as the width; the split runs horizontal first, so that two-pass case stays one call.
    vertical_first = width != image.width and image.height - height > max(0, 2 * (image.width - width))
    small = max(image.width, width) * max(image.height, height) < _SPLIT_MIN_PIXELS
    if _resize_pool is None or image.mode != "RGB" or small or vertical_first:
        return image.resize(size, Image.Resampling.BICUBIC)
    if width != image.width:
        image = _in_parts(image, (width, image.height), rows=True)
    if height != image.height:
        image = _in_parts(image, (width, height), rows=False)
    return image


def _in_parts(image: Image.Image, size: tuple[int, int], rows: bool) -> Image.Image:
    """One resampling pass (horizontal when `rows`, else vertical), one band of rows or strip of columns per thread."""
    extent = image.height if rows else image.width
    cuts = [extent * i // _RESIZE_THREADS for i in range(_RESIZE_THREADS + 1)]

    def part(lo: int, hi: int) -> Image.Image:
        if rows:
            return image.crop((0, lo, image.width, hi)).resize((size[0], hi - lo), Image.Resampling.BICUBIC)
        return image.crop((lo, 0, hi, image.height)).resize((hi - lo, size[1]), Image.Resampling.BICUBIC)

    out = Image.new(image.mode, size)
    for lo, piece in zip(cuts, _resize_pool.map(part, cuts[:-1], cuts[1:])):
        out.paste(piece, (0, lo) if rows else (lo, 0))
    return out


# How a decoded image becomes RGB: `release` is the P2R release's plain `convert("RGB")` (no
# EXIF rotation; transparency dropped, the colour stored under it kept), `robust` makes odd
# inputs usable (EXIF rotation, transparency flattened on white, 16-bit scaled to 8 bits).
IMAGE_MODES = ("release", "robust")


def check_image_mode(image_mode: str) -> None:
    """A ValueError unless `image_mode` is one of IMAGE_MODES; entry points call it before any work."""
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"unknown image_mode {image_mode!r}; expected one of {', '.join(IMAGE_MODES)}")


def to_rgb(image: Image.Image, image_mode: str = "robust") -> Image.Image:
    """An RGB image by the rule of `image_mode` (see IMAGE_MODES)."""
    check_image_mode(image_mode)
    if image_mode == "release":
        return image if image.mode == "RGB" else image.convert("RGB")
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


def decode_image(source: Any, allowance: PixelAllowance | None = None) -> Image.Image:
    """Open a path, bytes, data URL or PIL image as decoded pixels in their stored mode (first frame
    of an animation), or raise ImageError with the reason: formats, limits, bombs and truncation are
    checked here. Only `IMAGE_FORMATS` are opened; `allowance`, when given, is charged with the
    image's pixels from its header, before it is decoded."""
    if isinstance(source, Image.Image):
        if source.format is not None and source.format not in _OPENED_AS:
            raise ImageError(f"image format {source.format} is not allowed (allowed: {', '.join(IMAGE_FORMATS)})")
        _check_size(source.width, source.height)
        if allowance is not None:
            allowance.take(source.width, source.height)
        return source
    data = _read_bytes(source)
    if not data:
        raise ImageError("empty image file")
    try:
        with warnings.catch_warnings(), _strict_decoding():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            _check_size(image.width, image.height)
            if allowance is not None:
                allowance.take(image.width, image.height)
            image.seek(0)  # first frame of an animation
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"unreadable image: not a {', '.join(IMAGE_FORMATS)} file") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageError(f"unreadable image: {type(exc).__name__}: {exc}") from None
    _check_size(image.width, image.height)
    return image


def load_image(source: Any, image_mode: str = "robust", allowance: PixelAllowance | None = None) -> Image.Image:
    """`decode_image`, then RGB by the rule of `image_mode`; any failure is an ImageError with the reason."""
    check_image_mode(image_mode)  # before decoding: a wrong mode should not cost a decode first
    image = decode_image(source, allowance)
    try:
        return to_rgb(image, image_mode)
    except Exception as exc:
        raise ImageError(f"unsupported image mode {image.mode}: {exc}") from None


_strict_lock = threading.Lock()
_strict_users = 0
_tolerant_setting = False


@contextlib.contextmanager
def _strict_decoding():
    """Truncated files fail here even where a library made PIL pad them process-wide (lmms-eval sets
    ImageFile.LOAD_TRUNCATED_IMAGES at import): a half-grey image must be an error, not an input.
    The setting is restored when the last concurrent load ends."""
    global _strict_users, _tolerant_setting
    with _strict_lock:
        if _strict_users == 0:
            _tolerant_setting, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _tolerant_setting


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


def data_url(image: Image.Image, fmt: str = "JPEG", quality: int = 95) -> str:
    """An image as a base64 data URL for OpenAI-compatible chat messages."""
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(encode_image(image, fmt, quality)).decode()


# Pillow's fixed-point precision for 8-bit resampling (libImaging/Resample.c).
_PRECISION_BITS = 22


def refit_edited(fitted: Image.Image, edited: Image.Image, regions: list[tuple[int, int, int, int]]) -> Image.Image:
    """`edited.resize(fitted.size, BICUBIC)`, byte for byte, given `fitted`: the same resize of the image before
    the source rectangles `regions` (x0, y0, x1, y1) of it were changed (e.g. boxes drawn on it).

    Only the output pixels whose bicubic support reaches into a changed rectangle are resampled again, with
    Pillow's own coefficients and fixed-point arithmetic, horizontal pass first (as Pillow does unless
    `resize_bicubic`'s vertical-first case applies; that case, and non-RGB images, resize the whole image).
    """
    if fitted.size == edited.size:
        return edited
    width, height = fitted.size
    vertical_first = width != edited.width and edited.height - height > max(0, 2 * (edited.width - width))
    if vertical_first or edited.mode != "RGB" or fitted.mode != "RGB":
        return resize_bicubic(edited, fitted.size)
    (xmin, xlen, xk), (ymin, ylen, yk) = _coefficients(edited.width, width), _coefficients(edited.height, height)
    out = fitted.copy()  # pasted into: converting it to an array and back costs more than the resampling
    for x0, y0, x1, y1 in regions:
        # Outputs whose taps [min, min + len) overlap the changed span: a contiguous run, as both ends grow with it.
        cols = np.flatnonzero((xmin < x1) & (xmin + xlen > x0))
        rows = np.flatnonzero((ymin < y1) & (ymin + ylen > y0))
        if not len(cols) or not len(rows):
            continue
        c0, c1, r0, r1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
        first, last = ymin[r0], int((ymin[r0:r1] + ylen[r0:r1]).max())
        left, right = xmin[c0], int((xmin[c0:c1] + xlen[c0:c1]).max())
        # Only the source pixels these outputs read: copying the whole 8K image would cost more than the resampling.
        source = np.asarray(edited.crop((left, first, right, last)))
        between = _resample(source, xmin[c0:c1] - left, xk[c0:c1], axis=1)
        out.paste(Image.fromarray(_resample(between, ymin[r0:r1] - first, yk[r0:r1], axis=0)), (int(c0), int(r0)))
    return out


def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's bicubic taps for every output position of one axis: first input index, tap count, and the
    weights in fixed point (precompute_coeffs + normalize_coeffs_8bpc, the same double arithmetic)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = np.arange(int(math.ceil(support)) * 2 + 1)
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    x = np.abs((taps[None, :] + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    a = -0.5
    weights = np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1, np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))
    weights = np.where(taps[None, :] < count[:, None], weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.where(total != 0.0, weights / np.where(total != 0.0, total, 1.0), weights)
    fixed = np.where(weights < 0, -0.5 + weights * (1 << _PRECISION_BITS), 0.5 + weights * (1 << _PRECISION_BITS))
    return first, count, fixed.astype(np.int64)


def _resample(pixels: np.ndarray, first: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """One 8-bit pass of Pillow's resampling over `pixels` (rows, columns, channels) along `axis`, for the
    outputs whose taps start at `first`; rounds and clips as Pillow's clip8 does."""
    index = np.minimum(first[:, None] + np.arange(weights.shape[1])[None, :], pixels.shape[axis] - 1)
    gathered = np.take(pixels, index, axis=axis).astype(np.int64)
    if axis == 1:
        total = np.einsum("rokc,ok->roc", gathered, weights)
    else:
        total = np.einsum("okwc,ok->owc", gathered, weights)
    return np.clip((total + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS, 0, 255).astype(np.uint8)
