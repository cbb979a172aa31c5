"""`p2r-serve`: a small OpenAI-compatible chat server over the `hf` backend, micro-batching concurrent requests.

Meant for development, tests and small frozen-role services; use vLLM for speed.
Requests map onto one `Prompt`: the system messages' text (the release's system prompt
when there is none), then the LAST user message's images (in order) and its text parts
joined by newlines; earlier turns are ignored, since every P2R pass is single-turn.
Images must be inline `data:` URLs (files and http URLs are never fetched). Decoding is
greedy unless `temperature` > 0; `min_tokens` and `seed` are honoured as in vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .engines.base import Engine, Generation, GenParams
from .images import ImageError, load_image
from .prompts import SYSTEM_PROMPT, Prompt

MAX_BODY_BYTES = 64 * 1024 * 1024
# P2R sends at most 4 (annotated image + 3 crops); the cap bounds decoded memory per request.
MAX_IMAGES = 16
DEFAULT_MAX_TOKENS = 1024
# One request must not hold the server for hours: no P2R pass needs more (the release's longest is 2048).
MAX_NEW_TOKENS = 32768


class APIError(Exception):
    """An error reply in OpenAI's shape: `{"error": {"message", "type", "code"}}`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "code": self.status}}, self.status)


def _text(content: Any, where: str) -> str:
    return "\n".join(_parts(content, where, allow_images=False)[0])


def _parts(content: Any, where: str, allow_images: bool = True) -> tuple[list[str], list]:
    """A message's text parts and decoded images, in order."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url" and allow_images:
            if len(images) == MAX_IMAGES:
                raise APIError(400, f"{where}: more than {MAX_IMAGES} images")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:"):
                raise APIError(400, f"{where}: image {len(images)} must be a data: URL (files and http URLs are not fetched)")
            try:
                images.append(load_image(url))
            except ImageError as exc:
                raise APIError(400, f"{where}: image {len(images)}: {exc}") from None
        else:
            raise APIError(400, f"{where}: unsupported content part {kind!r}")
    return texts, images


def to_prompt(messages: Any) -> Prompt:
    """The Prompt of a chat request (see the module docstring for how turns are combined)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError(400, "messages must be a non-empty list of objects")
    system = [
        _text(m.get("content"), f"messages[{i}]") for i, m in enumerate(messages) if m.get("role") in ("system", "developer")
    ]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise APIError(400, "messages has no user message")
    texts, images = _parts(messages[users[-1]].get("content"), f"messages[{users[-1]}]")
    return Prompt("\n".join(texts), images, "\n".join(system) if system else SYSTEM_PROMPT)


def _number(body: dict, key: str, default: Any, kind: type, minimum: float, maximum: float = float("inf")) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise APIError(400, f"{key} must be {'an integer' if kind is int else 'a number'}")
    if not minimum <= value <= maximum:
        raise APIError(400, f"{key} must be between {minimum} and {maximum}")
    return kind(value)


def to_params(body: dict) -> GenParams:
    """Sampling settings of a chat request; unsupported options are refused, not ignored."""
    if body.get("stream"):
        raise APIError(400, "stream is not supported")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported")
    max_key = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    return GenParams(
        max_new_tokens=_number(body, max_key, DEFAULT_MAX_TOKENS, int, 1, MAX_NEW_TOKENS),
        temperature=_number(body, "temperature", 0.0, float, 0.0),
        min_new_tokens=_number(body, "min_tokens", 0, int, 0, MAX_NEW_TOKENS),
        seed=_number(body, "seed", None, int, 0),
    )


@dataclass
class _Job:
    prompt: Prompt
    params: GenParams
    future: asyncio.Future


@dataclass
class MicroBatcher:
    """Gathers concurrent requests (up to `max_batch`, waiting `wait_s` for more) into one engine call in a worker thread."""

    engine: Engine
    max_batch: int = 8
    wait_s: float = 0.005
    stats: dict = field(default_factory=lambda: {"requests": 0, "batches": 0, "largest_batch": 0})
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue, init=False)

    async def generate(self, prompt: Prompt, params: GenParams) -> Generation:
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
        try:
            generations = await asyncio.to_thread(self.engine.generate, [job.prompt for job in group], params)
        except Exception as exc:  # the engine should isolate failures itself; if it does not, fail this batch only
            generations = [Generation(error=f"engine failure: {type(exc).__name__}: {exc}") for _ in group]
        for job, gen in zip(group, generations):
            if not job.future.done():  # the client may have gone away
                job.future.set_result(gen)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"request body over {limit} bytes", "request_too_large")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _parse(raw: bytes, served_name: str) -> tuple[Prompt, GenParams]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
        raise APIError(400, f"body is not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "body must be a JSON object")
    if body.get("model", served_name) != served_name:
        raise APIError(
            404, f"model {body.get('model')!r} is not served here; this server serves {served_name!r}", "not_found_error"
        )
    return to_prompt(body.get("messages")), to_params(body)


def create_app(
    engine: Engine,
    served_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    batch_wait_s: float = 0.005,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The OpenAI-compatible app: `/v1/chat/completions`, `/v1/models` (bearer key when set) and `/health` (open)."""
    batcher = MicroBatcher(engine, max_batch, batch_wait_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="p2r-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served_name, **batcher.stats}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        card = {"id": served_name, "object": "model", "created": 0, "owned_by": "p2r-recipe"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        authorize(request)
        raw = await _read_body(request, max_body_bytes)
        prompt, params = await asyncio.to_thread(_parse, raw, served_name)  # image decoding stays off the event loop
        gen = await batcher.generate(prompt, params)
        if gen.error is not None:
            # Failures are isolated per prompt by the engine, so this request itself is what failed.
            raise APIError(400, f"generation failed: {gen.error}", "generation_error")
        finish = gen.extra.get("finish_reason") or ("length" if gen.output_tokens >= params.max_new_tokens else "stop")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": gen.input_tokens,
                "completion_tokens": gen.output_tokens,
                "total_tokens": gen.input_tokens + gen.output_tokens,
            },
        }

    return app


def main(argv: list[str] | None = None) -> None:
    """Console script `p2r-serve`."""
    parser = argparse.ArgumentParser(prog="p2r-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id, local checkpoint dir, or p2r-tiny (offline random weights)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("P2R_SERVE_API_KEY") or None,
        help="require this bearer key (default: $P2R_SERVE_API_KEY)",
    )
    parser.add_argument("--served-model-name", default=None, help="model name clients send (default: the model directory's name)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests generated together")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="largest request body (413 above)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    from .engines.hf import HFEngine  # imported here: torch and transformers are slow to import
    from .tiny import is_tiny_model

    served = args.served_model_name or Path(args.model.rstrip("/")).name
    if is_tiny_model(args.model):
        print("p2r-serve: this is the tiny random-weight test model; its answers are meaningless.", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"p2r-serve: warning: listening on {args.host} with no --api-key; anyone who can reach it can use it.",
            file=sys.stderr,
        )
    engine = HFEngine(args.model, device=args.device, dtype=args.dtype, batch_size=args.max_batch)
    app = create_app(engine, served, args.api_key, args.max_batch, args.batch_wait_ms / 1000, int(args.max_body_mb * 2**20))
    print(f"p2r-serve: serving {served!r} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, timeout_keep_alive=60)


if __name__ == "__main__":
    main()
