"""The two roles of a mixed-roles `p2r` run: their keys, what records say about each, and outages that name the role.

In p2r mode the perceive pass may run on one engine and the reason pass on another (see
`model.P2R`). Each service's key comes from its own environment variable (or a mode-600
file it names), never from argv; a record names each pass's model and backend, never a key.
"""

from __future__ import annotations

from dataclasses import replace

from ..client import RequestRejected, ServiceUnavailable
from ..engines import Engine, Generation, GenParams
from ..prompts import Prompt

# The reasoner's key (today's only one) and the perceiver's: separate variables, so neither service sees the other's.
# Never model args: those end up in argv and in what lmms-eval prints (registration.take_cli_key takes out `api_key=`).
API_KEY_ENV = "P2R_API_KEY"
PERCEIVER_API_KEY_ENV = "P2R_PERCEIVER_API_KEY"
# The prefix of the perceive pass's own model args.
PERCEIVER = "perceiver_"


def describe(backend: str, model: str, base_url: str | None) -> dict[str, str]:
    """What a record says about the engine of one pass (never its key)."""
    return {"model": model, "backend": backend, **({"base_url": base_url} if backend == "openai" else {})}


def perceiver_engine_args(
    mode: str, named: tuple, pixels: tuple, own_decoding: tuple, engine_kwargs: dict, key_env: str
) -> tuple[bool, dict]:
    """Whether the perceive pass gets an engine of its own (any of `named`: perceiver_pretrained, _backend,
    _base_url, _served_model), and that engine's extra kwargs: each `perceiver_X` left in `engine_kwargs`,
    taken out of it, as `X`. ValueError for perceiver arguments outside p2r mode, for pixel or engine
    arguments without an engine of the perceiver's own (one engine has one pixel budget), and for a key."""
    ours = [k for k in engine_kwargs if k.startswith(PERCEIVER)]
    extra = {k.removeprefix(PERCEIVER): engine_kwargs.pop(k) for k in ours}
    if "api_key" in extra:
        raise ValueError(
            f"p2r: a key in --model_args reaches argv and the logs; set ${key_env} "
            f"(or ${key_env}_FILE, a mode-600 file) instead"
        )
    mixed = any(v is not None for v in named)
    if mode != "p2r" and (mixed or extra or any(v is not None for v in (*pixels, *own_decoding))):
        raise ValueError(f"p2r: perceiver_* arguments need mode=p2r (mode={mode} has no perceive pass)")
    if not mixed and (extra or any(v is not None for v in pixels)):
        raise ValueError(
            "p2r: perceiver pixel or engine arguments need a perceiver engine of its own: name it with "
            "perceiver_pretrained, perceiver_backend, perceiver_base_url or perceiver_served_model"
        )
    return mixed, extra


def decoding(base: GenParams, temperature, top_p, top_k, repetition_penalty, stop) -> GenParams:
    """`base` with a pass's sampling model args (strings as lmms-eval passes them; `stop` split at "|")."""
    return replace(
        base,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        repetition_penalty=float(repetition_penalty),
        stop=tuple(s for s in str(stop or "").split("|") if s),
    )


class RoleEngine:
    """An engine playing one role of a mixed-roles run: its replies untouched, and a service outage or setup
    error it raises (ServiceUnavailable, RequestRejected: the run stops) names the role and its model."""

    def __init__(self, role: str, engine: Engine, about: dict[str, str]):
        self.role, self.engine, self.name = role, engine, engine.name
        where = f" at {about['base_url']}" if "base_url" in about else ""
        self.label = f"the {role} ({about['model']} on {about['backend']}{where})"

    def generate(self, prompts: list[Prompt], params: GenParams) -> list[Generation]:
        try:
            return self.engine.generate(prompts, params)
        except ServiceUnavailable as exc:
            raise ServiceUnavailable(f"p2r: {self.label} failed: {exc}") from None
        except RequestRejected as exc:
            raise RequestRejected(f"p2r: {self.label} failed: {exc}", exc.status) from None
