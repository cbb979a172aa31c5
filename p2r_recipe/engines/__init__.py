"""Generation backends behind one protocol: `hf` (transformers), `vllm` (offline vLLM), `openai` (any compatible service).

Each backend's module is imported only when `make_engine` asks for it, so importing
this package never pulls in torch, transformers or vLLM.
"""

from __future__ import annotations

from importlib import import_module

from .base import Engine, Generation, GenParams

__all__ = ["BACKENDS", "Engine", "GenParams", "Generation", "make_engine"]

BACKENDS = {
    "hf": ("p2r_recipe.engines.hf", "HFEngine"),
    "vllm": ("p2r_recipe.engines.vllm", "VLLMEngine"),
    "openai": ("p2r_recipe.engines.openai", "OpenAIEngine"),
}


def make_engine(backend: str, **kwargs) -> Engine:
    """The engine of `backend` built with `kwargs` (see each engine class for its arguments)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[backend]
    return getattr(import_module(module), cls)(**kwargs)
