"""What the benchmark scripts share: synthetic photos, box texts, timing, and writing results/bench/<name>.json."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "bench"
sys.path.insert(0, str(ROOT / "tests"))  # servers.py, release_rules.py, p2r10k.py


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth gradients plus 8x8-pixel grain, so JPEG sizes and timings are realistic."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    grain = rng.normal(0, 12, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    grain = grain.repeat(8, 0).repeat(8, 1)[:height, :width]
    base = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def boxes_text(count: int, seed: int = 0) -> str:
    """A perceiver answer with `count` disjoint, labelled boxes (0..1000 coordinates) on a 3x3 grid."""
    rng = np.random.default_rng(seed)
    boxes = []
    for i in range(count):
        col, row = i % 3, i // 3
        x1, y1 = 40 + 320 * col + int(rng.integers(0, 60)), 40 + 320 * row + int(rng.integers(0, 60))
        w, h = int(rng.integers(60, 220)), int(rng.integers(60, 220))
        boxes.append({"bbox_2d": [x1, y1, x1 + w, y1 + h], "label": f"object {i}"})
    return json.dumps(boxes)


def median_s(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}


def write_result(report: dict, out: Path) -> dict:
    """Write the report as results JSON and print it as one JSON line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report
