"""Stage-2 evidence precompute: 1,000 samples against a frozen perceiver with a fixed latency, then again from its cache.

The perceiver is a scripted OpenAI-compatible server in its own process that answers after
`--latency` seconds with 0..3 boxes (by sample). `precompute.run` is called as the
`p2r_recipe.train.precompute` CLI calls it, with `--concurrency` requests in flight:
- first run: wall time against the ideal samples x latency / concurrency, and the time spent in
  the perceiver phase alone (the rest is hashing the images and writing the evidence files);
- second run, same output folder and cache: wall time and the requests the server received (goal: 0).
Prints one JSON line and writes results/bench/precompute.json.

    python tests/bench/bench_precompute.py [--samples 1000] [--latency 0.2] [--concurrency 64] [--quick]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import ScriptedService, boxes_text, machine, parse_args, train_samples, write_result
from rollouts import user_text

from p2r_recipe.train import precompute
from p2r_recipe.train.services import ServiceConfig


def perceiver(body: dict) -> str:
    """Sample i gets i % 4 boxes, so evidence of 0 (original image only) to 3 crops is built."""
    index = int(re.search(r"square (\d+)", user_text(body)).group(1))
    return boxes_text(index % 4, seed=index)


class PhaseClock:
    """Wall seconds inside the precompute's perceiver phase (its `_perceive` coroutine)."""

    def __init__(self):
        self.seconds = 0.0
        perceive = precompute._perceive

        async def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await perceive(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        precompute._perceive = timed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the perceiver takes per request")
    parser.add_argument("--concurrency", type=int, default=64, help="the precompute's --concurrency")
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480))
    args = parse_args(parser, argv, "precompute", quick={"samples": 64, "concurrency": 16})

    folder = Path(tempfile.mkdtemp(prefix="p2r-bench-precompute-"))
    (folder / "images").mkdir()
    samples = train_samples(folder / "images", args.samples, tuple(args.image_size))
    ideal = args.samples * args.latency / args.concurrency
    report = {
        "samples": args.samples, "latency_s": args.latency, "concurrency": args.concurrency,
        "image_size": list(args.image_size), "ideal_s": round(ideal, 3), **machine(),
    }  # fmt: skip
    clock = PhaseClock()
    with ScriptedService(perceiver, args.latency) as service:
        config = replace(ServiceConfig.from_env("perceiver", {}), port=service.port, model="scripted")
        config = replace(config, concurrency=args.concurrency, timeout_s=60, retries=0)
        for run in ("first", "second"):
            calls, perceive_s = service.calls(), clock.seconds
            start = time.perf_counter()
            summary = precompute.run(samples, folder / "out", config)
            wall = time.perf_counter() - start
            if summary["written"] != args.samples or summary["failed"]:
                raise SystemExit(f"{run} run: {summary['written']} written, failures {summary['failures'][:3]}")
            report[run] = {
                "wall_s": round(wall, 3), "perceive_phase_s": round(clock.seconds - perceive_s, 3),
                "server_calls": service.calls() - calls, "cached_before": summary["cached_before"],
            }  # fmt: skip
    first = report["first"]
    first["samples_per_s"] = round(args.samples / first["wall_s"], 1)
    first["wall_over_ideal"] = round(first["wall_s"] / ideal, 3)
    first["perceive_phase_over_ideal"] = round(first["perceive_phase_s"] / ideal, 3)
    report["box_count_histogram"] = summary["box_count_histogram"]
    return write_result(report, args.out)


if __name__ == "__main__":
    main()
