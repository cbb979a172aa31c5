"""Generation backends behind one protocol: `hf` (transformers), `vllm` (offline vLLM), `openai` (any compatible service).

Each backend's module is imported only when `make_engine` asks for it, so importing
this package never pulls in torch, transformers or vLLM.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec

from .base import Engine, Generation, GenParams

__all__ = ["BACKENDS", "Engine", "GenParams", "Generation", "choose_backend", "make_engine", "resolve_backend"]

BACKENDS = {
    "hf": ("p2r_recipe.engines.hf", "HFEngine"),
    "vllm": ("p2r_recipe.engines.vllm", "VLLMEngine"),
    "openai": ("p2r_recipe.engines.openai", "OpenAIEngine"),
}


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
