"""What the in-process backends (hf, vllm) share: the processor's pixel range and per-prompt failure isolation."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..images import PixelBudget
from ..prompts import Prompt
from .base import Generation

log = logging.getLogger(__name__)


def processor_size(budget: PixelBudget, pretrained: str) -> dict[str, int]:
    """The Qwen-VL processor's `size` (pixel counts) for the checkpoint at `pretrained`: its own floor
    (65,536 for Qwen3-VL), as the release's vLLM kept it, so images fitted below it are enlarged again as
    there; a ceiling no lower than the budget's, so fitted images are never shrunk."""
    from transformers import AutoImageProcessor  # here: importing this module must not pull in transformers

    defaults = AutoImageProcessor.from_pretrained(pretrained).size
    ceiling = max(budget.max_pixels, budget.crop_max_pixels, defaults.get("longest_edge") or 0)
    return {"shortest_edge": defaults.get("shortest_edge") or budget.min_pixels, "longest_edge": ceiling}


def isolate_failures(run: Callable[[list[Prompt]], list[Generation]], prompts: list[Prompt]) -> list[Generation]:
    """Run a batch; if it raises, halve it until only the failing prompts are left to carry an error.

    Halving rather than going one by one keeps the good prompts batched (a large vLLM batch
    with one bad prompt costs about log2(n) extra calls, not n), and it is also the right
    answer to a batch too big for GPU memory.
    """
    try:
        return run(prompts)
    except Exception as exc:  # any backend failure must stay inside the prompts that caused it
        if len(prompts) == 1:
            return [Generation(error=f"{type(exc).__name__}: {exc}")]
        log.warning("a batch of %d prompts failed (%s: %s); splitting it", len(prompts), type(exc).__name__, exc)
        half = len(prompts) // 2
        return isolate_failures(run, prompts[:half]) + isolate_failures(run, prompts[half:])
