"""lmms-eval output folders written the way lmms-eval writes them, for the report's tests and benchmark.

`write_run` writes `<stamp>_results.json` and `<stamp>_samples_<task>.jsonl`; `mme_lite_run` makes a
`--model p2r` run of N samples over a parquet file in the MME-RealWorld-lite record schema, with
photo-like images and 0..4 perceiver boxes per sample; metrics are aggregated by the project's own
`benchmarks.aggregate`, as the task's process_results would give them.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from p2r_recipe.lmms import envelope
from p2r_recipe.lmms.benchmarks import MME_SUBTASKS, MMEREALWORLD
from p2r_recipe.records import Record

MME_TASK = "mmerealworld_lite_p2r"


def envelope_text(**fields) -> str:
    """A `p2r` model reply: the record as lmms-eval logs it in `filtered_resps`."""
    return envelope.wrap(Record(**fields))


def write_run(
    folder: Path,
    model_args: str,
    tasks: dict[str, dict],
    stamp: str = "20261201_120000",
) -> Path:
    """tasks: name -> {"lines": sample lines, "metrics": results entry, "config": task config or None}."""
    folder.mkdir(parents=True, exist_ok=True)
    results = {
        "results": {name: {"alias": name, **t["metrics"]} for name, t in tasks.items()},
        "config": {"model": "p2r", "model_args": model_args},
        "date": stamp,
    }
    configs = {name: t["config"] for name, t in tasks.items() if t.get("config") is not None}
    if configs:
        results["configs"] = configs
    path = folder / f"{stamp}_results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    for name, t in tasks.items():
        lines = "".join(json.dumps(line) + "\n" for line in t["lines"])
        (folder / f"{stamp}_samples_{name}.jsonl").write_text(lines, encoding="utf-8")
    return path


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth gradient plus 8x8 grain: JPEG sizes like a real photo's."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    grain = rng.normal(0, 14, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32).repeat(8, 0).repeat(8, 1)
    base = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    return Image.fromarray(np.clip(base + grain[:height, :width], 0, 255).astype(np.uint8))


def mme_lite_run(root: Path, n: int, size: tuple[int, int] = (1600, 1200), seed: int = 0) -> Path:
    """A p2r-mode run of n MME-RealWorld-lite-schema samples under root; returns its results file."""
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    subtasks = list(MME_SUBTASKS)
    pool = []
    for i in range(8):  # a few distinct photos, re-encoded per row (rows differ in bytes like real data)
        buffer = io.BytesIO()
        photo(*size, rng).save(buffer, format="JPEG", quality=85)
        pool.append(base64.b64encode(buffer.getvalue()).decode())
    rows = []
    for i in range(n):
        kind = "Perception" if i % 3 else "Reasoning"
        sub = subtasks[i % len(subtasks)] if kind == "Perception" else subtasks[[0, 2, 3, 4][i % 4]]
        rows.append({
            "index": i, "question": f"Synthetic question {i}: what is in region {i % 17}?",
            "multi-choice options": [f"({c}) option {c.lower()}{i}" for c in "ABCDE"],
            "answer": "ABCDE"[i % 5], "category": f"{kind}/{sub}", "l2-category": sub, "bytes": pool[i % len(pool)],
        })  # fmt: skip
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    parquet = data_dir / "mme_lite.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    lines, items = [], []
    for i, doc in enumerate(rows):
        boxes = []
        for _ in range(pick.randrange(0, 5)):
            x, y = pick.randrange(0, 900), pick.randrange(0, 900)
            boxes.append(
                {
                    "bbox_2d": [
                        x,
                        y,
                        x + pick.randrange(20, 100),
                        y + pick.randrange(20, 100),
                    ],
                    "label": f"thing {i}",
                }
            )
        output = json.dumps(boxes)
        answer = doc["answer"] if pick.random() < 0.55 else "A"
        reply = envelope_text(
            id=f"{MME_TASK}/{i}", mode="p2r", perceiver_output=output, boxes=boxes, box_count=len(boxes),
            has_evidence=bool(boxes), raw_answer=f"<think>looking at region {i}</think><answer>{answer}</answer>",
            answer=answer, prediction=answer, output_tokens=40 + i % 7, latency_s=0.5 + (i % 5) / 10,
        )  # fmt: skip
        item = MMEREALWORLD.item(
            doc,
            answer,
            boxes=len(boxes),
            output_tokens=40 + i % 7,
            seconds=0.5 + (i % 5) / 10,
        )
        items.append(item)
        own = item["category"]
        line = {"doc_id": i, "target": doc["answer"], "filtered_resps": reply, "input": MMEREALWORLD.question(doc),
                "overall": 100.0 * item["correct"], "errors": 0}  # fmt: skip
        line.update({c: (100.0 * item["correct"] if c == own else None) for c in MMEREALWORLD.categories})
        lines.append(line)
    metrics = {f"{k},none": v for k, v in MMEREALWORLD.aggregate(items).items() if v is not None}
    config = {"task": MME_TASK, "dataset_path": "parquet", "dataset_kwargs": {"data_files": {"train": str(parquet)}},
              "test_split": "train"}  # fmt: skip
    task = {"lines": lines, "metrics": metrics, "config": config}
    return write_run(root / "run", "pretrained=Synthetic-P2R-4B,mode=p2r", {MME_TASK: task})
