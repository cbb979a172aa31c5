"""The hf engine's graph-replayed decoding step (engines/graphs.py) as far as a CPU can run it: bucketing, short
batches padded to their bucket, static buffers reused across generate calls, the fallbacks when capture is off or
fails, and the same tokens as the straightforward engine on the trained toy over the demo.

On a CPU the "capture" is `eager_replay` (the step runs again on the same static buffers and static cache);
on a GPU a CUDA graph replays those same eager kernels (`tests/bench/bench_run.py --same-tokens` checks there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cases import BUDGET, one_image, with_crops

from p2r_recipe.engines.base import GenParams
from p2r_recipe.engines.graphs import StepGraphs, bucket
from p2r_recipe.engines.hf import HFEngine
from p2r_recipe.images import PixelBudget
from p2r_recipe.pipeline import Pipeline
from p2r_recipe.prompts import Prompt
from p2r_recipe.toy import demo

PARAMS = GenParams(max_new_tokens=6, min_new_tokens=6)


def test_batch_sizes_round_up_to_a_power_of_two_within_the_batch_size() -> None:
    assert [bucket(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [bucket(n, 32) for n in (17, 31, 32)] == [32, 32, 32]
    assert [bucket(n, 6) for n in (3, 5, 6)] == [4, 6, 6]  # a batch size that is no power of two caps the bucket
    with pytest.raises(ValueError, match="positive"):
        bucket(0, 8)


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> HFEngine:
    # An untied random head makes every output depend on the whole prompt (see test_engine_hf.py).
    engine = HFEngine(str(tiny_model_dir), device="cpu", batch_size=8, budget=BUDGET)
    head = engine.model.lm_head
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    return engine


def graphed(tiny_model_dir: Path, plain: HFEngine, **options) -> HFEngine:
    engine = HFEngine(str(tiny_model_dir), device="cpu", batch_size=8, budget=BUDGET, static_cache=True, **options)
    engine.model.lm_head.weight = plain.model.lm_head.weight
    return engine


def texts(gens) -> list[tuple[str, int]]:
    return [(g.text, g.output_tokens) for g in gens]


def test_short_batches_pad_to_their_bucket_and_reuse_its_step(tiny_model_dir: Path, plain: HFEngine) -> None:
    engine = graphed(tiny_model_dir, plain, graphs=True)
    graphs = engine.step_graphs
    assert graphs.mode == "eager_replay" and engine.model.config.text_config._attn_implementation == "p2r_grouped_sdpa"
    batch = [one_image(0), with_crops(1), Prompt("Text only.")]
    assert engine._fill(batch) == [*batch, batch[-1]]  # 3 prompts run as a batch of 4, not 8
    expected = texts(plain.generate(batch, PARAMS))
    assert texts(engine.generate(batch, PARAMS)) == expected
    # One capture: the first decoding step ran eagerly, then 4 replays (6 tokens = prefill + 5 steps).
    assert {k: graphs.counts[k] for k in ("captures", "replays", "eager_steps", "fallbacks")} == {
        "captures": 1, "replays": 4, "eager_steps": 1, "fallbacks": 0,
    }  # fmt: skip
    [(batch_size, _)] = graphs._entries
    assert batch_size == 4
    # The same bucket and cache length again (other prompts): the captured step and its cache are reused.
    other = [one_image(3, "Count the squares."), Prompt("Why?"), with_crops(4)]
    assert texts(engine.generate(other, PARAMS)) == texts(plain.generate(other, PARAMS))
    assert (graphs.counts["captures"], graphs.counts["replays"], len(graphs._entries)) == (1, 9, 1)


def test_least_recently_used_step_goes_when_slots_are_full(tiny_model_dir: Path, plain: HFEngine) -> None:
    engine = graphed(tiny_model_dir, plain, graphs=True, graph_slots=1)
    one, two = [Prompt("One.")], [Prompt("One."), Prompt("Two.")]
    for batch in (one, two, one):
        assert texts(engine.generate(batch, PARAMS)) == texts(plain.generate(batch, PARAMS))
    counts = engine.step_graphs.counts
    assert (counts["captures"], counts["evictions"], list(engine.step_graphs._entries)) == (3, 2, [(1, 512)])
    with pytest.raises(ValueError, match="slots"):
        StepGraphs(engine.model, slots=0)


def test_without_graphs_or_when_capture_fails_steps_run_eagerly(tiny_model_dir: Path, plain: HFEngine) -> None:
    batch = [one_image(0), Prompt("Text only."), with_crops(2)]
    expected = texts(plain.generate(batch, PARAMS))
    off = graphed(tiny_model_dir, plain, graphs=False)  # transformers' own static cache, no step wrapper
    assert off.step_graphs is None and texts(off.generate(batch, PARAMS)) == expected
    with pytest.raises(ValueError, match="static_cache"):
        HFEngine(str(tiny_model_dir), device="cpu", static_cache=False, graphs=True)

    def unavailable(step):
        raise RuntimeError("no graph capture here")

    failing = graphed(tiny_model_dir, plain, graphs=True)
    failing.step_graphs = StepGraphs(failing.model, capture=unavailable)
    assert texts(failing.generate(batch, PARAMS)) == expected
    assert texts(failing.generate(batch, PARAMS)) == expected  # the broken shape stays eager, no second try
    counts = failing.step_graphs.counts
    assert (counts["captures"], counts["fallbacks"], counts["replays"], counts["eager_steps"]) == (0, 1, 0, 10)


@pytest.mark.slow
def test_fast_engine_gives_the_straightforward_tokens_on_the_trained_toy_over_the_demo() -> None:
    budget = PixelBudget(max_pixels=65_536, crop_max_pixels=65_536)  # the trained toy's evaluation settings
    reason, perceive = GenParams(max_new_tokens=64, repetition_penalty=1.05), GenParams(max_new_tokens=256, repetition_penalty=1.05)
    samples = demo.demo_samples()
    options = {"straightforward": {"static_cache": False}, "fast": {"static_cache": True, "graphs": True}}
    replies = {}
    for name, option in options.items():
        engine = HFEngine("p2r-tiny", device="cpu", batch_size=8, budget=budget, **option)
        records = Pipeline(engine, "p2r", reason, perceive, budget).run(samples)
        replies[name] = [(r.perceiver_output, r.raw_answer, r.error) for r in records]
    assert engine.step_graphs.counts["replays"] > 0 and engine.step_graphs.counts["fallbacks"] == 0
    assert all(error is None and answer for _, answer, error in replies["fast"])
    assert replies["fast"] == replies["straightforward"]
