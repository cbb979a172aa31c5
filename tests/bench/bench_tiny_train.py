"""Toy retraining cost and quality: `p2r-build-tiny --train` from scratch on this machine's CPU, then the demo goals.

Trains the tiny Qwen3-VL with the shipped schedule (2,000 steps, seed 7; `--steps` shortens
the schedule, for smoke runs only), then runs the embedded demo in default and p2r mode through
the hf engine at the main job's budget (65,536 pixels). Reported: wall and CPU seconds of the
training loop and steps per second, the same over the shipped run's (training.json), whether the
weights are byte-identical to the shipped ones, how far the loss curve and the first steps' losses stray
from the recorded ones, and the demo figures: accuracy by mode, the share of perceiver boxes on the asked tile
(IoU >= 0.5) and their mean IoU. Nothing here passes or fails on time; the goals themselves are
tests (tests/toy/test_tiny_trained.py). `--from DIR` reports on weights a
`p2r-build-tiny --train --out DIR` run already wrote (its training.json holds the times) instead
of training again (`--from p2r_recipe/toy/tiny_weights`: the shipped run's recorded times and its weights'
demo figures). Prints one JSON line and writes results/bench/tiny_train.json.

    python tests/bench/bench_tiny_train.py [--steps 2000] [--samples 24] [--from DIR] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
from pathlib import Path

from common import machine, parse_args, write_result

from p2r_recipe.engines.base import GenParams
from p2r_recipe.engines.hf import HFEngine
from p2r_recipe.evidence import Box, iou
from p2r_recipe.images import PixelBudget
from p2r_recipe.pipeline import Pipeline
from p2r_recipe.toy import demo
from p2r_recipe.toy.model import WEIGHTS_DIR
from p2r_recipe.toy.trainer import STEPS, train

BUDGET = PixelBudget(max_pixels=65_536, crop_max_pixels=65_536)
PARAMS = GenParams(max_new_tokens=64, repetition_penalty=1.05)  # as tests/toy/test_tiny_trained.py evaluates
PERCEIVE = GenParams(max_new_tokens=256, repetition_penalty=1.05)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def targets() -> dict[str, Box]:
    """Each demo question's asked tile, by sample id."""
    return {f"{q.split}/{q.index}": Box(tuple(map(float, q.target.bbox_2d))) for s in demo.SPLITS for q in demo.questions(s)}


def demo_figures(weights: Path, samples: int) -> dict:
    """Accuracy by mode, errors, and the p2r perceiver's first box against the asked tile."""
    engine = HFEngine(str(weights), device="cpu", batch_size=8, budget=BUDGET)
    chosen = demo.demo_samples()[:samples]
    figures, tiles = {}, targets()
    for mode in ("default", "p2r"):
        records = Pipeline(engine, mode, PARAMS, PERCEIVE, BUDGET).run(chosen)
        right = sum(r.prediction == s.answer for r, s in zip(records, chosen))
        figures[f"{mode}_accuracy"] = round(100 * right / len(chosen), 1)
        figures[f"{mode}_errors"] = sum(bool(r.error) for r in records)
        if mode == "p2r":
            ious = [iou(Box(tuple(r.boxes[0]["bbox_2d"])), tiles[r.id]) if r.boxes else 0.0 for r in records]
            figures["boxes_on_tile"] = round(sum(v >= 0.5 for v in ious) / len(ious), 3)
            figures["box_iou_mean"] = round(statistics.fmean(ious), 3)
    figures["p2r_minus_default"] = round(figures["p2r_accuracy"] - figures["default_accuracy"], 1)
    return {"samples": len(chosen), **figures}


def curve_gap(ours: list[float], recorded: list[float]) -> dict:
    """How many values two loss lists share, and the largest difference over them (None: nothing to compare)."""
    pairs = list(zip(ours, recorded))
    return {"compared": len(pairs), "max_gap": round(max(abs(a - b) for a, b in pairs), 6) if pairs else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="schedule length (the shipped run: 2,000)")
    parser.add_argument("--samples", type=int, default=24, help="demo questions evaluated (the demo has 24)")
    parser.add_argument("--from", dest="trained", type=Path, help="a finished `p2r-build-tiny --train --out` dir")
    args = parse_args(parser, argv, "tiny_train", quick={"steps": 4, "samples": 2})
    if args.trained:
        weights, how = args.trained, f"the run recorded in {args.trained}/training.json"
    else:
        weights, how = Path(tempfile.mkdtemp(prefix="p2r-tiny-train-")), "p2r_recipe.toy.trainer.train"
        train(weights, steps=args.steps)
    stats = json.loads((weights / "training.json").read_text())
    shipped = json.loads((WEIGHTS_DIR / "training.json").read_text())
    steps_per_s = stats["steps"] / stats["wall_s"]
    report = {
        "trained_by": how,
        "steps": stats["steps"],
        "wall_s": stats["wall_s"],
        "cpu_s": stats["cpu_s"],
        "steps_per_s": round(steps_per_s, 3),
        "cpu_s_per_step": round(stats["cpu_s"] / stats["steps"], 3),
        "cpu_over_wall": round(stats["cpu_s"] / stats["wall_s"], 2),  # cores kept busy; 2 threads + 1 data worker
        "shipped_wall_s": shipped["wall_s"],
        "steps_per_s_over_shipped": round(steps_per_s / (shipped["steps"] / shipped["wall_s"]), 3),
        "final_loss": stats["final_loss"],
        "shipped_final_loss": shipped["final_loss"],
        "weights_identical_to_shipped": sha256(weights / "model.safetensors") == sha256(WEIGHTS_DIR / "model.safetensors"),
        "loss_curve_vs_shipped": curve_gap(stats.get("loss_curve", []), shipped.get("loss_curve", [])),
        "first_losses_vs_shipped": curve_gap(stats.get("first_losses", []), shipped.get("first_losses", [])),
        "demo": demo_figures(weights, args.samples),
        "machine": machine(),
    }
    return write_result(report, args.out)


if __name__ == "__main__":
    main()
