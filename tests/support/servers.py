"""Real HTTP servers for tests: `p2r-serve` in a subprocess, and a scripted OpenAI-compatible server in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class P2RServe(NamedTuple):
    """A running p2r-serve: its base URL (no /v1) and process."""

    base_url: str
    process: subprocess.Popen


def _serve_command() -> list[str]:
    script = Path(sys.executable).with_name("p2r-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "p2r_recipe.serving"]


@contextlib.contextmanager
def start_p2r_serve(
    model_dir: str | Path,
    api_key: str | None = None,
    served_name: str = "tiny",
    extra_args: tuple[str, ...] = (),
    port: int | None = None,
    startup_timeout_s: float = 180,
) -> Iterator[P2RServe]:
    """Run the real `p2r-serve` console script on 127.0.0.1 until `/health` answers; kill it on exit."""
    port = port or free_port()
    cmd = [*_serve_command(), "--model", str(model_dir), "--port", str(port), "--served-model-name", served_name]
    # The key travels by environment, never argv; only `api_key` decides, whatever the caller's shell has.
    # Tests never reach the hub.
    env = {**os.environ, "P2R_SERVE_API_KEY": api_key or "", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([*cmd, *extra_args], stdout=log, stderr=subprocess.STDOUT, env=env)

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-4000:]

        try:
            base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"p2r-serve exited with {process.returncode}:\n{output()}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"p2r-serve not healthy after {startup_timeout_s:.0f} s:\n{output()}")
                time.sleep(0.25)
            yield P2RServe(base_url, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class ScriptedServer:
    """An OpenAI-compatible chat server on 127.0.0.1 whose replies come from `reply_fn(request_json)`.

    `reply_fn` returns the reply text, or an int to answer with that HTTP status instead (or a
    (status, message) pair to say why).
    `latency_s` is a delay per request (or a function of the 1-based call number), slept
    asynchronously so concurrent requests overlap. The first `fail_first` requests get
    `status_on_fail`. Records `calls`, `requests` (bodies), `headers` and `max_in_flight`;
    `stop()` and `start()` take it down and back up on the same port.
    """

    def __init__(
        self,
        reply_fn: Callable[[dict], str | int],
        latency_s: float | Callable[[int], float] = 0.0,
        fail_first: int = 0,
        status_on_fail: int = 503,
        models: tuple[str, ...] = ("scripted",),
    ):
        self.reply_fn, self.latency_s, self.models = reply_fn, latency_s, models
        self.fail_first, self.status_on_fail = fail_first, status_on_fail
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.calls = self.in_flight = self.max_in_flight = 0
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._app = Starlette(
            routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]), Route("/v1/models", self._models)]
        )

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _chat(self, request: Request) -> JSONResponse:
        self.calls += 1
        call = self.calls
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.json()
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            delay = self.latency_s(call) if callable(self.latency_s) else self.latency_s
            await asyncio.sleep(delay)
            if call <= self.fail_first:
                return JSONResponse({"error": {"message": "scripted failure"}}, status_code=self.status_on_fail)
            reply = self.reply_fn(body)
            if isinstance(reply, int):
                reply = (reply, f"scripted status {reply}")
            if isinstance(reply, tuple):
                return JSONResponse({"error": {"message": reply[1]}}, status_code=reply[0])
            usage = {"prompt_tokens": len(str(body["messages"]).split()), "completion_tokens": len(reply.split())}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return JSONResponse({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            })  # fmt: skip
        finally:
            self.in_flight -= 1

    def start(self) -> ScriptedServer:
        config = uvicorn.Config(
            self._app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", timeout_graceful_shutdown=0.5
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="scripted-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"scripted server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
