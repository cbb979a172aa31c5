"""The `hf` backend: batched generation with a transformers Qwen-VL model in this process.

On a GPU, images are normalised and patched on the GPU, and the next batch's prompts are
prepared on the CPU while the current one generates (`images_on_device`, `prefetch`; on a CPU
only `prefetch` is on). The graph path is opt-in (`static_cache=True, graphs=True`): a static
KV cache whose decoding step replays from CUDA graphs (graphs.py), captured per (batch-size
bucket, cache length) on the eager kernels with nothing compiled. It stays off by default until
a GPU run has shown it gives the straightforward path's tokens (the CPU tests check its buffer
logic eagerly; no GPU was available when it was written).
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import (
    AttentionInterface,
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..images import PixelBudget
from ..prompts import Prompt
from . import resolve_pretrained
from .base import Generation, GenParams
from .graphs import StepGraphs, bucket
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


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except that a one-token query (a decoding step) reads each key/value
    head once: its query heads are folded into the query-length axis, (batch, heads, 1, dim) ->
    (batch, kv_heads, group, dim), instead of repeating K/V over the whole cache.

    transformers does the same fold only outside torch.compile; inside the compiled step it
    materialises the repeated K/V of the whole padded static cache in every layer (45% of a
    batch-32 step of the 4B model). SDPA's own `enable_gqa` is no substitute: with a padding mask
    CUDA's SDPA sends it to the math kernel, which repeats K/V too.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1
    if query.shape[2] != 1 or groups == 1 or not shared_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, dim = query.shape
    folded = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register("p2r_grouped_sdpa", grouped_sdpa)
AttentionMaskInterface.register("p2r_grouped_sdpa", sdpa_mask)  # the masks SDPA gets; without it transformers builds none


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed sampling without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class PromptRepetitionPenalty(LogitsProcessor):
    """vLLM's repetition penalty: every token of the prompt and of the output so far, each once,
    has its logit divided by `penalty` (multiplied when negative). transformers' own processor
    would also penalise the left padding of shorter prompts, so a row's output would depend on
    its batch; here pad positions count as the prompt's last token instead (already penalised)."""

    def __init__(self, penalty: float, attention_mask: torch.Tensor):
        self.penalty = penalty
        self.pads = attention_mask == 0
        self.prompt: torch.Tensor | None = None  # the prompt's ids with pads replaced, made on the first step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = self.pads.shape[1]
        if self.prompt is None:
            last = input_ids[:, length - 1 : length].expand(-1, length)
            self.prompt = torch.where(self.pads.to(input_ids.device), last, input_ids[:, :length])
        ids = torch.cat([self.prompt, input_ids[:, length:]], dim=1)
        picked = torch.gather(scores, 1, ids)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, ids, picked)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string (vLLM and OpenAI leave the stop string out), and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class _Interrupted(StoppingCriteria):
    """Ends every row of a generation at the next token once `event` is set (p2r-serve shutting down)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class _Staged:
    """A batch's CPU-side work, done ahead: chat-templated texts and images (RGB arrays when they go to the GPU)."""

    texts: list[str]
    images: list


class HFEngine:
    """A Qwen-VL checkpoint (hub id, local dir or `p2r-tiny`) generating in left-padded batches.

    `images_on_device` defaults to on for CUDA devices; `static_cache` and `graphs` are opt-in
    (see the module docstring); `cache_step` rounds the static cache's length up so that prompts of similar
    lengths reuse one captured decoding step, and `graph_slots` is how many (batch, cache
    length) graphs, each with its static cache, stay alive. `graphs` on a CPU runs the same
    static buffers eagerly (what the CPU tests check). A server sets `max_time_s` (each generate
    call stops there, its rows cut like at the token limit) and `interrupt` (setting the event
    ends generation at the next token).
    """

    name = "hf"

    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        batch_size: int = 8,
        budget: PixelBudget | None = None,
        static_cache: bool = False,
        graphs: bool = False,
        images_on_device: bool | None = None,
        prefetch: bool = True,
        cache_step: int = 512,
        graph_slots: int = 2,
        max_time_s: float | None = None,
        interrupt: threading.Event | None = None,
    ):
        path = resolve_pretrained(pretrained)
        device = resolve_device(device)
        on_gpu = device.startswith("cuda")
        self.static_cache, self.graphs = static_cache, graphs
        if self.graphs and not self.static_cache:
            raise ValueError("graphs=True needs static_cache=True: only a static cache keeps the decoding step's shapes fixed")
        self.images_on_device = on_gpu if images_on_device is None else images_on_device
        self.prefetch, self.cache_step = prefetch, cache_step
        self.max_time_s, self.interrupt = max_time_s, interrupt
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(path, size=processor_size(budget or PixelBudget(), path))
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # The static cache's decoding step attends with K/V heads read once (see grouped_sdpa).
        attention = {"text_config": "p2r_grouped_sdpa"} if self.static_cache else None
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=resolve_dtype(dtype, device), device_map=device, attn_implementation=attention
        ).eval()
        self.step_graphs = StepGraphs(self.model, graph_slots) if self.graphs else None
        eos = self.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos])

    @property
    def context_length(self) -> int:
        """Most tokens (prompt plus reply) the model's positions cover."""
        config = getattr(self.model.config, "text_config", self.model.config)
        return int(config.max_position_embeddings)

    def prompt_tokens(self, prompt: Prompt, limit: int | None = None) -> int:
        """Tokens `prompt` takes in the context, text plus image tokens, without processing any pixels.

        A text so long that it must pass `limit` is not tokenised (that could hold the GIL for
        minutes): the answer is then a lower bound that is over `limit`.
        """
        text = self.processor.apply_chat_template(prompt.messages(), add_generation_prompt=True, tokenize=False)
        if limit is not None and len(text) > limit * self._longest_token:
            return len(text) // self._longest_token
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        image = self.processor.image_processor
        patches = [image.get_number_of_image_patches(im.height, im.width, {}) for im in prompt.images]
        # The template holds one placeholder token per image; the processor expands it to the image's tokens.
        return len(ids) - len(patches) + sum(n // image.merge_size**2 for n in patches)

    @functools.cached_property
    def _longest_token(self) -> int:
        """Most characters one token stands for (vocabulary entries are at least as long as their text)."""
        return max(len(token) for token in self.processor.tokenizer.get_vocab())

    def encode(self, prompts: list[Prompt]) -> BatchFeature:
        """Model inputs for a batch: chat-templated, left-padded, images in prompt order at their own size."""
        return self._inputs(self._stage(prompts))

    def _stage(self, prompts: list[Prompt]) -> _Staged:
        """The CPU-only part of encoding (safe in a worker thread: it touches no GPU)."""
        images = [image for prompt in prompts for image in prompt.images]
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"prompt images must be PIL images, got {type(image).__name__}")
        texts = [
            self.processor.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        if self.images_on_device:
            # One copy into an array; the processor then never touches the pixels on the CPU again.
            images = [np.array(image if image.mode == "RGB" else image.convert("RGB")) for image in images]
        return _Staged(texts, images)

    def _inputs(self, staged: _Staged) -> BatchFeature:
        images, layout = staged.images, {}
        if self.images_on_device and images:
            # Channels-last uint8 on the GPU: the processor's permute, rescale, normalise and patching run there.
            images = [torch.from_numpy(array).to(self.model.device) for array in images]
            layout = {"input_data_format": "channels_last"}
        inputs = self.processor(text=staged.texts, images=images or None, padding=True, return_tensors="pt", **layout)
        return inputs.to(self.model.device)

    def generate(self, prompts: list[Prompt], params: GenParams) -> list[Generation]:
        """One Generation per prompt, in order; greedy unless temperature > 0; a failing prompt gets an error."""
        # Batch prompts of similar image area together so little of each batch is padding.
        order = sorted(range(len(prompts)), key=lambda i: sum(_area(im) for im in prompts[i].images))
        chunks = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        generations: list[Generation | None] = [None] * len(prompts)
        progress = tqdm(total=len(prompts), desc="hf generate", unit="prompt", disable=len(prompts) <= self.batch_size)
        with progress, ThreadPoolExecutor(1, thread_name_prefix="hf-stage") as stager:
            stage = (lambda batch: stager.submit(self._stage, batch)) if self.prefetch else (lambda batch: None)
            ahead = stage(self._fill([prompts[i] for i in chunks[0]])) if chunks else None
            for k, chunk in enumerate(chunks):
                batch, staged = self._fill([prompts[i] for i in chunk]), ahead
                if k + 1 < len(chunks):
                    ahead = stage(self._fill([prompts[i] for i in chunks[k + 1]]))
                # Each chunk gets its own seed so equal prompts in different chunks still sample differently.
                seed = None if params.seed is None else params.seed + k * self.batch_size
                run = self._runner(batch, staged, params, seed)
                for i, gen in zip(chunk, isolate_failures(run, batch)):
                    generations[i] = gen
                progress.update(len(chunk))
        return generations

    def _fill(self, batch: list[Prompt]) -> list[Prompt]:
        """With a static cache, a short batch (a run's last) repeats its last prompt up to its `bucket` (the next
        power of two, at most `batch_size`): each batch size has its own captured step and static cache, so a
        few shapes serve every batch. The repeats' generations are dropped (zip in `generate`)."""
        if not self.static_cache or not batch or len(batch) >= self.batch_size:
            return batch
        return batch + [batch[-1]] * (bucket(len(batch), self.batch_size) - len(batch))

    def _runner(self, batch: list[Prompt], staged: Future | None, params: GenParams, seed: int | None):
        """Generate for `batch` from its prefetched stage; parts of it (after a failure split) are staged anew."""

        def run(part: list[Prompt]) -> list[Generation]:
            ready = staged.result() if staged is not None and part is batch else self._stage(part)
            return self._generate(self._inputs(ready), params, seed)

        return run

    def _cache(self, inputs: BatchFeature, params: GenParams):
        """A context giving generate() arguments for the KV cache: HF's dynamic cache, or a static one of a
        rounded-up length (the graphs' own when `graphs` is on). generate() never compiles anything itself."""
        if not self.static_cache:
            return nullcontext({})
        batch, prompt_length = inputs["input_ids"].shape
        length = -(-(prompt_length + params.max_new_tokens) // self.cache_step) * self.cache_step
        if self.step_graphs is not None:
            return self.step_graphs.session(batch, length)
        return nullcontext({"cache_implementation": "static", "max_cache_len": length})

    def decoding(self, params: GenParams, attention_mask: torch.Tensor) -> dict:
        """generate() arguments that decode as vLLM's SamplingParams do: greedy at temperature 0, else plain
        sampling with `top_p`/`top_k` (0 = off); the checkpoint's own generation_config never adds to them."""
        kwargs: dict = {"do_sample": False, "repetition_penalty": 1.0, "logits_processor": LogitsProcessorList()}
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.repetition_penalty != 1.0:
            kwargs["logits_processor"].append(PromptRepetitionPenalty(params.repetition_penalty, attention_mask))
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.processor.tokenizer)
        return kwargs

    @torch.inference_mode()
    def _generate(self, inputs: BatchFeature, params: GenParams, seed: int | None) -> list[Generation]:
        sampling = params.temperature > 0
        seeding = _seeded(seed, self.model.device) if sampling and seed is not None else nullcontext()
        with seeding, self._cache(inputs, params) as cache:
            sequences = self.model.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.min_new_tokens,
                eos_token_id=self.eos_ids.tolist(),
                pad_token_id=self.processor.tokenizer.pad_token_id,
                max_time=self.max_time_s,
                stopping_criteria=StoppingCriteriaList([_Interrupted(self.interrupt)]) if self.interrupt is not None else None,
                disable_compile=True,
                **cache,
                **self.decoding(params, inputs["attention_mask"]),
            )
        new = sequences[:, inputs["input_ids"].shape[1] :].cpu()
        lengths, stopped = stop_lengths(new, self.eos_ids)
        texts = self.processor.tokenizer.batch_decode(
            [row[:n] for row, n in zip(new.tolist(), lengths)], skip_special_tokens=True
        )
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        generations = []
        for text, n_in, n_out, stop in zip(texts, prompt_tokens, lengths, stopped):
            text, at_stop_string = cut_at_stop(text, params.stop)
            finish = "stop" if stop or at_stop_string else "length"
            generations.append(Generation(text, n_in, n_out, extra={"finish_reason": finish}))
        return generations
