"""What the benchmark scripts share: synthetic photos, samples and box texts, a scripted service in its own process,
timing, the --quick/--out options, and writing results/bench/<name>.json."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "bench"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "p2r-bench-quick"
sys.path.insert(0, str(ROOT / "tests" / "support"))  # servers.py, release_rules.py, p2r10k.py: imported below and by the benches

import p2r10k

from p2r_recipe.train.schema import TrainSample


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


def train_samples(folder: Path, count: int, size: tuple[int, int]) -> list[TrainSample]:
    """`count` mca samples with distinct pictures written to `folder`; the right answer is A."""
    samples = []
    for i in range(count):
        path = folder / f"{i}.png"
        p2r10k.picture(i, size).save(path)
        samples.append(TrainSample(str(i), p2r10k.question(i, "mca"), "A", "mca", str(path)))
    return samples


class ScriptedService:
    """A ScriptedServer in a forked process, so its event loop does not compete with the benchmarked client
    for the GIL; `calls()` reads the server's own request count."""

    def __init__(self, reply_fn: Callable[[dict], str], latency_s: float):
        self.reply_fn, self.latency_s = reply_fn, latency_s

    def _serve(self, conn) -> None:
        from servers import ScriptedServer  # here, not at the top: the GPU benches run where uvicorn is absent

        server = ScriptedServer(self.reply_fn, latency_s=self.latency_s).start()
        conn.send(server.port)
        try:
            while True:
                conn.recv()  # a request for the count
                conn.send(server.calls)
        except EOFError:  # the benchmark closed its end
            pass

    def __enter__(self) -> ScriptedService:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=self._serve, args=(child,), daemon=True)
        self._process.start()
        self.port = self._conn.recv()
        return self

    def calls(self) -> int:
        self._conn.send(None)
        return self._conn.recv()

    def __exit__(self, *exc) -> None:
        self._conn.close()
        self._process.terminate()
        self._process.join()


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


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, name: str, quick: dict) -> argparse.Namespace:
    """Add --quick and --out and parse. --quick swaps in the small `quick` defaults (options given still win) and
    writes to the temp folder, so a smoke run never replaces the committed results/bench/<name>.json."""
    parser.add_argument("--quick", action="store_true", help=f"smoke-test sizes ({quick}), report in {QUICK_RESULTS}")
    parser.add_argument("--out", type=Path, help=f"report path (default results/bench/{name}.json)")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    args.out = args.out or (QUICK_RESULTS if args.quick else RESULTS) / f"{name}.json"
    return args


def write_result(report: dict, out: Path) -> dict:
    """Write the report as results JSON and print it as one JSON line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report
