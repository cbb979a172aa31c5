"""Replaying a model's static-cache decoding step from captured CUDA graphs, with no compiler.

`StepGraphs` wraps a transformers model's `forward`. Inside a `session(batch, cache_length)`,
`generate` runs its prefill eagerly as usual; the first decoding step runs eagerly too (it warms
cuBLAS and the allocator up) and is then captured once, as a CUDA graph over static input
buffers, a static KV cache and a static 4D attention mask; every later step, in this generate
call and in later ones with the same (batch, cache length), copies its inputs into those buffers
and replays the graph. A capture costs one eager step plus a fraction of a second, against the
minutes torch.compile takes, and replays the same eager kernels, so outputs are those of the
eager static cache.

Where CUDA graphs are unavailable (a CPU) or a capture fails, the same buffers and masks are used
and the step runs eagerly ("replay" calls the step function again); a failure is logged once and
counted in `counts["fallbacks"]`. Batch sizes are meant to come bucketed (`bucket`), so that a
short last batch reuses a captured graph. Not thread-safe: one generate call at a time per model.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import StaticCache

log = logging.getLogger(__name__)

Capture = Callable[[Callable[[], object]], Callable[[], object]]


def bucket(size: int, batch_size: int) -> int:
    """The batch size a batch of `size` prompts runs at: the next power of two, at most `batch_size`.

    Graphs are captured per bucket, so batches of 5 to 8 prompts share one graph."""
    if size < 1 or batch_size < 1:
        raise ValueError(f"batch sizes must be positive, got {size} and {batch_size}")
    return min(1 << (size - 1).bit_length(), max(batch_size, size))


def eager_replay(step: Callable[[], object]) -> Callable[[], object]:
    """The no-graph "capture": replaying runs the step again on the same static buffers."""
    return step


class CudaGraphCapture:
    """Captures a step as a CUDA graph in a memory pool shared by all graphs of one model
    (they never run at once, so their intermediate tensors can share memory)."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, step: Callable[[], object]) -> Callable[[], object]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = step()

        def replay() -> object:
            graph.replay()
            return output

        return replay


@dataclass
class _Entry:
    """One (batch, cache length): its static cache, and once the first decoding step ran, its buffers and replay."""

    cache: StaticCache
    calls: int = 0
    signature: tuple | None = None
    inputs: dict = field(default_factory=dict)  # static copies of the step's tensor inputs
    mask: torch.Tensor | None = None  # (batch, 1, 1, cache length) bool: which cache slots each row attends to
    replay: Callable[[], object] | None = None
    broken: bool = False  # capture failed: steps of this entry run eagerly


class StepGraphs:
    """Decoding steps of `model` from graphs, one per (batch, cache length), at most `slots` kept (least
    recently used goes first, with its cache). `capture` makes the replay of a step: CUDA graphs by default
    on a CUDA model, `eager_replay` otherwise."""

    def __init__(self, model: torch.nn.Module, slots: int = 2, capture: Capture | None = None):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.model, self.slots = model, slots
        on_gpu = model.device.type == "cuda" and torch.cuda.is_available()
        self.capture = capture or (CudaGraphCapture() if on_gpu else eager_replay)
        self.mode = "cuda_graphs" if isinstance(self.capture, CudaGraphCapture) else getattr(self.capture, "__name__", "custom")
        self.counts = {"captures": 0, "capture_s": 0.0, "replays": 0, "eager_steps": 0, "fallbacks": 0, "evictions": 0}
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._active: _Entry | None = None
        forward = model.forward
        params = inspect.signature(forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x

        # functools.wraps keeps forward's signature visible: generate inspects it to decide which inputs to pass.
        @functools.wraps(forward)
        def step(*args, **kwargs):
            entry = self._active
            if entry is None or args or kwargs.get(self.cache_arg) is not entry.cache:
                return forward(*args, **kwargs)
            entry.calls += 1
            if entry.calls == 1:  # the prefill
                return forward(**kwargs)
            return self._decode(entry, forward, kwargs)

        model.forward = step

    @contextmanager
    def session(self, batch: int, cache_length: int) -> Iterator[dict]:
        """generate() keyword arguments (the static cache) for one generate call at this batch size and cache length."""
        key = (batch, cache_length)
        entry = self._entries.pop(key, None)
        if entry is None:
            while len(self._entries) >= self.slots:
                self._entries.popitem(last=False)
                self.counts["evictions"] += 1
            entry = _Entry(StaticCache(config=self.model.config, max_cache_len=cache_length))
        else:
            entry.cache.reset()
            if entry.mask is not None:
                entry.mask.zero_()
        self._entries[key] = entry
        entry.calls, self._active = 0, entry
        try:
            yield {self.cache_arg: entry.cache}
        finally:
            self._active = None

    def _decode(self, entry: _Entry, forward: Callable, kwargs: dict):
        # A 2D mask grows a slot per step and goes into the static 4D mask; a 4D one (transformers 5.2x makes
        # it for static caches) already has the cache's fixed shape and is copied like any other input.
        mask = kwargs.get("attention_mask")
        signature = tuple(
            sorted(
                (name, (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value)
                for name, value in kwargs.items()
                if name != self.cache_arg and not (name == "attention_mask" and value.ndim == 2)
            )
        )
        if entry.broken or mask is None or mask.ndim not in (2, 4):
            self.counts["eager_steps"] += 1
            return forward(**kwargs)
        if entry.replay is not None and signature == entry.signature:
            self._load(entry, kwargs)
            self.counts["replays"] += 1
            return entry.replay()
        if entry.replay is not None:
            # A step whose inputs changed shape mid-run cannot replay; it runs eagerly, as do later such steps.
            self.counts["fallbacks"] += 1
            self.counts["eager_steps"] += 1
            return forward(**kwargs)
        return self._first_step(entry, forward, kwargs, signature)

    def _first_step(self, entry: _Entry, forward: Callable, kwargs: dict, signature: tuple):
        """Run the first decoding step eagerly on new static buffers, then capture it from them."""
        mask = kwargs["attention_mask"]
        entry.signature = signature
        entry.inputs = {
            name: value.clone()
            for name, value in kwargs.items()
            if isinstance(value, torch.Tensor) and not (name == "attention_mask" and value.ndim == 2)
        }
        if mask.ndim == 2:
            shape = (mask.shape[0], 1, 1, entry.cache.max_cache_len)
            entry.mask = torch.zeros(shape, dtype=torch.bool, device=mask.device)
        self._load(entry, kwargs)
        static = {**kwargs, **entry.inputs, **({"attention_mask": entry.mask} if entry.mask is not None else {})}
        run = functools.partial(forward, **static)
        output = self._warm(run)
        self.counts["eager_steps"] += 1
        start = time.perf_counter()
        try:
            entry.replay = self.capture(run)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager steps, counted
            entry.broken = True
            self.counts["fallbacks"] += 1
            log.warning("decoding-step capture failed (%s: %s); this batch shape decodes eagerly", type(error).__name__, error)
        else:
            self.counts["captures"] += 1
            self.counts["capture_s"] += time.perf_counter() - start
        return output

    def _warm(self, run: Callable[[], object]) -> object:
        """The eager step, on a side stream on a GPU (CUDA graphs' documented warm-up before a capture)."""
        if not isinstance(self.capture, CudaGraphCapture):
            return run()
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            output = run()
        main.wait_stream(side)
        return output

    @staticmethod
    def _load(entry: _Entry, kwargs: dict) -> None:
        """Copy a step's inputs into the static buffers. With a 2D attention mask, the static mask's first n slots
        take it (n = tokens so far); later slots stay False from the session's reset, which makes it causal."""
        for name, buffer in entry.inputs.items():
            buffer.copy_(kwargs[name])
        if entry.mask is not None:
            mask = kwargs["attention_mask"]
            entry.mask[:, 0, 0, : mask.shape[1]].copy_(mask)
