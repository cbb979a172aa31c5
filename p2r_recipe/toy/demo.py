"""The embedded demo benchmark: toy high-resolution scenes (scenes.py) in V* and HR-Bench record formats.

Every question asks for the pattern on one small tile of a large image: unreadable at the
main job's whole-image budget, readable in P2R's crop of the tile. The demo's seeds are
never used to train the tiny model (trainer.py draws its scenes from another range);
`questions()` returns the scenes, which is how the tests check every answer against the
drawn pixels.

    python -m p2r_recipe.toy.demo [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..lmms.benchmarks import HRBENCH, VSTAR, VSTAR_SUFFIX, Benchmark
from ..lmms.registration import tasks_dir
from ..records import Sample
from . import scenes

SEED = 2607_01191
DATA_DIR = tasks_dir() / "p2r_demo" / "data"


@dataclass(frozen=True)
class Split:
    """One demo file: its benchmark's record format, image sizes and categories (one question each)."""

    benchmark: Benchmark
    sizes: tuple[tuple[int, int], ...]
    categories: tuple[str, ...]


SPLITS = {
    "vstar": Split(VSTAR, ((2246, 1582), (2048, 1536), (2560, 1440), (1920, 1440)),
                   ("direct_attributes", "relative_position") * 6),
    "hrbench_4k": Split(HRBENCH, ((3840, 2160),), ("single", "cross") * 3),
    "hrbench_8k": Split(HRBENCH, ((7680, 4320),), ("single", "cross") * 3),
}  # fmt: skip
DEMO_TASKS = {f"p2r_demo_{name}": name for name in SPLITS}


@dataclass(frozen=True)
class Question:
    """One demo question with the scene it is asked about."""

    split: str
    index: int
    category: str
    question: str
    options: tuple[str, ...]
    answer: str
    scene: scenes.Scene
    target: scenes.Tile

    @property
    def width(self) -> int:
        return self.scene.width

    @property
    def height(self) -> int:
        return self.scene.height


def question_seed(split: str, index: int) -> int:
    return SEED + 1000 * list(SPLITS).index(split) + index


def questions(split: str) -> list[Question]:
    """The split's questions and scenes (cheap: nothing is drawn)."""
    spec = SPLITS[split]
    out = []
    for index, category in enumerate(spec.categories):
        seed = question_seed(split, index)
        width, height = spec.sizes[index % len(spec.sizes)]
        rng = scenes.Rng(seed)
        scene = scenes.scene(rng, width, height, seed)
        asked = scenes.ask(rng, scene)
        out.append(Question(split, index, category, asked.question, asked.options, asked.answer, scene, asked.target))
    return out


def render(q: Question) -> Image.Image:
    """Draw a question's scene."""
    return scenes.render(q.scene)


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
