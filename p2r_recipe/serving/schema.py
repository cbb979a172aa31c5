"""The request body of p2r-serve as pydantic models, and pydantic's errors worded as the server's messages
(OpenAI-shaped `APIError`s); also the check that its text is Unicode (no lone UTF-16 surrogates)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

# P2R sends at most 4 (annotated image + 3 crops); the cap bounds decoded memory per request.
MAX_IMAGES = 16
DEFAULT_MAX_TOKENS = 1024
# One request must not hold the server for hours: no P2R pass needs more (the release's longest is 2048).
MAX_NEW_TOKENS = 32768
MAX_STOP_STRINGS = 16
INF = float("inf")
# The numeric options: (type, lowest, highest). The bounds appear in the error messages as written here.
_NUMBERS: dict[str, tuple[type, float, float]] = {
    "max_tokens": (int, 1, MAX_NEW_TOKENS), "max_completion_tokens": (int, 1, MAX_NEW_TOKENS),
    "temperature": (float, 0.0, INF), "min_tokens": (int, 0, MAX_NEW_TOKENS), "seed": (int, 0, INF),
    "top_p": (float, 0.0, 1.0), "top_k": (int, -1, INF), "repetition_penalty": (float, 0.0, INF),
}  # fmt: skip
# Other fields are accepted only when null or at these values, which change nothing (clients send some by default).
_NEUTRAL = {"stream": False, "n": 1, "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0,
            "response_format": {"type": "text"}}  # fmt: skip
_NOT_FETCHED = "must be a data: URL (files and http URLs are not fetched)"


class APIError(Exception):
    """An error reply in OpenAI's shape: `{"error": {"message", "type", "code"}}`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "code": self.status}}, self.status)


# --- the models ---------------------------------------------------------------------------------


def _integral(value: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5, while 5.5 and true stay non-integers (refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _positive(value: float) -> float:
    if value <= 0:
        raise PydanticCustomError("not_positive", "must be greater than 0")
    return value


def _number(key: str) -> Any:
    kind, low, high = _NUMBERS[key]
    steps = (BeforeValidator(_integral),) if kind is int else ()
    positive = (AfterValidator(_positive),) if key in ("top_p", "repetition_penalty") else ()
    return Annotated[(kind, *steps, Strict(), Field(ge=low, le=high), *positive)]  # strict: "5" and true are refused


StopString = Annotated[str, Strict(), StringConstraints(min_length=1)]
DataURL = Annotated[str, Strict(), StringConstraints(pattern=r"^data:")]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Any = ""  # any JSON value, taken as its str() (as the server always has)


class ImageURL(BaseModel):
    url: DataURL


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: Union[ImageURL, DataURL]  # noqa: UP007  # {"url": ...}, or the URL itself

    @property
    def url(self) -> str:
        return self.image_url.url if isinstance(self.image_url, ImageURL) else self.image_url


def _at_most_images(parts: list) -> list:
    if sum(isinstance(part, ImagePart) for part in parts) > MAX_IMAGES:
        raise PydanticCustomError("too_many_images", "more than {limit} images", {"limit": MAX_IMAGES})
    return parts


def _content(part: Any) -> Any:
    """A message's content: a string, or a list of parts (anything else fails as a list)."""
    return Annotated[
        Union[Annotated[str, Tag("str")], Annotated[list[part], AfterValidator(_at_most_images), Tag("list")]],  # noqa: UP007
        Discriminator(lambda value: "str" if isinstance(value, str) else "list"),
    ]


# The last user message may hold images; system messages hold text only.
USER_CONTENT = TypeAdapter(_content(Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]))  # noqa: UP007
SYSTEM_CONTENT = TypeAdapter(_content(TextPart))


class Message(BaseModel):
    """One chat message; only the system messages' and the last user message's content are read (see `to_prompt`)."""

    model_config = ConfigDict(extra="allow")
    role: Any = None
    content: Any = None


class ChatBody(BaseModel):
    """A chat request's body. Options the server does not implement are refused (400), not ignored; the
    model name, when given, must be the served one (404). Both are checked before any field."""

    model_config = ConfigDict(extra="allow")
    # In the order they are checked: the first error is the one reported.
    model: Any = None
    top_p: _number("top_p") | None = None
    repetition_penalty: _number("repetition_penalty") | None = None
    max_tokens: _number("max_tokens") | None = None
    max_completion_tokens: _number("max_completion_tokens") | None = None
    temperature: _number("temperature") | None = None
    min_tokens: _number("min_tokens") | None = None
    seed: _number("seed") | None = None
    top_k: _number("top_k") | None = None
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)], None] = None  # noqa: UP007
    user: Any = None  # metadata that changes no output
    chat_template_kwargs: dict[str, Any] | None = None
    messages: Annotated[list[Message], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _served_and_implemented(cls, body: Any, info) -> Any:
        if not isinstance(body, dict):
            raise APIError(400, "body must be a JSON object")
        served = (info.context or {}).get("served_name")
        if served is not None and body.get("model", served) != served:
            raise APIError(404, f"model {body.get('model')!r} is not served here; this server serves {served!r}",
                           "not_found_error")  # fmt: skip
        unsupported = sorted(k for k, v in body.items() if k not in cls.model_fields and v is not None
                             and _NEUTRAL.get(k, ...) != v)  # fmt: skip
        if unsupported:
            implemented = ", ".join(sorted([*_NUMBERS, "stop"]))
            raise APIError(400, f"unsupported option(s): {', '.join(unsupported)} (p2r-serve implements {implemented})")
        return body


# --- pydantic's errors as the server's messages --------------------------------------------------


def _field_error(error: dict) -> APIError:
    """The first validation error of a ChatBody, worded as the server has always worded it."""
    key = error["loc"][0] if error["loc"] else ""
    if key in _NUMBERS:
        kind, low, high = _NUMBERS[key]
        if error["type"] in ("greater_than_equal", "less_than_equal"):
            return APIError(400, f"{key} must be between {low} and {high}")
        if error["type"] == "not_positive":
            return APIError(400, f"{key} must be greater than 0")
        return APIError(400, f"{key} must be {'an integer' if kind is int else 'a number'}")
    if key == "stop":
        return APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them")
    if key == "chat_template_kwargs":
        return APIError(400, "chat_template_kwargs must be an object")
    if key == "messages":
        return APIError(400, "messages must be a non-empty list of objects")
    return APIError(400, f"{'.'.join(map(str, error['loc']))}: {error['msg']}")


def _content_error(exc: ValidationError, content: Any, where: str) -> APIError:
    """The first error in a message's content, named by its part (and image) index."""
    error = exc.errors()[0]
    loc = error["loc"]
    if error["type"] == "too_many_images":
        return APIError(400, f"{where}: more than {MAX_IMAGES} images")
    if len(loc) < 2:  # neither a string nor a list
        return APIError(400, f"{where}: content must be a string or a list of parts")
    index = loc[1]
    if "image_url" in loc[2:]:
        images = sum(isinstance(p, dict) and p.get("type") == "image_url" for p in content[:index])
        return APIError(400, f"{where}: image {images} {_NOT_FETCHED}")
    part = content[index]
    return APIError(400, f"{where}: unsupported content part {part.get('type') if isinstance(part, dict) else None!r}")


def validated(adapter: TypeAdapter, content: Any, where: str) -> Any:
    try:
        return adapter.validate_python(content)
    except ValidationError as exc:
        raise _content_error(exc, content, where) from None


def lone_surrogate(body: Any) -> str | None:
    """Where a string (or key) of the parsed JSON holds a lone UTF-16 surrogate, which JSON's `\\ud800`
    escapes allow but no text encoding does (the tokenizer and the reply would fail on it)."""
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:  # iterative: a body nested to the JSON parser's depth would overflow a recursive walk
        value, path = stack.pop()
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "body"
                where = where.encode("utf-8", "backslashreplace").decode()  # a key may hold one too
                return f"{where}: character {exc.start} is a lone UTF-16 surrogate \\u{ord(value[exc.start]):04x}"
        elif isinstance(value, dict):
            stack.extend((k, (*path, "(key)")) for k in value)
            stack.extend((v, (*path, k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(value))
    return None


def validate_body(body: Any, served_name: str | None = None) -> ChatBody:
    try:
        return ChatBody.model_validate(body, context={"served_name": served_name})
    except ValidationError as exc:
        raise _field_error(exc.errors()[0]) from None
