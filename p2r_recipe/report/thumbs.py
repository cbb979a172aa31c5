"""A sample's pictures for the report: its task's documents, the evidence our code makes, screen-sized JPEGs.

The pixels are `evidence.gather_evidence`'s: the annotated image and the crops exactly as the
reasoner got them, only scaled down to thumbnails. Documents come from the task's own config as
lmms-eval logged it (a parquet `data_files`, or a `datasets` hub id read from the local cache,
offline); the demo's tasks fall back to the demo's own records. When a task's documents cannot be
read, `Missing` carries the reason the card shows.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..evidence import COLORS, gather_evidence, iou, parse_boxes, reply_objects
from ..images import ImageError
from ..lmms.benchmarks import Benchmark
from .runs import Run, SampleRow, benchmark_for

THUMB_SIDE = 420  # longest side of a card's main picture: cards are 360-440 px wide on a laptop screen
CROP_SIDE = 160
JPEG_QUALITY = 72  # with these sides, 2,000 photo samples fit in well under 60 MB
# Boxes overlapping an earlier one by more than this IoU are what the reward's iou_penalty flags
# (train/reward.py IOU_LIMIT; not imported, since that module loads torch). Evidence still draws them.
DUPLICATE_IOU = 0.5


class Missing(Exception):
    """A task's documents or a sample's image are not available; the message says why."""


@dataclass
class Pictures:
    """What one card shows: file names under the report folder, sizes, and box overlays in 0..1000 units."""

    image: str | None = None
    size: tuple[int, int] = (0, 0)
    crops: list[dict] = field(default_factory=list)
    overlays: list[list] = field(default_factory=list)  # [x1, y1, x2, y2, label, kind, colour]
    dropped: list[str] = field(default_factory=list)  # raw JSON of boxes evidence dropped with no drawable place
    note: str = ""


class _ParquetRows:
    """A parquet file's rows, each read when asked for: a benchmark's images are too large to hold as dicts."""

    def __init__(self, paths: list) -> None:
        import pyarrow as pa  # only parquet-backed tasks need it
        import pyarrow.parquet as pq

        self._table = pa.concat_tables([pq.read_table(str(path)) for path in paths])

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> dict:
        return self._table.slice(index, 1).to_pylist()[0]


class RotatedDocs:
    """A circular task's documents as lmms-eval numbers them (lmms.tasks.circular_docs): each stored doc once
    per rotation of its options, the rotations of a doc next to each other."""

    def __init__(self, docs: Any, benchmark: Benchmark) -> None:
        self._docs, self._benchmark = docs, benchmark
        self._index = [(i, shift) for i in range(len(docs)) for shift in range(benchmark.rotations(docs[i]))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, doc_id: int) -> dict:
        i, shift = self._index[doc_id]
        return self._benchmark.rotate(self._docs[i], shift)


def _parquet_docs(files: Any, split: str) -> _ParquetRows:
    chosen = _file_list(files, split)
    missing = [str(f) for f in chosen if not Path(str(f)).exists()]
    if missing or not chosen:
        raise Missing(f"data file(s) not found: {', '.join(missing) or 'none named'}")
    return _ParquetRows(chosen)


def _hub_docs(config: dict, split: str):
    # datasets is slow to import and only hub-backed tasks need it; the caller sets HF_*_OFFLINE first.
    import datasets

    kwargs = {k: v for k, v in (config.get("dataset_kwargs") or {}).items() if k not in ("token", "cache_dir")}
    try:
        data = datasets.load_dataset(config["dataset_path"], config.get("dataset_name"), split=split, **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not cached"; all mean the same here
        raise Missing(f"dataset {config['dataset_path']} not available offline ({type(exc).__name__})") from None
    # Bytes as stored: the release never applies EXIF rotation.
    for name, feature in data.features.items():
        if isinstance(feature, datasets.Image):
            data = data.cast_column(name, datasets.Image(decode=False))
    return data  # indexed row by row, like _ParquetRows


class DocStore:
    """Each task's documents, loaded once per (run config) and indexed by lmms-eval's doc_id."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}  # documents (indexable rows) or the Missing that says why not
        self._last: tuple[tuple[int, int] | None, Image.Image | None] = (None, None)

    def docs(self, run: Run, task: str) -> Any:
        """The task's documents: anything with len() and [doc_id] giving the document dict."""
        config = run.configs.get(task) or {}
        key = json.dumps(
            [task, config.get("dataset_path"), config.get("dataset_kwargs")],
            sort_keys=True,
            default=str,
        )
        if key not in self._cache:
            try:
                self._cache[key] = self._load(task, config)
                benchmark = benchmark_for(task)
                if task.endswith("_circular") and benchmark is not None:
                    self._cache[key] = RotatedDocs(self._cache[key], benchmark)
            except Missing as exc:
                self._cache[key] = exc
        found = self._cache[key]
        if isinstance(found, Missing):
            raise found
        return found

    def image(self, run: Run, row: SampleRow) -> Image.Image:
        """The sample's first image as the model read it (RGB by the release's rule); Missing says why not.
        The last one is kept: cards are built document by document, so its runs reuse one decode."""
        docs = self.docs(run, row.task)
        if not 0 <= row.doc_id < len(docs):
            raise Missing(f"doc_id {row.doc_id} is not in the task's {len(docs)} documents")
        benchmark = benchmark_for(row.task)
        if benchmark is None:
            raise Missing("no image reader for this task (not one of this project's benchmarks)")
        doc, key = docs[row.doc_id], (id(docs), row.doc_id)
        # A doc_id only names the right document while the dataset is the run's: check the logged question.
        if row.question and benchmark.question(doc) not in row.question:
            raise Missing(f"document {row.doc_id} of the task's data is not the logged question (data changed?)")
        if self._last[0] != key:
            self._last = (key, benchmark.images(doc)[0])
        return self._last[1]

    @staticmethod
    def _load(task: str, config: dict) -> Any:
        split = config.get("test_split") or config.get("validation_split") or "test"
        path = config.get("dataset_path")
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if path in ("parquet",) and files and all(Path(str(f)).exists() for f in _file_list(files, split)):
            return _parquet_docs(files, split)
        if not path:
            raise Missing("no dataset config for this task in the results file (older lmms-eval schema)")
        if path == "parquet":
            return _parquet_docs(files, split)
        return _hub_docs(config, split)


def _file_list(files: Any, split: str) -> list:
    chosen = files.get(split) if isinstance(files, dict) else files
    return [] if chosen is None else chosen if isinstance(chosen, list) else [chosen]


def _fit(image: Image.Image, side: int) -> Image.Image:
    scale = min(1.0, side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return (
        image.convert("RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if scale < 1
        else image.convert("RGB")
    )


def _save(image: Image.Image, folder: Path, name: str) -> tuple[str, tuple[int, int]]:
    path = folder / name
    if not path.exists():
        image.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return f"img/{name}", image.size


def _dropped(perceiver_output: str) -> tuple[list[list], list[str]]:
    """Box-like objects the evidence rules dropped: those with four finite numbers become dashed
    overlays (corners sorted, so a reversed box is shown where it was meant); the rest are listed as text.
    Uses evidence's own object extraction so that exactly the objects it skipped are reported."""
    overlays, texts = [], []
    for obj in reply_objects(perceiver_output.strip()):
        if not isinstance(obj, dict) or "bbox_2d" not in obj:
            continue
        text = json.dumps(obj, ensure_ascii=False, default=str)
        if parse_boxes(json.dumps(obj, default=str)):
            continue
        coords = obj["bbox_2d"]
        numbers = coords if isinstance(coords, list) and len(coords) == 4 else []
        if (
            all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in numbers)
            and numbers
        ):
            x1, y1, x2, y2 = (float(c) for c in numbers)
            label = obj.get("label") if isinstance(obj.get("label"), str) else ""
            overlays.append(
                [
                    min(x1, x2),
                    min(y1, y2),
                    max(x1, x2),
                    max(y1, y2),
                    label,
                    "dropped",
                    "gray",
                ]
            )
        else:
            texts.append(text)
    return overlays, texts


def pictures(docs: DocStore, run: Run, row: SampleRow, folder: Path) -> Pictures:
    """The card's pictures for one sample; `Pictures.note` says why there are none."""
    try:
        image = docs.image(run, row)
    except Missing as exc:
        return Pictures(note=f"Image not shown: {exc}. Text only.")
    except (ImageError, KeyError, ValueError, TypeError) as exc:
        return Pictures(note=f"Image not shown: the document's image could not be read ({exc}). Text only.")
    record = row.record or {}
    output = record.get("perceiver_output") if isinstance(record.get("perceiver_output"), str) else ""
    evidence = gather_evidence(image, output)
    # Names say what made the pixels, so a folder reused for another dataset or size never shows stale files.
    config = run.configs.get(row.task) or {}
    made_of = [row.task, row.doc_id, output, config.get("dataset_path"), config.get("dataset_kwargs"), THUMB_SIDE]
    digest = hashlib.sha1(json.dumps([*made_of, CROP_SIDE, JPEG_QUALITY], default=str).encode()).hexdigest()[:16]
    name, size = _save(_fit(evidence.images[0], THUMB_SIDE), folder, f"{digest}.jpg")
    crops = []
    for i, crop in enumerate(evidence.images[1:]):
        src, (w, h) = _save(_fit(crop, CROP_SIDE), folder, f"{digest}_c{i}.jpg")
        crops.append({"src": src, "w": w, "h": h})
    overlays = []
    for i, box in enumerate(evidence.boxes):
        duplicate = any(iou(box, earlier) > DUPLICATE_IOU for earlier in evidence.boxes[:i])
        overlays.append(
            [
                *box.bbox_2d,
                box.label,
                "duplicate" if duplicate else "valid",
                COLORS[i % len(COLORS)],
            ]
        )
    dropped_overlays, dropped_texts = _dropped(output)
    return Pictures(name, size, crops, overlays + dropped_overlays, dropped_texts)
