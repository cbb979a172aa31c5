"""The server-wide budget of decoded pixels in flight: requests wait for room (asynchronously, first come first
served) before decoding their images, and give up with a 503 once they have waited too long."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from ..images import MAX_TOTAL_PIXELS
from .protocol import APIError

# A few requests at the per-request limit decode at once; more wait. Each pixel costs several bytes
# beyond its 3 of RGB while the processor resizes it (see the serving README's measured RSS).
DEFAULT_PIXELS_IN_FLIGHT = 4 * MAX_TOTAL_PIXELS
DEFAULT_PIXEL_WAIT_S = 60.0


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


class PixelsInFlight:
    """At most `total` pixels held at once. `hold(n)` waits until `n` fit (behind every earlier waiter,
    so large requests are not starved by small ones), holds them while its block runs, and releases
    them however the block ends (success, error, cancellation). A wait over `wait_s` is a 503."""

    def __init__(self, total: int = DEFAULT_PIXELS_IN_FLIGHT, wait_s: float = DEFAULT_PIXEL_WAIT_S):
        if total < 1:
            raise ValueError(f"the pixel budget must be positive, not {total}")
        self.total, self.wait_s, self.used = total, wait_s, 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()
        self.stats = {"pixels_in_flight": 0, "pixel_budget": total, "pixel_waits": 0, "pixel_timeouts": 0}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _busy(self, message: str) -> APIError:
        return APIError(503, f"{message}; retry later, or raise --max-pixels-in-flight / --pixel-wait-s", "server_error")

    async def acquire(self, pixels: int) -> None:
        """Take `pixels` once they fit, or raise a 503 APIError after `wait_s` (or at once if they never can)."""
        if pixels > self.total:
            raise self._busy(f"this request's images hold {pixels} pixels, over the server's whole budget of "
                             f"{self.total} decoded pixels in flight")  # fmt: skip
        if pixels <= 0:
            return
        if not self._waiting and self.used + pixels <= self.total:
            self._take(pixels)
            return
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        entry = (pixels, future)
        self._waiting.append(entry)
        self.stats["pixel_waits"] += 1
        # A timer rather than asyncio.wait_for, which (Python 3.11) swallows a cancellation that
        # arrives just after the grant: a client that went away must not be admitted.
        timer = loop.call_later(self.wait_s, _expire, future)
        try:
            await future
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(pixels)  # granted just as the client went away: give them back
            else:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._grant()  # a waiter at the head that left may have been what held the others back
            if isinstance(exc, asyncio.TimeoutError):  # the builtin TimeoutError only from Python 3.11
                self.stats["pixel_timeouts"] += 1
                raise self._busy(
                    f"the server's budget of {self.total} decoded pixels in flight (--max-pixels-in-flight) stayed "
                    f"full for {self.wait_s:g} s (--pixel-wait-s); this request needs {pixels}"
                ) from None
            raise
        finally:
            timer.cancel()

    def _take(self, pixels: int) -> None:
        self.used += pixels
        self.stats["pixels_in_flight"] = self.used

    def release(self, pixels: int) -> None:
        """Give back pixels taken by `acquire` and admit the waiters that now fit, in order."""
        if pixels <= 0:
            return
        self.used -= pixels
        self.stats["pixels_in_flight"] = self.used
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            pixels, future = self._waiting[0]
            if future.done():  # cancelled: its acquire removes nothing else
                self._waiting.popleft()
                continue
            if self.used + pixels > self.total:
                return
            self._waiting.popleft()
            self._take(pixels)
            future.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        await self.acquire(pixels)
        try:
            yield
        finally:
            self.release(pixels)
