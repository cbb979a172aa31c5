"""`p2r-serve`: a small OpenAI-compatible chat server over the `hf` backend, micro-batching concurrent requests.

Meant for development, tests and small frozen-role services; use vLLM for speed.
Requests map onto one `Prompt`: the system messages' text (the release's system prompt
when there is none), then the LAST user message's images (in order) and its text parts
joined by newlines; earlier turns are ignored, since every P2R pass is single-turn.
Images must be inline `data:` URLs (files and http URLs are never fetched). Decoding is
greedy unless `temperature` > 0; `top_p`, `top_k`, `repetition_penalty`, `stop`, `min_tokens`
and `seed` are honoured as in vLLM, and any other option is refused with a 400 naming it.

Limits (each a 4xx naming it, the server staying up): the body (`--max-body-mb`), 16 images and
`MAX_TOTAL_PIXELS` decoded pixels per request (read from the headers before decoding), the
decoded pixels of all requests in flight together (`--max-pixels-in-flight`: a request waits for
room, and gets a 503 after `--pixel-wait-s`), the model's context (prompt text and image tokens
plus `max_tokens`), and `--max-generation-s` per engine call, so a request waits at most for the
engine calls queued ahead of it, each of at most `--max-batch` requests and that many seconds. SIGTERM ends a generation at its next token.
Without a key, POST bodies must be `application/json` and the Host header a name of this
server (cross-site pages and DNS rebinding cannot reach it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import secrets
import sys
import threading
import time
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..access import is_loopback, read_key_file
from ..engines import is_toy
from ..engines.base import Engine, GenParams
from ..images import MAX_TOTAL_PIXELS
from ..prompts import Prompt
from .batcher import MicroBatcher
from .budget import DEFAULT_PIXEL_WAIT_S, DEFAULT_PIXELS_IN_FLIGHT, PixelsInFlight
from .protocol import (
    APIError,
    ChatRequest,
    check_template_kwargs,
    decode_images,
    fit_context,
    parse_request,
)

MAX_BODY_BYTES = 64 * 1024 * 1024
# A generation (one engine call of up to --max-batch requests) stops here: the bound on how long
# a slow request holds up the ones queued after it.
MAX_GENERATION_S = 600.0


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


def _hostname(host: str) -> str:
    """The name in a Host header, without its port (IPv6 literals keep no brackets)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def create_app(
    engine: Engine,
    served_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    batch_wait_s: float = 0.005,
    max_body_bytes: int = MAX_BODY_BYTES,
    allowed_hosts: tuple[str, ...] = ("localhost",),
    stopping: threading.Event | None = None,
    pixels: PixelsInFlight | None = None,
) -> FastAPI:
    """The OpenAI-compatible app: `/v1/chat/completions`, `/v1/models` (bearer key when set) and `/health` (open).

    Without a key, requests other than `/health` must name this server in their Host header
    (an IP address, or one of `allowed_hosts`; "*" allows any) and POST bodies must be JSON.
    Setting `stopping` answers every waiting or generating request with a 503. A request holds its
    images' pixels (from their headers) in `pixels` from before decoding them until it is answered.
    """
    batcher = MicroBatcher(engine, max_batch, batch_wait_s, stopping or threading.Event())
    pixels = pixels or PixelsInFlight()
    any_host = "*" in allowed_hosts
    hosts = {h.lower() for h in allowed_hosts}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="p2r-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.pixels = batcher, pixels

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    def authorize(request: Request) -> None:
        if api_key is None:
            # No key: what a browser can send from another site must not get through. A page may POST
            # text/plain or form bodies without a preflight, and a rebound DNS name reaches loopback.
            name = _hostname(request.headers.get("host", "")).lower()
            if not (any_host or _is_ip(name) or name in hosts):
                raise APIError(
                    403, f"Host {name!r} is not a name of this server (start it with --allowed-hosts {name} or a key)",
                    "permission_error",
                )  # fmt: skip
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if request.method == "POST" and kind != "application/json":
                raise APIError(415, f"Content-Type must be application/json, not {kind or 'missing'!r}")
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served_name, **batcher.stats, **pixels.stats}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        card = {"id": served_name, "object": "model", "created": 0, "owned_by": "p2r-recipe"}
        return {"object": "list", "data": [card]}

    def parse(raw: bytes) -> ChatRequest:
        request = parse_request(raw, served_name)
        check_template_kwargs(engine, request.template_kwargs)
        return request

    def prepare(request: ChatRequest) -> tuple[Prompt, GenParams]:
        request.prompt = decode_images(request)
        return request.prompt, fit_context(engine, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        authorize(request)
        raw = await _read_body(request, max_body_bytes)
        # Parsing, image decoding and tokenising stay off the event loop; images are decoded only once
        # their pixels (read from the headers) fit the server's budget, and held until the reply.
        parsed = await asyncio.to_thread(parse, raw)
        del raw  # up to --max-body-mb that a request waiting for pixels need not keep
        async with pixels.hold(parsed.pixels):
            prompt, params = await asyncio.to_thread(prepare, parsed)
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


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells generation to stop when told to exit (SIGTERM, SIGINT):
    uvicorn waits for requests in flight, and a generation would otherwise run to its end."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event):
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig, frame) -> None:
        self.stopping.set()
        super().handle_exit(sig, frame)


def read_key(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """The bearer key from --api-key-file, --api-key or $P2R_SERVE_API_KEY (empty there: none); an empty key is an error."""
    if args.api_key is not None and args.api_key_file is not None:
        parser.error("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:  # the training services' rule: owner-only file, line ending dropped
            key = read_key_file(args.api_key_file, "--api-key-file")
        except ValueError as exc:
            parser.error(str(exc))
    elif args.api_key is not None:
        key = args.api_key
        if key:
            print(
                "p2r-serve: warning: a key given with --api-key is visible to every user of this machine (ps); "
                "set P2R_SERVE_API_KEY or use --api-key-file instead.",
                file=sys.stderr,
            )
    else:
        return os.environ.get("P2R_SERVE_API_KEY") or None
    if not key.strip():
        parser.error("the API key is empty: every client would pass with an empty bearer; give a real key or none")
    return key


def main(argv: list[str] | None = None) -> None:
    """Console script `p2r-serve`."""
    parser = argparse.ArgumentParser(prog="p2r-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id, local checkpoint dir, or p2r-tiny (the offline toy model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", default=None, help="require this bearer key (visible in ps: prefer $P2R_SERVE_API_KEY or --api-key-file)"
    )
    parser.add_argument("--api-key-file", default=None, help="read the bearer key from this file (mode 600)")
    parser.add_argument(
        "--allowed-hosts", default="localhost",
        help="without a key: comma-separated Host names accepted besides IP addresses (default: localhost; * for any)",
    )  # fmt: skip
    parser.add_argument("--served-model-name", default=None, help="model name clients send (default: the model directory's name)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests generated together")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="largest request body (413 above)")
    parser.add_argument(
        "--max-generation-s", type=float, default=MAX_GENERATION_S,
        help="a generation stops after this long (finish_reason length): how long one slow batch can hold up the next",
    )  # fmt: skip
    parser.add_argument(
        "--max-pixels-in-flight", type=int, default=DEFAULT_PIXELS_IN_FLIGHT,
        help=f"decoded image pixels of all requests together; more wait (default {DEFAULT_PIXELS_IN_FLIGHT}, "
        f"{DEFAULT_PIXELS_IN_FLIGHT // MAX_TOTAL_PIXELS} requests at the per-request limit)",
    )  # fmt: skip
    parser.add_argument(
        "--pixel-wait-s", type=float, default=DEFAULT_PIXEL_WAIT_S,
        help="how long a request waits for --max-pixels-in-flight room before a 503",
    )  # fmt: skip
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.max_pixels_in_flight < MAX_TOTAL_PIXELS:
        parser.error(f"--max-pixels-in-flight must be at least one request's limit, {MAX_TOTAL_PIXELS}")
    if args.pixel_wait_s <= 0:
        parser.error("--pixel-wait-s must be positive")
    api_key = read_key(args, parser)
    # Imported here: torch and transformers are slow to import.
    from ..engines.hf import HFEngine

    served = args.served_model_name or Path(args.model.rstrip("/")).name
    if is_toy(args.model):
        print("p2r-serve: the offline tiny toy model (random, or trained on synthetic scenes only).", flush=True)
    if not is_loopback(args.host) and not api_key:
        print(
            f"p2r-serve: warning: listening on {args.host} with no API key; anyone who can reach it can use it.",
            file=sys.stderr,
        )
    stopping = threading.Event()
    engine = HFEngine(
        args.model, device=args.device, dtype=args.dtype, batch_size=args.max_batch,
        max_time_s=args.max_generation_s, interrupt=stopping,
    )  # fmt: skip
    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()) + (args.host,)
    app = create_app(
        engine, served, api_key, args.max_batch, args.batch_wait_ms / 1000, int(args.max_body_mb * 2**20), hosts, stopping,
        PixelsInFlight(args.max_pixels_in_flight, args.pixel_wait_s),
    )
    print(f"p2r-serve: serving {served!r} at http://{args.host}:{args.port}/v1", flush=True)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, timeout_keep_alive=60,
        timeout_graceful_shutdown=10,
    )  # fmt: skip
    _Server(config, stopping).run()


if __name__ == "__main__":
    main()
