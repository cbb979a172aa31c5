"""The wire protocol of p2r-serve: OpenAI chat requests parsed and checked into a `Prompt` and `GenParams`,
and errors in OpenAI's shape. Every refusal is an `APIError` whose status and message name the problem."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from ..engines.base import Engine, GenParams
from ..images import ImageError, PixelAllowance, load_image
from ..prompts import SYSTEM_PROMPT, Prompt

# P2R sends at most 4 (annotated image + 3 crops); the cap bounds decoded memory per request.
MAX_IMAGES = 16
DEFAULT_MAX_TOKENS = 1024
# One request must not hold the server for hours: no P2R pass needs more (the release's longest is 2048).
MAX_NEW_TOKENS = 32768
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
class ChatRequest:
    """A parsed chat request: its prompt, sampling settings, and whether the client chose the token limit."""

    prompt: Prompt
    params: GenParams
    max_tokens_given: bool
    template_kwargs: dict = field(default_factory=dict)


def parse_request(raw: bytes, served_name: str) -> ChatRequest:
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
