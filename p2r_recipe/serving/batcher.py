"""Micro-batching: concurrent requests gathered into one engine call in a worker thread, in arrival order."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from ..engines.base import Engine, Generation, GenParams
from ..prompts import Prompt
from .protocol import APIError


@dataclass
class _Job:
    prompt: Prompt
    params: GenParams
    future: asyncio.Future


SHUTTING_DOWN = "p2r-serve is shutting down; generation was interrupted"


@dataclass
class MicroBatcher:
    """Gathers concurrent requests (up to `max_batch`, waiting `wait_s` for more) into one engine call in a worker thread.

    Jobs run in arrival order; once `stopping` is set (shutdown), every job still waiting or
    generating is answered with a 503 instead.
    """

    engine: Engine
    max_batch: int = 8
    wait_s: float = 0.005
    stopping: threading.Event = field(default_factory=threading.Event)
    stats: dict = field(default_factory=lambda: {"requests": 0, "batches": 0, "largest_batch": 0})
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue, init=False)

    async def generate(self, prompt: Prompt, params: GenParams) -> Generation:
        if self.stopping.is_set():
            raise APIError(503, SHUTTING_DOWN, "server_error")
        job = _Job(prompt, params, asyncio.get_running_loop().create_future())
        self.stats["requests"] += 1
        await self._queue.put(job)
        return await job.future

    def _drain(self, jobs: list[_Job]) -> None:
        while len(jobs) < self.max_batch and not self._queue.empty():
            jobs.append(self._queue.get_nowait())

    async def run(self) -> None:
        """Serve jobs forever; one engine call at a time, as the model is not safe to share between threads."""
        while True:
            jobs = [await self._queue.get()]
            self._drain(jobs)
            if len(jobs) < self.max_batch:
                await asyncio.sleep(self.wait_s)
                self._drain(jobs)
            groups: dict[GenParams, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.params, []).append(job)
            for params, group in groups.items():
                await self._run_group(params, group)

    async def _run_group(self, params: GenParams, group: list[_Job]) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
        generations: list[Generation] = []
        if not self.stopping.is_set():
            try:
                generations = await asyncio.to_thread(self.engine.generate, [job.prompt for job in group], params)
            except Exception as exc:  # the engine should isolate failures itself; if it does not, fail this batch only
                generations = [Generation(error=f"engine failure: {type(exc).__name__}: {exc}") for _ in group]
        for i, job in enumerate(group):
            if job.future.done():  # the client went away
                continue
            if self.stopping.is_set():  # cut short by the shutdown, or never started
                job.future.set_exception(APIError(503, SHUTTING_DOWN, "server_error"))
            else:
                job.future.set_result(generations[i])
