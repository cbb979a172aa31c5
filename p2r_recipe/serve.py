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
model's context (prompt text and image tokens plus `max_tokens`), and `--max-generation-s` per
engine call, so a request waits at most for the engine calls queued ahead of it, each of at
most `--max-batch` requests and that many seconds. SIGTERM ends a generation at its next token.
Without a key, POST bodies must be `application/json` and the Host header a name of this
server (cross-site pages and DNS rebinding cannot reach it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .access import is_loopback, read_key_file
from .engines.base import Engine, Generation, GenParams
from .images import ImageError, PixelAllowance, load_image
from .prompts import SYSTEM_PROMPT, Prompt

MAX_BODY_BYTES = 64 * 1024 * 1024
# P2R sends at most 4 (annotated image + 3 crops); the cap bounds decoded memory per request.
MAX_IMAGES = 16
DEFAULT_MAX_TOKENS = 1024
# One request must not hold the server for hours: no P2R pass needs more (the release's longest is 2048).
MAX_NEW_TOKENS = 32768
# A generation (one engine call of up to --max-batch requests) stops here: the bound on how long
# a slow request holds up the ones queued after it.
MAX_GENERATION_S = 600.0
MAX_STOP_STRINGS = 16
# Fields the server reads; `user` is metadata that changes no output.
_READ = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
         "repetition_penalty", "stop", "seed", "min_tokens", "user", "chat_template_kwargs"}  # fmt: skip
# Other fields are accepted only when null or at these values, which change nothing (clients send some by default).
_NEUTRAL = {"stream": False, "n": 1, "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0,
            "response_format": {"type": "text"}}  # fmt: skip


class APIError(Exception):
    """An error reply in OpenAI's shape: `{"error": {"message", "type", "code"}}`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "code": self.status}}, self.status)


def _text(content: Any, where: str) -> str:
    return "\n".join(_parts(content, where)[0])


def _parts(content: Any, where: str, allowance: PixelAllowance | None = None) -> tuple[list[str], list]:
    """A message's text parts and decoded images, in order; images only when there is an `allowance` to decode them on."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url" and allowance is not None:
            if len(images) == MAX_IMAGES:
                raise APIError(400, f"{where}: more than {MAX_IMAGES} images")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:"):
                raise APIError(400, f"{where}: image {len(images)} must be a data: URL (files and http URLs are not fetched)")
            try:
                images.append(load_image(url, allowance=allowance))
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
    texts, images = _parts(messages[users[-1]].get("content"), f"messages[{users[-1]}]", PixelAllowance())
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


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them")
    return tuple(stop)


def to_params(body: dict) -> GenParams:
    """Sampling settings of a chat request; options the server does not implement are refused (400), not ignored."""
    unsupported = sorted(k for k, v in body.items() if k not in _READ and v is not None and _NEUTRAL.get(k, ...) != v)
    if unsupported:
        implemented = ", ".join(sorted(_READ - {"model", "messages", "user", "chat_template_kwargs"}))
        raise APIError(400, f"unsupported option(s): {', '.join(unsupported)} (p2r-serve implements {implemented})")
    max_key = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    positive = {key: _number(body, key, 1.0, float, 0.0, 1.0 if key == "top_p" else float("inf"))
                for key in ("top_p", "repetition_penalty")}  # fmt: skip
    for key, value in positive.items():
        if value <= 0:
            raise APIError(400, f"{key} must be greater than 0")
    return GenParams(
        max_new_tokens=_number(body, max_key, DEFAULT_MAX_TOKENS, int, 1, MAX_NEW_TOKENS),
        temperature=_number(body, "temperature", 0.0, float, 0.0),
        min_new_tokens=_number(body, "min_tokens", 0, int, 0, MAX_NEW_TOKENS),
        seed=_number(body, "seed", None, int, 0),
        top_p=positive["top_p"],
        top_k=max(_number(body, "top_k", 0, int, -1), 0),  # vLLM spells "off" -1
        repetition_penalty=positive["repetition_penalty"],
        stop=_stop(body),
    )


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


@dataclass
class ChatRequest:
    """A parsed chat request: its prompt, sampling settings, and whether the client chose the token limit."""

    prompt: Prompt
    params: GenParams
    max_tokens_given: bool
    template_kwargs: dict = field(default_factory=dict)


def _parse(raw: bytes, served_name: str) -> ChatRequest:
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
    params = to_params(body)
    given = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise APIError(400, "chat_template_kwargs must be an object")
    return ChatRequest(to_prompt(body.get("messages")), params, given, template_kwargs)


def check_template_kwargs(engine: Engine, kwargs: dict) -> None:
    """Refuse `chat_template_kwargs` (a vLLM extension) unless the model's chat template never reads them.

    p2r-serve always renders the template without them; a variable the template does not
    mention (e.g. `enable_thinking` for an Instruct checkpoint) changes nothing, so it passes.
    """
    template = getattr(getattr(engine, "processor", None), "chat_template", None)
    used = sorted(k for k in kwargs if template is None or k in template)
    if used:
        raise APIError(400, f"unsupported option: chat_template_kwargs {', '.join(used)} (this model's chat template reads it)")


def fit_context(engine: Engine, request: ChatRequest) -> GenParams:
    """The request's settings once its prompt is known to fit the model's context (400 otherwise, as vLLM answers).

    A prompt that fits with room to spare but not for the default token limit gets the room left.
    Engines that cannot count a prompt's tokens are not checked.
    """
    if not hasattr(engine, "prompt_tokens"):
        return request.params
    context = engine.context_length
    try:
        prompt = engine.prompt_tokens(request.prompt, limit=context)
    except ValueError as exc:  # an image the processor cannot size (e.g. its aspect ratio) fails here, before generation
        raise APIError(400, f"unusable prompt: {exc}") from None
    params = request.params
    if prompt >= context:
        raise APIError(
            400, f"the prompt is at least {prompt} tokens (text and images), over this model's context of {context} tokens"
        )
    if prompt + params.max_new_tokens > context:
        if request.max_tokens_given:
            raise APIError(
                400,
                f"this model's context is {context} tokens: the prompt's {prompt} plus max_tokens "
                f"{params.max_new_tokens} do not fit",
            )
        params = dataclasses.replace(params, max_new_tokens=context - prompt)
    if params.min_new_tokens > params.max_new_tokens:
        raise APIError(400, f"min_tokens {params.min_new_tokens} is over max_tokens {params.max_new_tokens}")
    return params


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
) -> FastAPI:
    """The OpenAI-compatible app: `/v1/chat/completions`, `/v1/models` (bearer key when set) and `/health` (open).

    Without a key, requests other than `/health` must name this server in their Host header
    (an IP address, or one of `allowed_hosts`; "*" allows any) and POST bodies must be JSON.
    Setting `stopping` answers every waiting or generating request with a 503.
    """
    batcher = MicroBatcher(engine, max_batch, batch_wait_s, stopping or threading.Event())
    any_host = "*" in allowed_hosts
    hosts = {h.lower() for h in allowed_hosts}

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
        return {"status": "ok", "model": served_name, **batcher.stats}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        card = {"id": served_name, "object": "model", "created": 0, "owned_by": "p2r-recipe"}
        return {"object": "list", "data": [card]}

    def prepare(raw: bytes) -> tuple[Prompt, GenParams]:
        request = _parse(raw, served_name)
        check_template_kwargs(engine, request.template_kwargs)
        return request.prompt, fit_context(engine, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        authorize(request)
        raw = await _read_body(request, max_body_bytes)
        prompt, params = await asyncio.to_thread(prepare, raw)  # image decoding and tokenising stay off the event loop
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
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    api_key = read_key(args, parser)
    from .engines.hf import HFEngine  # imported here: torch and transformers are slow to import
    from .tiny import is_tiny_model

    served = args.served_model_name or Path(args.model.rstrip("/")).name
    if is_tiny_model(args.model):
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
        engine, served, api_key, args.max_batch, args.batch_wait_ms / 1000, int(args.max_body_mb * 2**20), hosts, stopping
    )
    print(f"p2r-serve: serving {served!r} at http://{args.host}:{args.port}/v1", flush=True)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, timeout_keep_alive=60,
        timeout_graceful_shutdown=10,
    )  # fmt: skip
    _Server(config, stopping).run()


if __name__ == "__main__":
    main()
