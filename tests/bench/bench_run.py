"""A whole p2r benchmark run, as lmms-eval's `p2r` model makes it: engine load, warm-up and every batch.

`bench_eval.py` times one batch per configuration after an untimed warm-up; a real run pays the
load and the warm-up (on a GPU, capturing the decoding step's CUDA graphs) on top of its batches, and most
lmms-eval runs are small (V* has 191 samples). This runs N p2r samples through `Pipeline` one
batch at a time (as the lmms-eval model hands them over) with one engine variant of
`bench_eval.py`, and reports load, first batch (warm-up included) and the other batches.

`--max-batches K` times only the first K batches per batch size and extrapolates the rest from
the median of batches 2..K (for the straightforward engine, whose batches all cost the same:
a full 191-sample run at batch 8 takes over 12 minutes on an H200). `--shard I N` runs every
N-th batch from the I-th, as one of N data-parallel processes (one GPU each) would; each batch
is the one a single process would run, so outputs can be compared sample by sample (`outputs`
holds a short hash of each sample's perceive and reason replies). `--same-tokens` instead runs the
trained toy (`p2r-tiny`) over the whole demo in p2r mode with both variants and counts the samples
whose perceive and reason replies are identical.

    python tests/bench/bench_run.py --quick
    python tests/bench/bench_run.py --model DIR --device cuda --variant fast --samples 191 --batch-sizes 8 32
    python tests/bench/bench_run.py --same-tokens --device cuda --out results/bench/same_tokens_gpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import torch
from bench_eval import VARIANTS, FixedBoxes, build_4b, samples, sync
from common import boxes_text, machine, parse_args, photo, write_result

import p2r_recipe.engines.hf as hf
import p2r_recipe.images as images
from p2r_recipe.engines.base import GenParams
from p2r_recipe.images import PixelBudget
from p2r_recipe.pipeline import Pipeline
from p2r_recipe.toy import demo

# The trained toy's evaluation settings (tests/toy/test_tiny_trained.py): greedy, repetition penalty 1.05.
TOY_BUDGET = PixelBudget(max_pixels=65_536, crop_max_pixels=65_536)
TOY_REASON = GenParams(max_new_tokens=64, repetition_penalty=1.05)
TOY_PERCEIVE = GenParams(max_new_tokens=256, repetition_penalty=1.05)


def digest(record) -> str:
    return hashlib.sha1(f"{record.perceiver_output}\x00{record.raw_answer}\x00{record.error}".encode()).hexdigest()[:12]


def same_tokens(device: str, batch_size: int, dtype: str) -> dict:
    """p2r over the whole demo on the trained toy with each variant; the replies of every sample must match."""
    samples_ = demo.demo_samples()
    replies, counts = {}, {}
    for variant, options in VARIANTS.items():
        engine = hf.HFEngine("p2r-tiny", device=device, dtype=dtype, batch_size=batch_size, budget=TOY_BUDGET, **options)
        records = Pipeline(engine, "p2r", TOY_REASON, TOY_PERCEIVE, TOY_BUDGET).run(samples_)
        replies[variant] = [(r.perceiver_output, r.raw_answer, r.error) for r in records]
        counts[variant] = engine.step_graphs.counts if engine.step_graphs else None
    fast, plain = replies["fast"], replies["straightforward"]
    equal = sum(a == b for a, b in zip(fast, plain))
    return {"samples": len(samples_), "equal": equal, "errors": sum(r[2] is not None for r in fast + plain),
            "dtype": dtype, "batch": batch_size, "graphs": counts,
            "first_difference": next(([a, b] for a, b in zip(fast, plain) if a != b), None)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, 4b (random Qwen3-VL-4B shape, built here), or a model dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=list(VARIANTS), default="fast")
    parser.add_argument("--samples", type=int, default=191)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--max-batches", type=int, default=0, help="0: every batch; K: time K batches, extrapolate the rest")
    parser.add_argument("--shard", nargs=2, type=int, default=[0, 1], metavar=("INDEX", "COUNT"))
    parser.add_argument("--tokens", nargs=2, type=int, default=[48, 256], metavar=("PERCEIVE", "REASON"))
    parser.add_argument("--image-size", nargs=2, type=int, default=[1920, 1080])
    parser.add_argument("--same-tokens", action="store_true", help="compare the variants on the trained toy instead")
    parser.add_argument("--dtypes", nargs="+", default=["auto"], help="--same-tokens: the dtypes to compare at")
    quick = {"samples": 5, "batch_sizes": [2], "tokens": [4, 8], "image_size": [320, 240]}
    args = parse_args(parser, argv, "run", quick)
    perceive, reason = (GenParams(max_new_tokens=n, min_new_tokens=n) for n in args.tokens)
    index, count = args.shard
    if args.same_tokens:
        runs = [same_tokens(args.device, max(args.batch_sizes), dtype) for dtype in args.dtypes]
        for run in runs:
            print({k: v for k, v in run.items() if k != "first_difference"}, flush=True)
        info = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, **machine()}
        return write_result({"device": args.device, "torch": torch.__version__, **info, "runs": runs}, args.out)

    start = time.perf_counter()
    if args.model == "tiny":
        from p2r_recipe.toy.model import ensure_tiny_model

        model_dir = ensure_tiny_model()
    elif args.model == "4b":
        model_dir = build_4b(Path(__import__("tempfile").mkdtemp(prefix="p2r-4b-")))
    else:
        model_dir = Path(args.model)
    build_s = time.perf_counter() - start
    if args.variant == "straightforward":
        images._resize_pool = None
    pictures = [photo(*args.image_size, seed=s) for s in range(4)]
    everything = samples(args.samples, pictures)

    sync()
    load = time.perf_counter()
    engine = hf.HFEngine(str(model_dir), device=args.device, batch_size=max(args.batch_sizes), **VARIANTS[args.variant])
    sync()
    report: dict = {
        "model": args.model, "device": args.device, "variant": args.variant,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__, **machine(),
        "samples": args.samples, "shard": args.shard, "tokens": {"perceive": args.tokens[0], "reason": args.tokens[1]},
        "image_size": args.image_size, "build_s": round(build_s, 1), "load_s": round(time.perf_counter() - load, 2),
        "runs": [],
    }  # fmt: skip
    for batch_size in args.batch_sizes:
        engine.batch_size = batch_size
        runner = Pipeline(FixedBoxes(engine, boxes_text(3)), "p2r", reason, perceive, PixelBudget())
        chunks = [everything[i : i + batch_size] for i in range(0, len(everything), batch_size)][index::count]
        timed = chunks[: args.max_batches] if args.max_batches else chunks
        seconds, outputs, errors = [], {}, 0
        for chunk in timed:
            sync()
            begin = time.perf_counter()
            records = runner.run(chunk)
            sync()
            seconds.append(time.perf_counter() - begin)
            outputs.update({r.id: digest(r) for r in records})
            errors += sum(r.error is not None for r in records)
        steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
        batches_s = sum(seconds) + steady * (len(chunks) - len(timed))
        row = {
            "batch": batch_size, "batches": len(chunks), "batches_timed": len(timed),
            "samples": sum(len(c) for c in chunks), "first_batch_s": round(seconds[0], 2),
            "steady_batch_s": round(steady, 3), "warmup_s": round(seconds[0] - steady, 2),
            "batches_s": round(batches_s, 2), "extrapolated": len(timed) < len(chunks),
            "errors": errors, "outputs": outputs,
        }  # fmt: skip
        report["runs"].append(row)
        print({k: v for k, v in row.items() if k != "outputs"}, flush=True)
    if engine.step_graphs is not None:
        # Captures (one per batch size and cache length) and the seconds they took, replayed and eager steps.
        report["graphs"] = engine.step_graphs.counts
    if torch.cuda.is_available():
        report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return write_result(report, args.out)


if __name__ == "__main__":
    main()
