"""Generation backends behind one protocol: `hf` (transformers), `vllm` (offline vLLM), `openai` (any compatible service).

Each backend's module is imported only when `make_engine` asks for it, so importing
this package never pulls in torch, transformers or vLLM.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

from .base import Engine, Generation, GenParams

__all__ = [
    "BACKENDS", "TOY_NAME", "Engine", "GenParams", "Generation", "choose_backend", "is_toy", "make_engine",
    "resolve_backend", "resolve_pretrained",
]  # fmt: skip

BACKENDS = {
    "hf": ("p2r_recipe.engines.hf", "HFEngine"),
    "vllm": ("p2r_recipe.engines.vllm", "VLLMEngine"),
    "openai": ("p2r_recipe.engines.openai", "OpenAIEngine"),
}


# The offline toy's name (p2r_recipe.toy).
TOY_NAME = "p2r-tiny"


def resolve_pretrained(name: str) -> str:
    """`p2r-tiny` -> the installed toy's directory (installed on first use); any other name unchanged.

    The one place the core meets the toy, and lazily: evaluating a real model never imports it.
    """
    if name != TOY_NAME:
        return name
    from ..toy.model import ensure_tiny_model

    return str(ensure_tiny_model())


def is_toy(name: str) -> bool:
    """Whether `name` is `p2r-tiny` or a directory the toy's builder wrote: its scores are no benchmark result."""
    if name == TOY_NAME:
        return True
    if not Path(name).is_dir():
        return False
    from ..toy.model import is_toy_build

    return is_toy_build(Path(name))


def choose_backend(backend: str, base_url: str | None, vllm_importable: bool, gpu: bool) -> str:
    """What `auto` means: `openai` when a service URL is given; `vllm` where it is installed and a GPU is
    present (paged attention and continuous batching beat the hf engine at every batch size there); else
    `hf` (CPU machines, and GPU machines without vLLM). Any other name is returned as it is."""
    if backend != "auto":
        return backend
    if base_url:
        return "openai"
    return "vllm" if vllm_importable and gpu else "hf"


def resolve_backend(backend: str, base_url: str | None = None) -> str:
    """`choose_backend` with this machine's facts; finds vLLM without importing it, and torch only for `auto`."""
    if backend != "auto" or base_url:
        return choose_backend(backend, base_url, False, False)
    import torch

    return choose_backend(backend, base_url, _importable("vllm"), torch.cuda.is_available())


def _importable(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (blocked) or with no spec
        return False


def make_engine(backend: str, **kwargs) -> Engine:
    """The engine of `backend` (`auto`: see `choose_backend`) built with `kwargs` (see each engine class for its arguments)."""
    backend = resolve_backend(backend, kwargs.get("base_url"))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[backend]
    return getattr(import_module(module), cls)(**kwargs)
