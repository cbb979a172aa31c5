"""Dev-server load: the real `p2r-serve` with the tiny model under 64 concurrent clients for 512 requests.

Each client sends its next request (one small image, a fixed number of output tokens) as soon as
its previous reply arrives, until `--requests` have been sent. After one untimed warm-up round
(one request per client: imports, the allocator's pools at full batch), reports throughput,
p50/p99 latency per request, errors (failed requests and replies of the wrong length), and the
server's resident memory before and after the timed requests and its peak in each half of them; the
growth is the second half's peak over the first's (goal: flat).
Prints one JSON line and writes results/bench/serve.json.

    python tests/bench/bench_serve.py [--requests 512] [--clients 64] [--max-batch 8] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from common import machine, parse_args, write_result
from PIL import Image

# After `common`, which puts tests/support on sys.path.
import reliability  # noqa: I001
from servers import start_p2r_serve

from p2r_recipe.client import ChatClient, image_part, run_sync
from p2r_recipe.prompts import Prompt
from p2r_recipe.toy.model import ensure_tiny_model


async def load(
    client: ChatClient, clients: int, requests: int, tokens: int, image: dict
) -> tuple[list[float], list[str]]:
    """`clients` workers sending `requests` in all; latency in seconds of each success, and each error."""
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while sent < requests:
            sent += 1
            messages = Prompt(f"Describe picture {sent}.").messages([image])
            start = time.perf_counter()
            try:
                reply = await client.chat(messages, max_tokens=tokens, min_tokens=tokens)
            except Exception as exc:  # every failure is a figure here, not a crash
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            if reply.output_tokens != tokens:
                errors.append(f"{reply.output_tokens} output tokens instead of {tokens}")
            else:
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, errors


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8, help="output tokens per request")
    parser.add_argument("--image-size", type=int, nargs=2, default=(64, 64))
    parser.add_argument("--max-batch", type=int, default=8, help="p2r-serve's --max-batch (its default: 8)")
    args = parse_args(parser, argv, "serve", quick={"requests": 128})

    image = image_part(Image.new("RGB", tuple(args.image_size), (200, 40, 40)))
    with start_p2r_serve(ensure_tiny_model(), extra_args=("--max-batch", str(args.max_batch))) as serve:
        client = ChatClient(serve.base_url, "tiny", concurrency=args.clients, timeout_s=300, retries=0)
        pid = serve.process.pid
        run_sync(load(client, args.clients, args.clients, args.tokens, image))
        rss_before = reliability.rss_mb(pid)
        latencies, errors, peaks = [], [], []
        start = time.perf_counter()
        for half in (args.requests // 2, args.requests - args.requests // 2):
            with reliability.RSSSampler(pid) as sampler:
                done, failed = run_sync(load(client, args.clients, half, args.tokens, image))
            latencies, errors, peaks = latencies + done, errors + failed, [*peaks, sampler.peak]
        wall = time.perf_counter() - start
        rss_after = reliability.rss_mb(pid)
        client.close()
    report = {
        "requests": args.requests, "clients": args.clients, "output_tokens": args.tokens,
        "image_size": list(args.image_size), "max_batch": args.max_batch, **machine(),
        "wall_s": round(wall, 3), "requests_per_s": round(args.requests / wall, 2),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": round(statistics.quantiles(latencies, n=100)[98], 3) if len(latencies) > 1 else None,
        "latency_max_s": round(max(latencies), 3) if latencies else None,
        "errors": len(errors), "first_errors": errors[:3], "client_retries": client.stats["retries"],
        "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
        "rss_peak_first_half_mb": round(peaks[0], 1), "rss_peak_second_half_mb": round(peaks[1], 1),
        # Peaks of two equal halves, not the RSS before and after: the allocator keeps or returns a
        # ~50 MB block at random between rounds (test_load saw the same), while a leak per request
        # raises the second half's peak over the first's.
        "rss_growth_mb": round(peaks[1] - peaks[0], 1),
    }  # fmt: skip
    return write_result(report, args.out)


if __name__ == "__main__":
    main()
