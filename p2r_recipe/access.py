"""Who may use a service: keys read from owner-only files, and addresses only this node reaches.

Shared by p2r-serve and the training services, so both apply one rule; it imports no client
or server code.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path


def read_key_file(path: str, var: str) -> str:
    """A service key from a file only its owner can read (mode 600), so it never travels in argv or a shared env."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
        key = file.read_text(encoding="utf-8").rstrip("\r\n")  # as the service scripts read it
    except OSError as exc:
        raise ValueError(f"{var}={path}: cannot read the key file ({exc.strerror})") from None
    if mode & 0o077:
        raise ValueError(f"{var}={path} is readable by others (mode {mode & 0o777:o}); chmod 600 {path}")
    if not key:
        raise ValueError(f"{var}={path} is empty")
    return key


def key_from_env(var: str, env: Mapping[str, str] | None = None) -> str | None:
    """A service key from the environment: the file named by `$VAR_FILE` (read as `read_key_file` reads it; it wins),
    else `$VAR`; None when neither is set. Keys come from the environment only, so none is ever in argv."""
    env = os.environ if env is None else env
    path = env.get(f"{var}_FILE")
    if path:
        return read_key_file(path, f"{var}_FILE")
    return env.get(var) or None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this node only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
