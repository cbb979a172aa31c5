"""The one small interface every generation backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..prompts import Prompt


@dataclass(frozen=True)
class GenParams:
    """Sampling settings for one batch; greedy by default, as published numbers are.

    The defaults are neutral (no penalty, no top-p/top-k cut, no stop strings); the release's
    evaluation settings are chosen by the caller (the lmms-eval model), not here.
    """

    max_new_tokens: int = 1024
    temperature: float = 0.0
    min_new_tokens: int = 0
    seed: int | None = None
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (vLLM spells it -1)
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """One generated reply, or the reason it could not be produced."""

    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    """Generates one reply per prompt; a failing prompt yields a Generation with `error`, never an exception."""

    name: str

    def generate(self, prompts: list[Prompt], params: GenParams) -> list[Generation]: ...
