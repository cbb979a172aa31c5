"""Inputs shared by the hf-engine, pipeline and vLLM tests: scenes, prompts and bad samples with known outcomes."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

from p2r_recipe import prompts
from p2r_recipe.images import PixelBudget, fit_to_budget
from p2r_recipe.prompts import Prompt
from p2r_recipe.records import Record, Sample

BUDGET = PixelBudget(max_pixels=256 * 32 * 32, crop_max_pixels=64 * 32 * 32)
SQUARES = {"red": (300, 200), "green": (1500, 700), "blue": (900, 950)}  # top-left corners, 40 px squares
MCA = "What colour is the square near the top left?\nA. red\nB. green\nC. blue\nD. yellow"


def engine_scene(width: int, height: int, seed: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (40 + 20 * seed, 90, 160))
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(["red", "yellow", "white"]):
        x, y = (97 * (i + seed)) % (width - 40), (53 * (i + 2 * seed)) % (height - 40)
        draw.rectangle((x, y, x + 30, y + 30), fill=colour)
    return image


def fitted(images: list[Image.Image]) -> list[Image.Image]:
    return [fit_to_budget(im, BUDGET.for_image(i), BUDGET.min_pixels) for i, im in enumerate(images)]


def one_image(seed: int, question: str = "What colour is the square?") -> Prompt:
    return Prompt(prompts.direct_text(question, "one_word"), fitted([engine_scene(1280, 720, seed)]))


def with_crops(seed: int) -> Prompt:
    full = engine_scene(1280, 720, seed)
    crops = [full.crop(box) for box in [(100, 100, 400, 300), (0, 0, 90, 500), (600, 200, 1240, 260)]]
    return Prompt(prompts.reason_text("Which square is largest?", "mca", True), fitted([full, *crops]))


def scene(shade: int = 0) -> Image.Image:
    """A 1920x1080 picture with three small coloured squares to find."""
    image = Image.new("RGB", (1920, 1080), (200 - shade, 200, 190 + shade))
    draw = ImageDraw.Draw(image)
    for colour, (x, y) in SQUARES.items():
        draw.rectangle((x, y, x + 40, y + 40), fill=colour)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header announcing 3.6 gigapixels (a decompression bomb), with no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def samples(tmp_path: Path) -> list[Sample]:
    """Three good samples (PIL, PNG bytes, a JPEG file) around three bad ones."""
    jpeg, empty = tmp_path / "scene.jpg", tmp_path / "empty.png"
    scene(2).save(jpeg, quality=90)
    empty.write_bytes(b"")
    return [
        Sample("pil", MCA, [scene()], "mca", "A"),
        Sample("corrupt", MCA, [png_bytes(scene())[:60] + b"garbage"], "mca", "A"),
        Sample("bytes", "How many squares are there?", [png_bytes(scene(1))], "na", "3"),
        Sample("empty", MCA, [str(empty)], "mca", "A"),
        Sample("bomb", MCA, [bomb_png()], "mca", "A"),
        Sample("file", "Is there a blue square?", [str(jpeg)], "yes_no", "yes"),
    ]


BAD = {"corrupt": "unreadable image", "empty": "empty image file", "bomb": "image too large"}


def check_bad(record: Record) -> None:
    assert record.error.startswith("image: ") and BAD[record.id] in record.error
    assert record.prompts == [] and record.output_tokens == 0 and record.raw_answer == ""
