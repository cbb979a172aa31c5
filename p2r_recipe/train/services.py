"""The frozen-role services (reasoner, perceiver, verifier): where they listen, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from p2r_recipe.access import is_loopback, key_from_env
from p2r_recipe.client import ChatClient

DEFAULT_HOST = "127.0.0.1"
REASONER_PORT, PERCEIVER_PORT, VERIFIER_PORT = 18901, 18902, 18903
DEFAULT_PORTS = {"reasoner": REASONER_PORT, "perceiver": PERCEIVER_PORT, "verifier": VERIFIER_PORT}
SERVICES = tuple(DEFAULT_PORTS)

# Client tuning shared by every service; the reward and precompute steps read these.
DEFAULT_CONCURRENCY = 64
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 1.0


def env_number(env: Mapping[str, str], var: str, default: float, kind: type = float):
    """A numeric setting from the environment: `default` when unset or empty, a clear error when malformed."""
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None


@dataclass(frozen=True)
class ServiceConfig:
    """One OpenAI-compatible service: `{NAME}_HOST`, `{NAME}_PORT`, `{NAME}_MODEL`, and its key,
    `{NAME}_API_KEY` or `{NAME}_API_KEY_FILE` (a mode-600 file holding it; the file wins)."""

    name: str
    host: str
    port: int
    model: str
    api_key: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S

    @classmethod
    def from_env(cls, name: str, env: Mapping[str, str] | None = None) -> ServiceConfig:
        """Read one service's address (defaults: 127.0.0.1, its own port, served name = role) and the
        shared client settings `P2R_CONCURRENCY`, `P2R_TIMEOUT_S`, `P2R_RETRIES`, `P2R_BACKOFF_S`."""
        if name not in DEFAULT_PORTS:
            raise ValueError(f"unknown service {name!r}; expected one of {SERVICES}")
        env = os.environ if env is None else env
        prefix = name.upper()
        return cls(
            name=name,
            host=env.get(f"{prefix}_HOST") or DEFAULT_HOST,
            port=env_number(env, f"{prefix}_PORT", DEFAULT_PORTS[name], int),
            model=env.get(f"{prefix}_MODEL") or name,
            api_key=key_from_env(f"{prefix}_API_KEY", env),
            concurrency=env_number(env, "P2R_CONCURRENCY", DEFAULT_CONCURRENCY, int),
            timeout_s=env_number(env, "P2R_TIMEOUT_S", DEFAULT_TIMEOUT_S),
            retries=env_number(env, "P2R_RETRIES", DEFAULT_RETRIES, int),
            backoff_s=env_number(env, "P2R_BACKOFF_S", DEFAULT_BACKOFF_S),
        )

    @property
    def local_only(self) -> bool:
        """Whether only processes on this node can reach it (a loopback address)."""
        return is_loopback(self.host)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # a bare IPv6 address
        return f"http://{host}:{self.port}/v1"

    def client(self) -> ChatClient:
        """A bounded, retrying client; its errors name this service and its URL."""
        return ChatClient(
            self.base_url, self.model, self.api_key, name=self.name, concurrency=self.concurrency,
            timeout_s=self.timeout_s, retries=self.retries, backoff_s=self.backoff_s,
        )  # fmt: skip
