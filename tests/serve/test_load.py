"""Load: bursts of 256 concurrent requests on p2r-serve and 256 concurrent rollouts on the reward path:
no errors, no retries, memory that stops growing after the first burst, and latency reported."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass

import pytest
import reliability
import rollouts
from PIL import Image
from servers import ScriptedServer, start_p2r_serve

from p2r_recipe.client import ChatClient, image_part, run_sync
from p2r_recipe.prompts import Prompt
from p2r_recipe.train.reward import reward_func

BURST = 256
BURSTS = 3
# Memory after the last burst may exceed memory after the first by this much: allocator slack, not a leak
# (a leak of even one decoded 64x64 image per request would add ~3 MB per burst, 12 KB each).
GROWTH_MB = 40


@dataclass
class Burst:
    """One burst's latencies (seconds) and the process's resident memory after it (and its peak during it)."""

    latencies: list[float]
    rss_mb: float
    peak_mb: float

    def summary(self) -> str:
        memory = f"rss {self.rss_mb:.0f} MB (peak {self.peak_mb:.0f})"
        if len(self.latencies) == 1:
            return f"all done in {self.latencies[0]:.2f} s, {memory}"
        p95 = statistics.quantiles(self.latencies, n=20)[18]
        p50, worst = statistics.median(self.latencies), max(self.latencies)
        return f"latency p50 {p50:.2f} s, p95 {p95:.2f} s, max {worst:.2f} s, {memory}"


def check_bounded(bursts: list[Burst], label: str) -> None:
    for i, burst in enumerate(bursts, 1):
        print(f"{label} burst {i}/{len(bursts)} of {BURST}: {burst.summary()}")
    # Peaks, not the RSS left after a burst: the allocator keeps or returns a ~50 MB block at random
    # between bursts, while a leak raises every later burst's peak.
    assert bursts[-1].peak_mb - bursts[0].peak_mb < GROWTH_MB, [(b.rss_mb, b.peak_mb) for b in bursts]


@pytest.mark.slow
def test_p2r_serve_under_bursts_of_256_concurrent_requests(tiny_model_dir):
    with start_p2r_serve(tiny_model_dir, api_key="k", extra_args=("--max-batch", "16")) as serve:
        client = ChatClient(serve.base_url, "tiny", api_key="k", concurrency=BURST, timeout_s=300, retries=0)
        images = [image_part(Image.new("RGB", (64, 64), (i, 255 - i, 0))) for i in range(BURST)]

        async def one(i: int) -> float:
            start = time.perf_counter()
            reply = await client.chat(Prompt(f"What is {i}?").messages([images[i]]), max_tokens=4, min_tokens=4)
            assert reply.output_tokens == 4
            return time.perf_counter() - start

        async def burst() -> list[float]:
            return list(await asyncio.gather(*(one(i) for i in range(BURST))))

        bursts = []
        for _ in range(BURSTS):
            with reliability.RSSSampler(serve.process.pid) as sampler:
                latencies = run_sync(burst())
            bursts.append(Burst(latencies, reliability.rss_mb(serve.process.pid), sampler.peak))
        client.close()
    assert client.stats["requests"] == BURST * BURSTS and client.stats["retries"] == client.stats["failures"] == 0
    check_bounded(bursts, "p2r-serve")


def test_reward_path_under_bursts_of_256_concurrent_rollouts(tmp_path, monkeypatch):
    samples = [rollouts.sample(tmp_path, i % 16, form="mca") for i in range(BURST)]
    prompts = [rollouts.chat_prompt(s) for s in samples]
    queries = [rollouts.query(p, rollouts.BOX) for p in prompts]
    labels = [s.to_label() for s in samples]
    with ScriptedServer(rollouts.reasoner("A", "C"), latency_s=0.2) as reasoner:
        rollouts.configure(monkeypatch, "perceiver", reasoner=reasoner, P2R_CONCURRENCY=str(BURST))
        bursts = []
        for _ in range(BURSTS):
            with reliability.RSSSampler(os.getpid()) as sampler:
                start = time.perf_counter()
                result = reward_func(queries, prompts, labels)
                elapsed = time.perf_counter() - start
            assert result["rewards"].tolist() == [1.0] * BURST
            bursts.append(Burst([elapsed], reliability.rss_mb(os.getpid()), sampler.peak))
    assert reasoner.calls == BURST * BURSTS and reasoner.max_in_flight > BURST // 2
    check_bounded(bursts, "reward")
