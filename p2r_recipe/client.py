"""The async client of OpenAI-compatible chat services: bounded concurrency, retries with back-off, typed errors,
image parts. Training, precompute and the `openai` engine all talk to services through it."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from PIL import Image

from .images import data_url

T = TypeVar("T")
# 408 and 429 say "try again later"; 5xx says the service itself is in trouble.
_RETRY_STATUS = {408, 429}


class ServiceUnavailable(RuntimeError):
    """A service that stayed unreachable, slow or failing through every retry: an outage, not a bad sample."""


class RequestRejected(RuntimeError):
    """A request the service refused (4xx other than 408/429) or answered with no usable reply: retrying cannot help."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class ChatReply:
    """The assistant's text and the token counts the service reported."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0


# Connection refused/reset, a broken reply, or no reply within the timeout.
_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


@dataclass
class _LoopState:
    http: aiohttp.ClientSession
    # Requests wait here rather than in the connector's queue, where aiohttp's timeout would already run.
    slots: asyncio.Semaphore
    closer: AsyncGenerator[None, None]


async def _closing(http: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    """Stays suspended while its loop lives: `asyncio.run` finalises async generators as it ends, closing `http`."""
    try:
        yield
    finally:
        await http.close()


class ChatClient:
    """Bounded-concurrency, retrying client of one OpenAI-compatible chat service.

    `stats` counts `requests` (chat calls), `retries` (extra attempts), `failures` (calls
    that raised) and `waited_s` (time spent backing off). The HTTP client and semaphore
    are made per event loop on first use, so one ChatClient can serve several loops
    (e.g. `asyncio.run` per call, or `run_sync`'s background loop).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        name: str = "service",
        concurrency: int = 16,
        timeout_s: float = 120,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"{name}: base URL must start with http:// or https://, got {base_url!r}")
        root = base_url.rstrip("/")
        self.base_url = (root if root.endswith("/v1") else root + "/v1") + "/"
        self.model, self.name, self.api_key = model, name, api_key
        self.concurrency, self.timeout_s, self.retries = concurrency, timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "waited_s": 0.0}
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._lock = threading.Lock()
        # A client dropped without `close()` (e.g. with an exception's traceback) still closes its
        # sessions on the loops that keep running, such as run_sync's, before aiohttp warns of them.
        weakref.finalize(self, _close_sessions, self._loops).atexit = False

    def __repr__(self) -> str:
        return f"ChatClient({self.name!r}, {self.base_url!r}, model={self.model!r})"

    async def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._loops.get(loop)
            if state is not None:
                return state
            # Forget loops that have closed; `asyncio.run` closed their sessions on its way out.
            for old in [old for old in self._loops if old.is_closed()]:
                del self._loops[old]
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
            state = self._loops[loop] = _LoopState(http, asyncio.Semaphore(self.concurrency), _closing(http))
        await anext(state.closer)  # returns at its `yield`, registered with the loop
        return state

    async def aclose(self) -> None:
        """Close this event loop's connections (`asyncio.run` does it too as it ends; other loops must call it)."""
        with self._lock:
            state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.closer.aclose()

    def close(self) -> None:
        """Close the connections `run_sync` callers opened."""
        run_sync(self.aclose())

    async def chat(self, messages: list[dict], **params: Any) -> ChatReply:
        """One chat completion; extra keyword arguments go into the request body as they are."""
        self.stats["requests"] += 1
        try:
            data = await self._post({"model": self.model, "messages": messages, **params})
            choice = data["choices"][0]["message"]
            usage = data.get("usage") or {}
            return ChatReply(
                choice.get("content") or "", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            )
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            self.stats["failures"] += 1
            raise RequestRejected(
                f"{self.name} at {self.base_url} sent a malformed reply ({type(exc).__name__}: {exc})"
            ) from None
        except (ServiceUnavailable, RequestRejected):
            self.stats["failures"] += 1
            raise

    async def text(self, messages: list[dict], **params: Any) -> str:
        """Just the reply's text."""
        return (await self.chat(messages, **params)).text

    async def _post(self, body: dict) -> dict:
        state = await self._state()
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
            retry_after = None
            try:
                async with state.slots, state.http.post(self.base_url + "chat/completions", json=body) as response:
                    status, payload = response.status, await response.read()
                    retry_after = _seconds(response.headers.get("retry-after"))
                if status == 200:
                    return json.loads(payload)
                last_error = f"HTTP {status}: {payload.decode(errors='replace')[:500]}"
                if status < 500 and status not in _RETRY_STATUS:
                    raise RequestRejected(f"{self.name} at {self.base_url} rejected the request: {last_error}", status)
            except _TRANSPORT_ERRORS as exc:
                last_error = _describe(exc, self.timeout_s)
            except ValueError as exc:  # a 200 whose body is not JSON
                raise RequestRejected(f"{self.name} at {self.base_url} sent a non-JSON reply: {exc}") from None
            if attempt < self.retries:
                await self._back_off(attempt, retry_after)
        raise ServiceUnavailable(
            f"{self.name} service at {self.base_url} unavailable after {self.retries + 1} attempts; last error: {last_error}"
        )

    async def _back_off(self, attempt: int, retry_after: float | None) -> None:
        # Jitter spreads the retries of many concurrent callers so they do not return in lockstep.
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = min(self.max_backoff_s, max(delay, retry_after))
        self.stats["waited_s"] += delay
        await asyncio.sleep(delay)

    async def wait_healthy(self, timeout_s: float = 300, poll_s: float = 0.5) -> list[str]:
        """Poll `/v1/models` until the service answers; returns the served model names.

        Raises ServiceUnavailable on timeout, and RequestRejected when the service is up but
        does not serve this client's model (a wrong name would otherwise fail every request).
        """
        http = (await self._state()).http
        poll = aiohttp.ClientTimeout(total=min(self.timeout_s, 10.0))
        deadline = time.monotonic() + timeout_s
        last_error = "no answer"
        while True:
            try:
                async with http.get(self.base_url + "models", timeout=poll) as response:
                    status, payload = response.status, await response.read()
                if status == 200:
                    served = [m.get("id") for m in json.loads(payload).get("data", [])]
                    if self.model not in served:
                        raise RequestRejected(f"{self.name} at {self.base_url} serves {served}, not {self.model!r}")
                    return served
                last_error = f"HTTP {status}: {payload.decode(errors='replace')[:200]}"
                if status in (401, 403):
                    raise RequestRejected(f"{self.name} at {self.base_url}: {last_error} (check the API key)")
            except _TRANSPORT_ERRORS as exc:
                last_error = _describe(exc, poll.total)
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(
                    f"{self.name} service at {self.base_url} not healthy after {timeout_s:.0f} s; last error: {last_error}"
                )
            await asyncio.sleep(poll_s)


def _close_sessions(loops: dict[asyncio.AbstractEventLoop, _LoopState]) -> None:
    for loop, state in loops.items():
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(state.closer.aclose(), loop)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError) and not str(exc):  # aiohttp's total timeout says nothing itself
        return f"no reply within {timeout_s:g} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing for a back-off hint
        return None


_background: asyncio.AbstractEventLoop | None = None
_background_lock = threading.Lock()


def _forget_background_loop() -> None:
    global _background, _background_lock
    _background, _background_lock = None, threading.Lock()


# A forked child (DataLoader workers, multiprocessing) inherits the loop but not its thread.
os.register_at_fork(after_in_child=_forget_background_loop)


def _background_loop() -> asyncio.AbstractEventLoop:
    global _background
    with _background_lock:
        if _background is None:
            _background = asyncio.new_event_loop()
            threading.Thread(target=_background.run_forever, name="p2r-async", daemon=True).start()
        return _background


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, inside or outside a running event loop.

    Always on one long-lived background loop, so clients keep their pooled connections
    between calls (a fresh `asyncio.run` per call would reconnect every time).
    """
    loop = _background_loop()
    if asyncio._get_running_loop() is loop:  # blocking the loop on itself would deadlock
        coro.close()
        raise RuntimeError("run_sync called from its own background loop; await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


async def gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Await all concurrently, results in order; when one raises (an outage), the rest are cancelled
    before the error propagates, so nothing keeps calling a service the run has given up on."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def image_part(image: Image.Image, quality: int = 95, fmt: str = "JPEG") -> dict:
    """An OpenAI chat content part carrying the image as a data URL (JPEG of `quality` unless `fmt` says PNG)."""
    return {"type": "image_url", "image_url": {"url": data_url(image, fmt, quality=quality)}}
