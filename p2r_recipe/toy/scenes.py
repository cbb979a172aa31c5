"""Toy scenes: synthetic high-resolution images whose answer is a detail only a crop can show.

A scene is a muted gradient backdrop with scenery blobs and grey pebbles, plus one coloured
tile, 100 x 100 in Qwen-VL's 0..1000 coordinates (a tenth of the width and of the height),
centred in a cell of a 5 x 5 grid, so a box is right or wrong by whole places. The tile is
its colour striped with white in one of four patterns, the stripes a 450th of the width wide:
at the main job's budget of 65,536 pixels (about 300 x 200) every pattern blurs to the same
flat tint, while the release's crop of the tile (box padded by min(0.1, 600/side)) at the same
budget shows it. The question asks for the tile's pattern, naming the tile by its colour, with
the four patterns as options in one fixed order.

Scenes come from a seed through `random.Random.random()` only (whose sequence Python
guarantees) and are drawn with integer numpy masks, so they rebuild bit-identically.
The embedded demo (demo.py) and the tiny model's training data (trainer.py) both use
this module, with disjoint seeds.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

PALETTE = {
    "red": (220, 30, 30),
    "green": (20, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 210, 0),
    "orange": (245, 125, 0),
    "purple": (130, 40, 170),
    "black": (15, 15, 15),
}
PATTERNS = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard")
# Muted backdrop colours: every channel in 150..235 and a spread under 40, so no backdrop
# pixel can equal a palette colour.
MUTED = ((214, 206, 190), (190, 205, 214), (205, 214, 196), (222, 212, 222), (200, 200, 188), (226, 220, 204))
WHITE = (255, 255, 255)
TILE = 100  # side of a tile in 0..1000 coordinates
CELL = 200  # the placement grid's cell: a tile sits in a cell's middle
QUESTIONS = (
    "What is the pattern on the {colour} tile?",
    "Which pattern does the {colour} tile have?",
    "What pattern is printed on the {colour} tile?",
)


class Rng:
    """Draws built only on random.random(), whose sequence for a seed is stable across Python versions."""

    def __init__(self, seed: int):
        self._random = random.Random(seed)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._random.random()

    def below(self, n: int) -> int:
        return min(n - 1, int(self._random.random() * n))

    def choice(self, items: Sequence):
        return items[self.below(len(items))]

    def shuffled(self, items: Sequence) -> list:
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out

    def sample(self, items: Sequence, k: int) -> list:
        return self.shuffled(items)[:k]


@dataclass(frozen=True)
class Tile:
    """A coloured, patterned tile whose top-left corner is (x, y) in 0..1000 coordinates."""

    colour: str
    pattern: str
    x: int
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} tile"

    @property
    def bbox_2d(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + TILE, self.y + TILE

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The tile's pixel rectangle (x0, y0, x1, y1), end-exclusive."""
        x1, y1, x2, y2 = self.bbox_2d
        return x1 * width // 1000, y1 * height // 1000, x2 * width // 1000, y2 * height // 1000


@dataclass(frozen=True)
class Scene:
    """One image: its size, tiles, and the seed its backdrop is drawn from."""

    width: int
    height: int
    tiles: tuple[Tile, ...]
    seed: int


@dataclass(frozen=True)
class Asked:
    """A question about one tile of a scene: text, four options, the answer's letter, the tile."""

    question: str
    options: tuple[str, ...]
    answer: str
    target: Tile


def scene(rng: Rng, width: int, height: int, seed: int) -> Scene:
    """One tile of a random colour and pattern in the middle of a random cell of the 5 x 5 grid."""
    colour, pattern = rng.choice(list(PALETTE)), rng.choice(PATTERNS)
    margin, cells = (CELL - TILE) // 2, 1000 // CELL
    x, y = CELL * rng.below(cells) + margin, CELL * rng.below(cells) + margin
    return Scene(width, height, (Tile(colour, pattern, x, y),), seed)


def ask(rng: Rng, scene: Scene) -> Asked:
    """A pattern question about one of the scene's tiles, the four patterns as options in PATTERNS' order
    (a toy this small learns to read a pattern, not also to find it among shuffled options)."""
    target = rng.choice(scene.tiles)
    question = rng.choice(QUESTIONS).format(colour=target.colour)
    return Asked(question, PATTERNS, "ABCD"[PATTERNS.index(target.pattern)], target)


def stripe_width(width: int) -> int:
    """Pixels per stripe: 22 stripe pairs across a tile, at least 2 pixels so each stays visible."""
    return max(2, round(width / 450))


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, s: int) -> np.ndarray:
    """Where the tile shows its colour (elsewhere white), from integer pixel offsets inside the tile."""
    if pattern == "horizontal stripes":
        return (v // s) % 2 == 0
    if pattern == "vertical stripes":
        return (u // s) % 2 == 0
    if pattern == "diagonal stripes":
        return ((u + v) // s) % 2 == 0
    if pattern == "checkerboard":
        return (u // s + v // s) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}")


def _ellipse(canvas: np.ndarray, x: int, y: int, rx: int, ry: int, colour: tuple[int, ...]) -> None:
    height, width = canvas.shape[:2]
    y0, y1, x0, x1 = max(0, y - ry), min(height, y + ry + 1), max(0, x - rx), min(width, x + rx + 1)
    dy, dx = np.ogrid[y0 - y : y1 - y, x0 - x : x1 - x]
    canvas[y0:y1, x0:x1][(dx * dx) * (ry * ry) + (dy * dy) * (rx * rx) <= (rx * rx) * (ry * ry)] = colour


def _backdrop(rng: Rng, width: int, height: int) -> np.ndarray:
    """A diagonal gradient between two muted colours, in integer arithmetic, band by band to bound memory."""
    start, end = (np.array(c, dtype=np.int64) for c in rng.sample(MUTED, 2))
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    xs = np.arange(width, dtype=np.int64) * height
    for y0 in range(0, height, 512):
        ys = np.arange(y0, min(height, y0 + 512), dtype=np.int64)[:, None] * width
        t = (xs[None, :] + ys)[..., None]
        canvas[y0 : y0 + len(ys)] = start + ((end - start) * t) // (2 * width * height)
    return canvas


def render(scene: Scene) -> Image.Image:
    """Draw a scene: backdrop, scenery blobs, grey pebbles kept off the tiles, then the tiles."""
    rng = Rng(scene.seed + 500_000)
    width, height, short = scene.width, scene.height, min(scene.width, scene.height)
    canvas = _backdrop(rng, width, height)
    for _ in range(5 + rng.below(4)):
        shade = np.clip(np.array(rng.choice(MUTED)) + round(rng.uniform(-25, 10)), 150, 235)
        x, y = round(rng.uniform(0, width)), round(rng.uniform(0, height))
        rx, ry = round(rng.uniform(0.08, 0.3) * short), round(rng.uniform(0.08, 0.3) * short)
        _ellipse(canvas, x, y, rx, ry, tuple(int(c) for c in shade))
    rects = [t.pixels(width, height) for t in scene.tiles]
    for _ in range(30):
        x, y, r = round(rng.uniform(0, width)), round(rng.uniform(0, height)), round(rng.uniform(0.01, 0.025) * width)
        grey = 120 + rng.below(50)
        if all(x + r < x0 or x - r >= x1 or y + r < y0 or y - r >= y1 for x0, y0, x1, y1 in rects):
            _ellipse(canvas, x, y, r, r, (grey, grey, grey))
    s = stripe_width(width)
    for tile, (x0, y0, x1, y1) in zip(scene.tiles, rects):
        v, u = np.ogrid[0 : y1 - y0, 0 : x1 - x0]
        region = canvas[y0:y1, x0:x1]
        region[...] = WHITE
        region[np.broadcast_to(_pattern_mask(tile.pattern, u, v, s), region.shape[:2])] = PALETTE[tile.colour]
    return Image.fromarray(canvas)
