"""Evidence: parse the perceiver's JSON boxes, draw them on a copy of the image, crop the first three.

Coordinates are Qwen-VL's normalised 0..1000 on both axes. The drawing, padding and
cropping rules are the release's. Coordinates are kept as written, as the release keeps
them (outside 0..1000 too): IoU and drawing use them unchanged, and only a crop is clamped to
the image, after padding. What the release left undefined is decided here once: a box that
is not 4 finite numbers (NaN, infinities, booleans, strings) with x1 < x2 and y1 < y2 is
dropped (the release crashes drawing NaN).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from .images import PixelBudget, fit_to_budget, refit_edited

COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta")
MAX_CROPS = 3
PLACEHOLDER_LABEL = "description"
# A brace-free object, found inside prose or code fences. Each match ends at the next brace,
# so scanning stays linear in the text's length even for megabytes of unclosed objects.
_OBJECT = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class Box:
    """One valid evidence box: `bbox_2d` = (x1, y1, x2, y2) as written (0..1000 is the image), its label as
    text, and `raw_label`, the JSON value the perceiver wrote (None when missing), which the reward's label rule reads."""

    bbox_2d: tuple[float, float, float, float]
    label: str = ""
    raw_label: Any = field(default=None, compare=False, repr=False)

    @property
    def area(self) -> float:
        """Fraction of the image the box covers (0..1)."""
        x1, y1, x2, y2 = self.bbox_2d
        return (x2 - x1) * (y2 - y1) / 1e6

    def pixels(self, width: int, height: int, margin: int = 0) -> tuple[int, int, int, int]:
        """The release's pixel rectangle, `int(c / 1000 * side)`; with `margin`, each value is first held
        within `margin` pixels outside the image, where a line `margin` wide is invisible either way
        (a box at 1e300 would otherwise overflow the drawing code)."""
        x1, y1, x2, y2 = self.bbox_2d

        def px(c: float, side: int) -> int:
            value = c / 1000 * side
            return int(min(side + margin, max(-margin, value))) if margin else int(value)

        return px(x1, width), px(y1, height), px(x2, width), px(y2, height)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    ix = min(a.bbox_2d[2], b.bbox_2d[2]) - max(a.bbox_2d[0], b.bbox_2d[0])
    iy = min(a.bbox_2d[3], b.bbox_2d[3]) - max(a.bbox_2d[1], b.bbox_2d[1])
    inter = max(0.0, ix) * max(0.0, iy)
    union = a.area * 1e6 + b.area * 1e6 - inter
    return inter / union if union > 0 else 0.0


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (NaN, infinities, ints beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _box(obj: Any) -> Box | None:
    if not isinstance(obj, dict):
        return None
    coords = obj.get("bbox_2d")
    if not isinstance(coords, list) or len(coords) != 4:
        return None
    numbers = [_finite(c) for c in coords]
    if None in numbers:
        return None
    x1, y1, x2, y2 = numbers
    if not (x1 < x2 and y1 < y2):
        return None
    label = obj.get("label")
    text = label if isinstance(label, str) else "" if label is None else json.dumps(label)
    return Box((x1, y1, x2, y2), text, label)


def reply_objects(text: str) -> list[Any]:
    """The JSON values a perceiver reply holds, before any box rule: the whole reply parsed as a list or an
    object, else each parsable `{...}` naming `bbox_2d` in prose or code fences. `parse_boxes` keeps the valid
    boxes among them."""
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        return [parsed]
    if isinstance(parsed, list):
        return parsed
    objects = []
    for match in _OBJECT.finditer(text):
        if '"bbox_2d"' not in match.group(0):
            continue
        try:
            objects.append(json.loads(match.group(0)))
        except (ValueError, RecursionError):
            continue
    return objects


def parse_boxes(text: str) -> list[Box]:
    """All valid boxes in a perceiver output, in order; never raises on any string."""
    if not isinstance(text, str):
        return []
    return [box for box in map(_box, reply_objects(text.strip())) if box is not None]


def crop_rect(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The release's crop: the box padded by min(0.1, 600/side) of each side, clamped to the image."""
    pad_x, pad_y = min(0.1, 600 / width), min(0.1, 600 / height)
    x1, y1, x2, y2 = (c / 1000 for c in box.bbox_2d)
    x1, x2 = max(0.0, x1 - pad_x), min(1.0, x2 + pad_x)
    y1, y2 = max(0.0, y1 - pad_y), min(1.0, y2 + pad_y)
    return int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)


def _line_width(width: int) -> int:
    return max(3, int(0.003 * width))


def annotate(image: Image.Image, boxes: list[Box]) -> Image.Image:
    """A copy of the image with every box outlined, colours cycling in the release's order."""
    annotated = image.copy()
    draw = ImageDraw.Draw(annotated)
    line = _line_width(image.width)
    for i, box in enumerate(boxes):
        draw.rectangle(box.pixels(image.width, image.height, margin=line + 1), outline=COLORS[i % len(COLORS)], width=line)
    return annotated


def drawn_regions(boxes: list[Box], width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The rectangles (x0, y0, x1, y1, ends exclusive) that `annotate` may change: each outline's four bands,
    one pixel wider on every side; a box too small for separate bands counts whole, grown by a line width
    (Pillow draws each band a full line wide even where the box is thinner than that)."""
    line, regions = _line_width(width), []
    for box in boxes:
        x1, y1, x2, y2 = box.pixels(width, height, margin=line + 1)  # as `annotate` draws it
        if x2 - x1 < 2 * line + 2 or y2 - y1 < 2 * line + 2:
            bands = [(x1 - line, y1 - line, x2 + 1 + line, y2 + 1 + line)]
        else:
            bands = [(x1, y1, x2 + 1, y1 + line), (x1, y2 + 1 - line, x2 + 1, y2 + 1),
                     (x1, y1, x1 + line, y2 + 1), (x2 + 1 - line, y1, x2 + 1, y2 + 1)]  # fmt: skip
        for a, b, c, d in bands:
            regions.append((max(0, a - 1), max(0, b - 1), min(width, c + 1), min(height, d + 1)))
    return regions


@dataclass
class Evidence:
    """What the reason pass sees: annotated image + crops, or the original image alone."""

    images: list[Image.Image]
    boxes: list[Box] = field(default_factory=list)
    crops: list[tuple[int, int, int, int]] = field(default_factory=list)
    fitted_original: Image.Image | None = None  # the original image fitted to its budget, when already made

    @property
    def has_evidence(self) -> bool:
        return bool(self.crops)

    @property
    def mean_box_area(self) -> float:
        return sum(b.area for b in self.boxes) / len(self.boxes) if self.boxes else 0.0

    def fit(self, budget: PixelBudget, fitted_original: Image.Image | None = None) -> list[Image.Image]:
        """The images fitted to `budget`, the same bytes as `budget.fit(self.images)`. Given the original image's
        own fit (the perceive pass made it), the annotated image's fit is that one, resampled again only where
        the boxes were drawn: at 4K-8K the full resize was most of the evidence's cost."""
        if fitted_original is None:
            return budget.fit(self.images)
        if not self.has_evidence:
            return [fitted_original]
        width, height = self.images[0].size
        annotated = refit_edited(fitted_original, self.images[0], drawn_regions(self.boxes, width, height))
        crops = [
            fit_to_budget(im, budget.for_image(i), budget.min_pixels, budget.factor) for i, im in enumerate(self.images) if i
        ]
        return [annotated, *crops]


def gather_evidence(image: Image.Image, perceiver_output: str | list[Box], max_crops: int = MAX_CROPS) -> Evidence:
    """Evidence images for the reason pass; falls back to the original image when no box is usable."""
    boxes = parse_boxes(perceiver_output) if isinstance(perceiver_output, str) else list(perceiver_output)
    rects = [crop_rect(b, image.width, image.height) for b in boxes[:max_crops]]
    rects = [r for r in rects if r[2] > r[0] and r[3] > r[1]]
    if not rects:
        return Evidence(images=[image], boxes=boxes)
    crops = [image.crop(r) for r in rects]
    return Evidence(images=[annotate(image, boxes), *crops], boxes=boxes, crops=rects)
