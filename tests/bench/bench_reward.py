"""Perceiver-reward throughput: 512 rollouts (64 prompts x 8) against a frozen reasoner with a fixed latency.

The reasoner is a scripted OpenAI-compatible server in its own process that answers after
`--latency` seconds. Four call paths are timed and compared with the ideal
rollouts x latency / concurrency:
- `batch`: one `reward_func` call holding every rollout (one asyncio.gather under the client's bound);
- `openrlhf`: OpenRLHF 0.11.2's own `SingleTurnAgentExecutor._fetch_rewards_via_func`, which calls
  `reward_func` once per rollout in a worker thread, as its rollout actor does with `--reward.remote_url`;
- `agent`: the rollouts' `RoleAgent` steps awaited together on one event loop, as its multi-turn
  executor does with `--train.agent_func_path`;
- `blocking`: one `reward_func` call per rollout, each waiting for the previous one, timed on the
  first `--blocking` rollouts and scaled to all of them (the whole run would take minutes).
Prints one JSON line and writes results/bench/reward.json.

    python tests/bench/bench_reward.py [--rollouts 512] [--group 8] [--latency 0.2] [--concurrency 64] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ScriptedService, machine, parse_args, train_samples, write_result
from rollouts import BOX, chat_prompt, query, reasoner


def _timed(fn) -> tuple[float, list[float]]:
    start = time.perf_counter()
    rewards = fn()
    return time.perf_counter() - start, rewards


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=512)
    parser.add_argument("--group", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the reasoner takes per request")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (P2R_CONCURRENCY)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480))
    parser.add_argument("--blocking", type=int, default=32, help="rollouts timed one at a time")
    args = parse_args(parser, argv, "reward", quick={"rollouts": 64, "concurrency": 16, "blocking": 8})
    with ScriptedService(reasoner("A", "C"), args.latency) as service:
        return measure(args, service)


def measure(args: argparse.Namespace, service: ScriptedService) -> dict:
    os.environ.update({
        "P2R_ROLE": "perceiver", "REASONER_PORT": str(service.port), "REASONER_MODEL": "scripted",
        "P2R_CONCURRENCY": str(args.concurrency), "P2R_TIMEOUT_S": "60", "P2R_RETRIES": "2",
    })  # fmt: skip
    # Imported after the environment is set; the agent module reads it when its executor is built.
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    from p2r_recipe.train import REWARD_FILE
    from p2r_recipe.train.agent import RoleAgent
    from p2r_recipe.train.reward import reward_func

    prompts_n = args.rollouts // args.group
    samples = train_samples(Path(tempfile.mkdtemp(prefix="p2r-bench-")), prompts_n, tuple(args.image_size))
    rollouts = [s for s in samples for _ in range(args.group)]
    prompts = [chat_prompt(s) for s in rollouts]
    queries = [query(p, BOX) for p in prompts]
    labels = [s.to_label() for s in rollouts]
    reward_func(queries[: args.group], prompts[: args.group], labels[: args.group])  # warm up: connections, imports

    executor = SingleTurnAgentExecutor(str(REWARD_FILE))

    def openrlhf_path() -> list[float]:
        results = asyncio.run(executor._fetch_rewards_via_func(queries, prompts, labels))
        return [r["rewards"].item() for r in results]

    async def agent_steps() -> list[float]:
        steps = [RoleAgent().step({"action_text": BOX + "<|im_end|>", "label": label}) for label in labels]
        return [step["rewards"].item() for step in await asyncio.gather(*steps)]

    ideal = args.rollouts * args.latency / args.concurrency
    paths = {
        "batch": lambda: reward_func(queries, prompts, labels)["rewards"].tolist(),
        "openrlhf": openrlhf_path,
        "agent": lambda: asyncio.run(agent_steps()),
    }
    report = {
        "rollouts": args.rollouts, "prompts": prompts_n, "group": args.group, "latency_s": args.latency,
        "concurrency": args.concurrency, "ideal_s": round(ideal, 3), "image_size": list(args.image_size), **machine(),
        # asyncio.to_thread's default pool: the most reward_func calls OpenRLHF runs at once per rollout actor.
        "openrlhf_reward_threads": ThreadPoolExecutor()._max_workers,
    }  # fmt: skip
    timed_one_by_one = min(args.blocking, args.rollouts)
    wall, rewards = _timed(lambda: [
        reward_func(queries[i : i + 1], prompts[i : i + 1], labels[i : i + 1])["rewards"].item()
        for i in range(timed_one_by_one)
    ])  # fmt: skip
    if rewards != [1.0] * timed_one_by_one:
        raise SystemExit(f"blocking: wrong rewards {sorted(set(rewards))}")
    blocking = wall * args.rollouts / timed_one_by_one
    report["blocking"] = {
        "rollouts_timed": timed_one_by_one, "wall_s": round(blocking, 3), "wall_over_ideal": round(blocking / ideal, 3),
    }  # fmt: skip
    for name, fn in paths.items():
        wall, rewards = _timed(fn)
        if rewards != [1.0] * args.rollouts:
            raise SystemExit(f"{name}: wrong rewards {sorted(set(rewards))}")
        report[name] = {
            "wall_s": round(wall, 3), "rollouts_per_s": round(args.rollouts / wall, 1),
            "ideal_rollouts_per_s": round(args.rollouts / ideal, 1), "wall_over_ideal": round(wall / ideal, 3),
            "speedup_over_blocking": round(blocking / wall, 1),
        }  # fmt: skip
    return write_result(report, args.out)


if __name__ == "__main__":
    main()
