"""The embedded demo benchmark: synthetic high-resolution images with small targets, in V* and HR-Bench formats.

Each image is a gentle diagonal gradient with large muted scenery blobs and grey pebbles,
plus four or five small shapes of distinct kinds, each in one saturated palette colour.
Questions ask for a shape's colour or kind (V* Attr / HR-Bench FSP), the side one shape
is on relative to another (V* Spatial), or compare two or more shapes (HR-Bench FCP).
The scene of every question is generated from a fixed seed with `random.Random.random()`
only (whose sequence Python guarantees) and drawn with integer numpy masks, so the files
can be rebuilt bit-identically in pixels; `questions()` returns the scenes, which is how
the tests check every answer against the drawn pixels.

    python -m p2r_recipe.demo [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .benchmarks import HRBENCH, VSTAR, VSTAR_SUFFIX, Benchmark
from .pipeline import Sample

SEED = 2607_01191
DATA_DIR = Path(__file__).resolve().parent.parent / "lmms_eval_tasks" / "p2r_demo" / "data"

PALETTE = {
    "red": (220, 30, 30),
    "green": (20, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 210, 0),
    "orange": (245, 125, 0),
    "purple": (130, 40, 170),
    "black": (15, 15, 15),
}
KINDS = ("circle", "square", "triangle", "diamond", "cross")
# Muted backdrop colours: every channel in 150..235 and a spread under 40, so no backdrop
# pixel can equal a palette colour.
MUTED = ((214, 206, 190), (190, 205, 214), (205, 214, 196), (222, 212, 222), (200, 200, 188), (226, 220, 204))


@dataclass(frozen=True)
class Split:
    """One demo file: its benchmark's record format, image sizes, shape radii (fractions of width), categories."""

    benchmark: Benchmark
    sizes: tuple[tuple[int, int], ...]
    radius: tuple[float, float]
    categories: tuple[str, ...]


SPLITS = {
    "vstar": Split(VSTAR, ((2246, 1582), (2048, 1536), (2560, 1440), (1920, 1440)), (0.009, 0.013),
                   ("direct_attributes", "relative_position") * 6),
    "hrbench_4k": Split(HRBENCH, ((3840, 2160),), (0.006, 0.009), ("single", "cross") * 3),
    "hrbench_8k": Split(HRBENCH, ((7680, 4320),), (0.004, 0.006), ("single", "cross") * 3),
}  # fmt: skip
DEMO_TASKS = {f"p2r_demo_{name}": name for name in SPLITS}


class _Rng:
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
class Shape:
    """A small target: kind, palette colour, centre and radius in pixels."""

    kind: str
    colour: str
    x: int
    y: int
    r: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Question:
    """One demo question with the scene it is asked about."""

    split: str
    index: int
    category: str
    question: str
    options: tuple[str, ...]
    answer: str
    width: int
    height: int
    shapes: tuple[Shape, ...]
    seed: int


Radius = tuple[float, float]
# A template's output: question, options, answer letter, and the scene's shapes.
Asked = tuple[str, list[str], str, tuple[Shape, ...]]


def _place(rng: _Rng, width: int, height: int, radius: Radius, colours: list[str]) -> tuple[Shape, ...]:
    """Shapes of distinct kinds at well separated positions, away from the borders."""
    kinds = rng.sample(KINDS, len(colours))
    margin, gap = 0.06 * min(width, height), 0.14 * min(width, height)
    while True:
        shapes = []
        for kind, colour in zip(kinds, colours):
            r = round(rng.uniform(*radius) * width)
            x, y = round(rng.uniform(margin, width - margin)), round(rng.uniform(margin, height - margin))
            shapes.append(Shape(kind, colour, x, y, r))
        if all(np.hypot(a.x - b.x, a.y - b.y) > gap for i, a in enumerate(shapes) for b in shapes[i + 1 :]):
            return tuple(shapes)


def _options(rng: _Rng, correct: str, others: Sequence[str], count: int = 4) -> tuple[list[str], str]:
    options = rng.shuffled([correct, *rng.sample([o for o in others if o != correct], count - 1)])
    return options, "ABCD"[options.index(correct)]


def _colour_of_kind(rng: _Rng, width: int, height: int, radius: Radius) -> Asked:
    shapes = _place(rng, width, height, radius, [rng.choice(list(PALETTE)) for _ in range(rng.choice((4, 5)))])
    target = rng.choice(shapes)
    options, answer = _options(rng, target.colour, list(PALETTE))
    return f"What is the color of the {target.kind}?", options, answer, shapes


def _kind_of_colour(rng: _Rng, width: int, height: int, radius: Radius) -> Asked:
    shapes = _place(rng, width, height, radius, rng.sample(list(PALETTE), rng.choice((4, 5))))
    target = rng.choice(shapes)
    options, answer = _options(rng, target.kind, KINDS)
    return f"Which shape is drawn in {target.colour}?", options, answer, shapes


def _pair(rng: _Rng, width: int, height: int, radius: Radius, axis: str) -> tuple[tuple[Shape, ...], Shape, Shape]:
    """A scene and two of its shapes at least a fifth of the image apart along `axis`."""
    while True:
        shapes = _place(rng, width, height, radius, [rng.choice(list(PALETTE)) for _ in range(4)])
        a, b = rng.sample(shapes, 2)
        apart = abs(a.x - b.x) / width if axis == "x" else abs(a.y - b.y) / height
        if apart >= 0.2:
            return shapes, a, b


def _left_or_right(rng: _Rng, width: int, height: int, radius: Radius) -> Asked:
    shapes, a, b = _pair(rng, width, height, radius, "x")
    options = rng.shuffled(["left", "right"])
    correct = "left" if a.x < b.x else "right"
    question = f"Is the {a.name} on the left or right side of the {b.name}?"
    return question, options, "AB"[options.index(correct)], shapes


def _higher(rng: _Rng, width: int, height: int, radius: Radius) -> Asked:
    shapes, a, b = _pair(rng, width, height, radius, "y")
    choices = [f"the {a.name}", f"the {b.name}", "they are at the same height", "neither of them is in the image"]
    options = rng.shuffled(choices)
    correct = choices[0] if a.y < b.y else choices[1]
    question = f"Which object is closer to the top of the image, the {a.name} or the {b.name}?"
    return question, options, "ABCD"[options.index(correct)], shapes


def _colours_of_two(rng: _Rng, width: int, height: int, radius: Radius) -> Asked:
    shapes = _place(rng, width, height, radius, [rng.choice(list(PALETTE)) for _ in range(rng.choice((4, 5)))])
    a, b = rng.sample(shapes, 2)
    pairs = [f"{x} and {y}" for x in PALETTE for y in PALETTE]
    options, answer = _options(rng, f"{a.colour} and {b.colour}", pairs)
    return f"What are the colors of the {a.kind} and the {b.kind}, respectively?", options, answer, shapes


def _count_colour(rng: _Rng, width: int, height: int, radius: Radius) -> Asked:
    colour, n = rng.choice(list(PALETTE)), rng.choice((1, 2, 3))
    others = rng.sample([c for c in PALETTE if c != colour], 5 - n)
    shapes = _place(rng, width, height, radius, rng.shuffled([colour] * n + others))
    return f"How many {colour} shapes are there in the image?", ["1", "2", "3", "4"], "ABCD"[n - 1], shapes


_TEMPLATES = {
    "direct_attributes": (_colour_of_kind,),
    "relative_position": (_left_or_right,),
    "single": (_colour_of_kind, _kind_of_colour),
    "cross": (_higher, _colours_of_two, _count_colour),
}


def questions(split: str) -> list[Question]:
    """The split's questions and scenes (cheap: nothing is drawn)."""
    spec = SPLITS[split]
    out = []
    for index, category in enumerate(spec.categories):
        seed = SEED + 1000 * list(SPLITS).index(split) + index
        width, height = spec.sizes[index % len(spec.sizes)]
        templates = _TEMPLATES[category]  # each category's templates take turns
        template = templates[spec.categories[:index].count(category) % len(templates)]
        question, options, answer, shapes = template(_Rng(seed), width, height, spec.radius)
        out.append(Question(split, index, category, question, tuple(options), answer, width, height, shapes, seed))
    return out


def _mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: int) -> np.ndarray:
    """Pixels of a shape of radius r, from integer offsets to its centre (exact integer arithmetic)."""
    adx, ady = np.abs(dx), np.abs(dy)
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (5 * adx <= 4 * r) & (5 * ady <= 4 * r)
    if kind == "diamond":
        return adx + ady <= r
    if kind == "triangle":  # apex at the top, base at 0.8 r below the centre
        return (dy >= -r) & (5 * dy <= 4 * r) & (9 * adx <= 5 * (dy + r))
    if kind == "cross":
        return ((10 * adx <= 3 * r) & (ady <= r)) | ((10 * ady <= 3 * r) & (adx <= r))
    raise ValueError(f"unknown shape kind {kind!r}")


def _paint(canvas: np.ndarray, kind: str, x: int, y: int, r: int, colour: tuple[int, int, int]) -> None:
    height, width = canvas.shape[:2]
    y0, y1, x0, x1 = max(0, y - r), min(height, y + r + 1), max(0, x - r), min(width, x + r + 1)
    dy, dx = np.ogrid[y0 - y : y1 - y, x0 - x : x1 - x]
    canvas[y0:y1, x0:x1][_mask(kind, dx, dy, r)] = colour


def _ellipse(canvas: np.ndarray, x: int, y: int, rx: int, ry: int, colour: tuple[int, int, int]) -> None:
    height, width = canvas.shape[:2]
    y0, y1, x0, x1 = max(0, y - ry), min(height, y + ry + 1), max(0, x - rx), min(width, x + rx + 1)
    dy, dx = np.ogrid[y0 - y : y1 - y, x0 - x : x1 - x]
    canvas[y0:y1, x0:x1][(dx * dx) * (ry * ry) + (dy * dy) * (rx * rx) <= (rx * rx) * (ry * ry)] = colour


def _backdrop(rng: _Rng, width: int, height: int) -> np.ndarray:
    """A diagonal gradient between two muted colours, in integer arithmetic, band by band to bound memory."""
    start, end = (np.array(c, dtype=np.int64) for c in rng.sample(MUTED, 2))
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    xs = np.arange(width, dtype=np.int64) * height
    for y0 in range(0, height, 512):
        ys = np.arange(y0, min(height, y0 + 512), dtype=np.int64)[:, None] * width
        t = (xs[None, :] + ys)[..., None]
        canvas[y0 : y0 + len(ys)] = start + ((end - start) * t) // (2 * width * height)
    return canvas


def render(q: Question) -> Image.Image:
    """Draw a question's scene: backdrop, scenery blobs, grey pebbles kept clear of the shapes, then the shapes."""
    rng = _Rng(q.seed + 500_000)
    width, height, short = q.width, q.height, min(q.width, q.height)
    canvas = _backdrop(rng, width, height)
    for _ in range(5 + rng.below(4)):
        shade = np.clip(np.array(rng.choice(MUTED)) + round(rng.uniform(-25, 10)), 150, 235)
        x, y = round(rng.uniform(0, width)), round(rng.uniform(0, height))
        rx, ry = round(rng.uniform(0.08, 0.3) * short), round(rng.uniform(0.08, 0.3) * short)
        _ellipse(canvas, x, y, rx, ry, tuple(int(c) for c in shade))
    radius = max(s.r for s in q.shapes)
    for _ in range(40):
        x, y, r = round(rng.uniform(0, width)), round(rng.uniform(0, height)), round(rng.uniform(0.3, 0.8) * radius)
        grey = 120 + rng.below(50)
        if all(np.hypot(x - s.x, y - s.y) > 3 * radius for s in q.shapes):
            _paint(canvas, "circle", x, y, r, (grey, grey, grey))
    for s in q.shapes:
        _paint(canvas, s.kind, s.x, s.y, s.r, PALETTE[s.colour])
    return Image.fromarray(canvas)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def record(q: Question, png: bytes) -> dict:
    """The question in its split's real record format (V*: HF Image feature; HR-Bench: base64 string)."""
    if q.split == "vstar":
        options = "\n".join(f"({letter}) {o}" for letter, o in zip("ABCD", q.options))
        text = f"{q.question}\n{options}\n{VSTAR_SUFFIX}"
        return {"question_id": str(q.index), "image": {"bytes": png, "path": None}, "text": text,
                "label": q.answer, "category": q.category}  # fmt: skip
    return {"index": q.index, "question": q.question, "answer": q.answer, "category": q.category,
            **dict(zip("ABCD", q.options)), "cycle_category": "cycle_0",
            "image": base64.b64encode(png).decode()}  # fmt: skip


def _features(split: str):
    # datasets is imported here: it is slow to import and only building the files needs it.
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    text = Value("string")
    if split == "vstar":
        return Features({"question_id": text, "image": ImageFeature(), "text": text, "label": text, "category": text})
    columns = ("question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image")
    return Features({"index": Value("int64"), **{c: text for c in columns}})


def build(out_dir: Path = DATA_DIR) -> dict[str, Path]:
    """Render every split and write `<split>.parquet` under out_dir; returns the paths."""
    from datasets import Dataset

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [q for split in SPLITS for q in questions(split)]
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for q in tqdm(todo, desc="demo images", unit="img"):
        rows[q.split].append(record(q, _png(render(q))))
    paths = {}
    for split, records in rows.items():
        columns = {key: [r[key] for r in records] for key in records[0]}
        paths[split] = out_dir / f"{split}.parquet"
        Dataset.from_dict(columns, features=_features(split)).to_parquet(str(paths[split]))
    return paths


def load_records(split: str, data_dir: Path = DATA_DIR) -> list[dict]:
    """The split's records from its parquet file, or rendered in memory when the file is absent."""
    path = data_dir / f"{split}.parquet"
    if not path.exists():
        return [record(q, _png(render(q))) for q in questions(split)]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def demo_samples(n: int | None = None, data_dir: Path = DATA_DIR) -> list[Sample]:
    """Up to n demo samples for quick pipeline runs, alternating V*, HR-Bench 4K and 8K."""
    per_split = []
    for split, spec in SPLITS.items():
        samples = [spec.benchmark.sample(doc) for doc in load_records(split, data_dir)]
        for sample in samples:
            sample.id = f"{split}/{sample.id}"
        per_split.append(samples)
    shortest = min(len(samples) for samples in per_split)
    interleaved = [s for group in zip(*per_split) for s in group]
    interleaved += [s for samples in per_split for s in samples[shortest:]]
    return interleaved[:n]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"output folder (default {DATA_DIR})")
    args = parser.parse_args(argv)
    for split, path in build(args.out).items():
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB  ({len(questions(split))} questions)")


if __name__ == "__main__":
    main()
