"""The wire protocol of p2r-serve: OpenAI chat requests, validated by `schema`'s models, as a `Prompt` and
`GenParams`. Every refusal is an `APIError` (OpenAI's error shape) whose status and message name the problem.

A request is taken in two steps so that the server can bound the pixels decoded across requests:
`parse_request` validates the body and reads each image's size from its header (no pixels decoded),
then `decode_images` decodes them once the server has admitted that many pixels.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..engines.base import Engine, GenParams
from ..images import IMAGE_FORMATS, ImageError, PixelAllowance, load_image
from ..prompts import SYSTEM_PROMPT, Prompt
from .schema import (
    DEFAULT_MAX_TOKENS,
    MAX_IMAGES,
    MAX_NEW_TOKENS,
    SYSTEM_CONTENT,
    USER_CONTENT,
    APIError,
    ChatBody,
    ImagePart,
    Message,
    TextPart,
    lone_surrogate,
    validate_body,
    validated,
)

__all__ = [
    "MAX_IMAGES",
    "MAX_NEW_TOKENS",
    "APIError",
    "ChatRequest",
    "check_template_kwargs",
    "decode_images",
    "fit_context",
    "parse_request",
    "to_params",
    "to_prompt",
]


# --- requests ------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A parsed chat request: its prompt, sampling settings, and whether the client chose the token limit.

    Straight from `parse_request`, the prompt has no images yet: `images` holds their encoded bytes
    (or a data URL that does not decode, whose error `decode_images` reports) and `pixels` what their
    headers declare, capped at what one request may decode.
    """

    prompt: Prompt
    params: GenParams
    max_tokens_given: bool
    template_kwargs: dict = field(default_factory=dict)
    images: list = field(default_factory=list)
    pixels: int = 0
    where: str = "messages"  # the message the images come from, as errors name it


def _params(body: ChatBody) -> GenParams:
    maximum = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    stop = [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else body.stop
    return GenParams(
        max_new_tokens=DEFAULT_MAX_TOKENS if maximum is None else maximum,
        temperature=0.0 if body.temperature is None else body.temperature,
        min_new_tokens=body.min_tokens or 0,
        seed=body.seed,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),  # vLLM spells "off" -1
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        stop=tuple(stop),
    )


def to_params(body: dict) -> GenParams:
    """Sampling settings of a chat request; options the server does not implement are refused (400), not ignored."""
    return _params(validate_body({"messages": [{}], **body}))


def _text(parts: Any) -> str:
    return parts if isinstance(parts, str) else "\n".join(str(p.text) for p in parts if isinstance(p, TextPart))


def _prompt(messages: list[Message]) -> tuple[Prompt, list[str], str]:
    """The prompt's text and system parts (see app's docstring for how turns combine), its image URLs in order,
    and the message they come from."""
    system = [_text(validated(SYSTEM_CONTENT, m.content, f"messages[{i}]"))
              for i, m in enumerate(messages) if m.role in ("system", "developer")]  # fmt: skip
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise APIError(400, "messages has no user message")
    parts = validated(USER_CONTENT, messages[users[-1]].content, f"messages[{users[-1]}]")
    urls = [] if isinstance(parts, str) else [p.url for p in parts if isinstance(p, ImagePart)]
    return Prompt(_text(parts), [], "\n".join(system) if system else SYSTEM_PROMPT), urls, f"messages[{users[-1]}]"


def _encoded(url: str) -> bytes | str:
    """A data URL's bytes, or the URL itself when it does not decode (loading it then gives the reason)."""
    try:
        return base64.b64decode(url.split(",", 1)[1], validate=True)
    except (IndexError, ValueError, binascii.Error):
        return url


def _header_pixels(image: bytes | str) -> int:
    """The pixels an image's header declares, without decoding it; 0 when it cannot be read (decoding then
    fails on its header, before any of its pixels). images.load_image does the real, checked opening."""
    if isinstance(image, str):
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image), formats=IMAGE_FORMATS) as opened:
                return opened.width * opened.height
    except Exception:  # noqa: BLE001  # PIL raises many types for unreadable data; load_image words the reason
        return 0


def _from_body(body: Any, served_name: str | None) -> ChatRequest:
    surrogate = lone_surrogate(body)
    if surrogate is not None:
        raise APIError(400, f"{surrogate}, which is not Unicode text: send valid UTF-8 (pair surrogates in \\u escapes)")
    request = validate_body(body, served_name)
    prompt, urls, where = _prompt(request.messages)
    images = [_encoded(url) for url in urls]
    pixels = min(sum(_header_pixels(image) for image in images), PixelAllowance().total)
    given = request.max_tokens is not None or request.max_completion_tokens is not None
    return ChatRequest(prompt, _params(request), given, request.chat_template_kwargs or {}, images, pixels, where)


def parse_request(raw: bytes, served_name: str) -> ChatRequest:
    """A validated request whose images are read only as far as their headers (see ChatRequest)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
        raise APIError(400, f"body is not JSON: {type(exc).__name__}: {exc}") from None
    return _from_body(body, served_name)


def decode_images(request: ChatRequest) -> Prompt:
    """The request's prompt with its images decoded, at most one request's pixel allowance of them."""
    allowance, decoded = PixelAllowance(), []
    for i, image in enumerate(request.images):
        try:
            decoded.append(load_image(image, allowance=allowance))
        except ImageError as exc:
            raise APIError(400, f"{request.where}: image {i}: {exc}") from None
    return dataclasses.replace(request.prompt, images=decoded)


def to_prompt(messages: Any) -> Prompt:
    """The Prompt of a chat request's messages, images decoded."""
    return decode_images(_from_body({"messages": messages}, None))


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
