"""The `hf` backend: batched generation with a transformers Qwen-VL model in this process."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, BatchFeature

from ..images import PixelBudget
from ..prompts import Prompt
from ..tiny import resolve_pretrained
from .base import Generation, GenParams
from .local import isolate_failures, processor_size


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """`auto` -> bfloat16 on GPU, float32 on CPU (bfloat16 is no faster there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def stop_lengths(new_tokens: torch.Tensor, eos_ids: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Generated length of each row up to and including its first EOS (rows that stop early are padded
    after it), and whether the row stopped at an EOS rather than at the token limit."""
    is_eos = torch.isin(new_tokens, eos_ids)
    stopped = is_eos.any(dim=1)
    lengths = torch.where(stopped, is_eos.int().argmax(dim=1) + 1, new_tokens.shape[1])
    return lengths.tolist(), stopped.tolist()


def _area(image: object) -> int:
    return getattr(image, "width", 0) * getattr(image, "height", 0)


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed sampling without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class HFEngine:
    """A Qwen-VL checkpoint (hub id, local dir or `p2r-tiny`) generating in left-padded batches."""

    name = "hf"

    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        batch_size: int = 8,
        budget: PixelBudget | None = None,
    ):
        path = resolve_pretrained(pretrained)
        device = resolve_device(device)
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(path, size=processor_size(budget or PixelBudget()))
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=resolve_dtype(dtype, device), device_map=device
        ).eval()
        eos = self.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos])

    def encode(self, prompts: list[Prompt]) -> BatchFeature:
        """Model inputs for a batch: chat-templated, left-padded, images in prompt order at their own size."""
        images = [image for prompt in prompts for image in prompt.images]
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"prompt images must be PIL images, got {type(image).__name__}")
        texts = [
            self.processor.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        return self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")

    def generate(self, prompts: list[Prompt], params: GenParams) -> list[Generation]:
        """One Generation per prompt, in order; greedy unless temperature > 0; a failing prompt gets an error."""
        # Batch prompts of similar image area together so little of each batch is padding.
        order = sorted(range(len(prompts)), key=lambda i: sum(_area(im) for im in prompts[i].images))
        generations: list[Generation | None] = [None] * len(prompts)
        progress = tqdm(total=len(prompts), desc="hf generate", unit="prompt", disable=len(prompts) <= self.batch_size)
        with progress:
            for start in range(0, len(prompts), self.batch_size):
                chunk = order[start : start + self.batch_size]
                # Each chunk gets its own seed so equal prompts in different chunks still sample differently.
                seed = None if params.seed is None else params.seed + start
                run = partial(self._generate, params=params, seed=seed)
                for i, gen in zip(chunk, isolate_failures(run, [prompts[i] for i in chunk])):
                    generations[i] = gen
                progress.update(len(chunk))
        return generations

    @torch.inference_mode()
    def _generate(self, batch: list[Prompt], params: GenParams, seed: int | None) -> list[Generation]:
        inputs = self.encode(batch).to(self.model.device)
        sampling = params.temperature > 0
        # Plain temperature sampling (no top-k/top-p from the checkpoint's config), as vLLM's SamplingParams does.
        mode = {"do_sample": False}
        if sampling:
            mode = {"do_sample": True, "temperature": params.temperature, "top_p": 1.0, "top_k": 0}
        with _seeded(seed, self.model.device) if sampling and seed is not None else nullcontext():
            sequences = self.model.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.min_new_tokens,
                eos_token_id=self.eos_ids.tolist(),
                pad_token_id=self.processor.tokenizer.pad_token_id,
                **mode,
            )
        new = sequences[:, inputs["input_ids"].shape[1] :].cpu()
        lengths, stopped = stop_lengths(new, self.eos_ids)
        texts = self.processor.tokenizer.batch_decode(
            [row[:n] for row, n in zip(new.tolist(), lengths)], skip_special_tokens=True
        )
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            Generation(text, n_in, n_out, extra={"finish_reason": "stop" if stop else "length"})
            for text, n_in, n_out, stop in zip(texts, prompt_tokens, lengths, stopped)
        ]
