"""Evaluation cost per mode (default, thinking, p2r) through the Pipeline and the hf engine, at several batch sizes.

Two engine set-ups run the same samples in one process:
- `fast`: HFEngine's defaults (on a GPU: static KV cache, decoding step replayed from CUDA graphs, images
  processed on the GPU, next batch prepared while the current one generates);
- `straightforward`: every option off and Pillow's resize on one thread, i.e. plain
  `processor(...)` + `model.generate(...)` with HF's dynamic cache.
Outputs have fixed lengths (min_new_tokens = max_new_tokens: direct 8, perceive 48,
think/reason 256). Each sample is a 1920x1080 photo at the release's pixel budget. A
random-weight model writes no usable boxes, so in p2r mode the perceive pass runs in full
but its text is replaced by three fixed boxes, so the reason pass sees real evidence
(annotated image + 3 crops) as it would with a trained model.

Per configuration: seconds and output tokens per sample, exposed CPU-side image
preprocessing (main-thread time in fitting, evidence, processor and waiting for the
prefetch), peak GPU memory, and separately the decode speed per batch size next to the
weight-bandwidth bound (parameter bytes / measured HBM bandwidth per step).

    python tests/bench/bench_eval.py                      # tiny model, CPU -> results/bench/eval_cpu.json
    python tests/bench/bench_eval.py --quick              # batch 1, few tokens, small image -> the temp folder
    python tests/bench/bench_eval.py --model 4b --device cuda --out results/bench/eval_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from common import boxes_text, machine, parse_args, photo, write_result

import p2r_recipe.engines.hf as hf
import p2r_recipe.evidence as evidence
import p2r_recipe.images as images
import p2r_recipe.pipeline as pipeline
from p2r_recipe import prompts
from p2r_recipe.engines.base import GenParams
from p2r_recipe.images import PixelBudget
from p2r_recipe.pipeline import Pipeline
from p2r_recipe.records import Sample

MODES = ("default", "thinking", "p2r")
VARIANTS = {
    "fast": {"static_cache": True, "graphs": True},  # the opt-in graph path (engines/hf.py)
    "straightforward": {"static_cache": False, "graphs": False, "images_on_device": False, "prefetch": False},
}
QUESTION = "Which object is closest to the camera?\nA. the car\nB. the tree\nC. the sign\nD. the bench"


def build_4b(out: Path) -> Path:
    """A random-weight model of Qwen3-VL-4B-Instruct's shape (its published config), in bf16, with the tiny tokenizer."""
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from p2r_recipe.toy.model import build_processor

    processor = build_processor()
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    ]}  # fmt: skip
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    text = {
        "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad,
    }  # fmt: skip
    vision = {
        "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2560, "hidden_act": "gelu_pytorch_tanh",
        "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
    }  # fmt: skip
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config = GenerationConfig(do_sample=False, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    return out


class FixedBoxes:
    """The engine, with perceive answers replaced by fixed boxes after they are generated in full."""

    def __init__(self, engine, text: str):
        self.engine, self.text, self.name = engine, text, engine.name

    def generate(self, batch, params):
        gens = self.engine.generate(batch, params)
        if batch and all(prompts.PERCEIVE_INSTRUCTION in p.text for p in batch):
            for gen in gens:
                gen.text = self.text
        return gens


class Clock:
    """Main-thread seconds spent inside the wrapped functions, by part (time hidden behind generation is not counted)."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    def reset(self) -> None:
        self.parts = {}

    @contextmanager
    def timing(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if threading.current_thread() is threading.main_thread():
                self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - start

    def wrap(self, fn, part: str):
        def timed(*args, **kwargs):
            with self.timing(part):
                return fn(*args, **kwargs)

        return timed


class TimedFuture:
    """A prefetched stage whose waiting time counts as preprocessing."""

    def __init__(self, future, clock: Clock):
        self.future, self.clock = future, clock

    def result(self):
        with self.clock.timing("stage_wait"):
            return self.future.result()


def instrument(engine: hf.HFEngine, clock: Clock) -> None:
    """Count the engine's image work on the main thread: processor, staging, and waiting for a prefetched stage."""
    engine._inputs = clock.wrap(engine._inputs, "processor")
    engine._stage = clock.wrap(engine._stage, "stage")
    runner = engine._runner
    engine._runner = lambda batch, staged, params, seed: runner(
        batch, TimedFuture(staged, clock) if staged is not None else None, params, seed
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def samples(n: int, pictures: list) -> list[Sample]:
    return [Sample(f"s{i}", QUESTION, [pictures[i % len(pictures)]], "mca", "A") for i in range(n)]


def run_mode(engine, mode: str, batch: list[Sample], tokens: dict, clock: Clock) -> dict:
    params = GenParams(max_new_tokens=tokens[mode], min_new_tokens=tokens[mode])
    perceive = GenParams(max_new_tokens=tokens["perceive"], min_new_tokens=tokens["perceive"])
    runner = Pipeline(FixedBoxes(engine, boxes_text(3)), mode, params, perceive, PixelBudget())
    sync()
    start = time.perf_counter()
    records = runner.run(batch)
    sync()
    wall = time.perf_counter() - start
    errors = [r.error for r in records if r.error]
    return {
        "wall_s": round(wall, 3),
        "s_per_sample": round(wall / len(batch), 4),
        "output_tokens_per_sample": statistics.mean(r.output_tokens for r in records),
        "input_tokens_per_sample": statistics.mean(r.input_tokens for r in records),
        "evidence_samples": sum(r.has_evidence for r in records),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def decode_speed(engine: hf.HFEngine, batch_size: int, picture, steps: int) -> dict:
    """Seconds per decoding step at `batch_size`: (time for 1 + steps tokens - time for 1 token) / steps."""
    budget = PixelBudget()
    fitted = images.fit_to_budget(picture, budget.max_pixels, budget.min_pixels)
    batch = [prompts.Prompt(prompts.thinking_text(QUESTION, "mca"), [fitted])] * batch_size

    def timed(n: int) -> float:
        sync()
        start = time.perf_counter()
        engine.generate(batch, GenParams(max_new_tokens=n, min_new_tokens=n))
        sync()
        return time.perf_counter() - start

    timed(1 + steps)  # warm-up (and compilation) at this batch size
    # Interleaved, best of 3: on a busy CPU a burst of other work in one call must not make the difference negative.
    ones, fulls = zip(*((timed(1), timed(1 + steps)) for _ in range(3)))
    one, full = min(ones), min(fulls)
    step = (full - one) / steps
    return {"batch": batch_size, "step_ms": round(step * 1000, 2), "tokens_per_s": round(batch_size / step, 1)}


def hbm_bandwidth() -> float | None:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    seconds = (time.perf_counter() - start) / 10
    del src, dst
    return 2 * (2 << 30) / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, 4b (random Qwen3-VL-4B shape, built here), or a model dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--batches", type=int, default=1, help="batches per configuration")
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--tokens", nargs=4, type=int, default=[8, 48, 256, 256], metavar=("DIRECT", "PERCEIVE", "THINK", "REASON"))
    parser.add_argument("--decode-steps", type=int, default=64, help="0: skip the decode-speed measurement")
    parser.add_argument("--decode-batch-sizes", nargs="+", type=int, help="batch sizes of the decode-speed measurement (default: --batch-sizes)")
    parser.add_argument("--image-size", nargs=2, type=int, default=[1920, 1080])
    parser.add_argument("--merge", nargs="+", type=Path, help="combine the variants of earlier reports into --out")
    quick = {"batch_sizes": [1], "tokens": [2, 4, 8, 8], "decode_steps": 16, "image_size": [320, 240]}
    args = parse_args(parser, argv, "eval_cpu", quick)
    if args.merge:
        return merge(args.merge, args.out)
    direct, perceive, think, reason = args.tokens
    tokens = {"default": direct, "perceive": perceive, "thinking": think, "p2r": reason}

    start = time.perf_counter()
    if args.model == "tiny":
        from p2r_recipe.toy.model import ensure_tiny_model

        model_dir = ensure_tiny_model()
    elif args.model == "4b":
        model_dir = build_4b(Path(tempfile.mkdtemp(prefix="p2r-4b-")))
    else:
        model_dir = Path(args.model)
    build_s = time.perf_counter() - start
    bandwidth = hbm_bandwidth()
    pictures = [photo(*args.image_size, seed=s) for s in range(4)]
    report: dict = {
        "model": args.model, "device": args.device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__, **machine(),
        "image_size": args.image_size, "tokens": tokens, "batches_per_config": args.batches, "build_s": round(build_s, 1),
        "hbm_bytes_per_s": bandwidth, "variants": {},
    }  # fmt: skip
    clock = Clock()
    # The pipeline's own image work: fitting to the pixel budget, and drawing and cropping the evidence.
    images.fit_to_budget = clock.wrap(images.fit_to_budget, "fit")
    pipeline.gather_evidence = clock.wrap(pipeline.gather_evidence, "evidence")
    evidence.fit_to_budget = clock.wrap(evidence.fit_to_budget, "fit")
    evidence.refit_edited = clock.wrap(evidence.refit_edited, "fit")
    split_pool = images._resize_pool
    for variant in args.variants:
        options = VARIANTS[variant]
        images._resize_pool = None if variant == "straightforward" else split_pool
        load = time.perf_counter()
        engine = hf.HFEngine(str(model_dir), device=args.device, batch_size=max(args.batch_sizes), **options)
        params = sum(p.numel() for p in engine.model.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        report.update(param_count=params, param_bytes=param_bytes)
        instrument(engine, clock)
        configs = []
        for batch_size in args.batch_sizes:
            engine.batch_size = batch_size
            batch = samples(batch_size * args.batches, pictures)
            # Warm-up at this batch size: graph captures (one per batch size and cache length), cuBLAS
            # plans, the allocator's pool.
            warm = time.perf_counter()
            run_mode(engine, "p2r" if engine.graphs else "default", batch[:batch_size], tokens, clock)
            warmup_s = round(time.perf_counter() - warm, 2)
            for mode in sorted(args.modes, key=lambda m: m != "p2r"):
                clock.reset()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                row = {"batch": batch_size, "mode": mode, "samples": len(batch), "warmup_s": warmup_s}
                row.update(run_mode(engine, mode, batch, tokens, clock))
                row["preprocess_s"] = round(clock.seconds, 3)
                row["preprocess_share"] = round(clock.seconds / row["wall_s"], 4)
                row["preprocess_parts_s"] = {part: round(v, 3) for part, v in sorted(clock.parts.items())}
                if torch.cuda.is_available():
                    row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                configs.append(row)
                print(variant, row, flush=True)
        decode = []
        for batch_size in (args.decode_batch_sizes or args.batch_sizes) if args.decode_steps else []:
            engine.batch_size = batch_size
            speed = decode_speed(engine, batch_size, pictures[0], args.decode_steps)
            if bandwidth:
                speed["bound_tokens_per_s"] = round(batch_size * bandwidth / param_bytes, 1)
                speed["fraction_of_bound"] = round(speed["tokens_per_s"] / speed["bound_tokens_per_s"], 3)
            decode.append(speed)
            print(variant, speed, flush=True)
        report["variants"][variant] = {
            "options": {k: getattr(engine, k) for k in ("static_cache", "graphs", "images_on_device", "prefetch")},
            "load_s": round(time.perf_counter() - load, 1), "configs": configs, "decode": decode,
            "graphs": engine.step_graphs.counts if engine.step_graphs else None,
        }  # fmt: skip
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    images._resize_pool = split_pool
    report["summary"] = summarize(report)
    return write_result(report, args.out)


def merge(paths: list[Path], out: Path) -> dict:
    """One report from runs of different variants on the same machine (each run has its own process)."""
    reports = [json.loads(path.read_text()) for path in paths]
    merged = {**reports[0], "variants": {}, "runs": [str(path.name) for path in paths]}
    for report in reports:
        merged["variants"].update(report["variants"])
    merged["summary"] = summarize(merged)
    return write_result(merged, out)


def summarize(report: dict) -> dict:
    """The figures the goals are stated in."""
    out: dict = {}
    for variant, data in report["variants"].items():
        rows = {(r["batch"], r["mode"]): r for r in data["configs"]}
        ratios = {
            str(b): round(rows[(b, "p2r")]["wall_s"] / rows[(b, "thinking")]["wall_s"], 3)
            for b in sorted({b for b, _ in rows})
            if (b, "p2r") in rows and (b, "thinking") in rows
        }
        out[variant] = {
            "p2r_over_thinking": ratios,
            "preprocess_share": {f"{m}@{b}": r["preprocess_share"] for (b, m), r in rows.items()},
            "decode_tokens_per_s": {str(d["batch"]): d["tokens_per_s"] for d in data["decode"]},
        }
    fast, plain = report["variants"].get("fast"), report["variants"].get("straightforward")
    if fast and plain and fast["decode"] and plain["decode"]:
        out["decode_speedup"] = {
            str(a["batch"]): round(a["tokens_per_s"] / b["tokens_per_s"], 2)
            for a, b in zip(fast["decode"], plain["decode"])
            if a["batch"] == b["batch"]
        }
    return out


if __name__ == "__main__":
    main()
