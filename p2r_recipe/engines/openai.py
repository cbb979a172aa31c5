"""The `openai` engine: the Engine protocol over an OpenAI-compatible service, through `p2r_recipe.client`."""

from __future__ import annotations

import asyncio
from typing import Any

from tqdm import tqdm

from ..client import ChatClient, RequestRejected, gather_all, image_part, run_sync
from ..images import PixelBudget
from ..prompts import Prompt
from .base import Generation, GenParams

# A wrong key, URL or model name fails every request alike: a setup error, not a bad sample.
_SETUP_STATUS = {401, 403, 404}


# Sampling fields that are vLLM extensions of the OpenAI API (each sent only when it is not off),
# and the `p2r` model arg that turns each off.
_MODEL_ARG = {"top_k": "top_k=0", "repetition_penalty": "repetition_penalty=1.0", "min_tokens": "GenParams.min_new_tokens=0"}
_EXTENSIONS = tuple(_MODEL_ARG)


def request_params(params: GenParams) -> dict[str, Any]:
    """The request-body fields for `params`: the OpenAI ones always (max_tokens, temperature,
    top_p), `stop` and `seed` when set, vLLM's extensions (top_k, repetition_penalty, min_tokens)
    when not off, so a strict OpenAI server sees them only when they change the reply."""
    body: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if params.min_new_tokens:
        body["min_tokens"] = params.min_new_tokens
    return body


def unsupported_field(exc: RequestRejected, body: dict) -> str | None:
    """The vLLM extension field a 400/422 complains about, if its message names one we sent."""
    if exc.status not in (400, 422):
        return None
    return next((name for name in _EXTENSIONS if name in body and name in str(exc)), None)


class OpenAIEngine:
    """The Engine protocol over an OpenAI-compatible service (vLLM, p2r-serve), prompts sent concurrently.

    A prompt the service rejects (e.g. too long for the model) becomes that prompt's
    `Generation(error=...)`: a per-sample error is for bad samples. If the service is
    unreachable through all retries, `generate` raises ServiceUnavailable instead, and a
    wrong key, URL or model name (401/403/404) raises RequestRejected: an outage or a
    setup error stops the run with a clear message rather than turning into empty
    answers that would be scored as wrong.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 600,
        retries: int = 5,
        budget: PixelBudget | None = None,
        backoff_s: float = 0.5,
        image_format: str = "jpeg",
    ):
        if image_format.upper() not in ("JPEG", "PNG"):
            raise ValueError(f"image_format must be jpeg or png, got {image_format!r}")
        self.client = ChatClient(
            base_url, model, api_key, name=model, concurrency=concurrency,
            timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
        )  # fmt: skip
        self.budget = budget
        self.image_format = image_format.upper()

    def generate(self, prompts: list[Prompt], params: GenParams) -> list[Generation]:
        return run_sync(self.agenerate(prompts, params))

    def close(self) -> None:
        self.client.close()

    async def agenerate(self, prompts: list[Prompt], params: GenParams) -> list[Generation]:
        """The async form of `generate`; on an outage the remaining requests are cancelled."""
        quiet = len(prompts) <= self.client.concurrency
        with tqdm(total=len(prompts), desc=f"{self.client.model} requests", unit="prompt", disable=quiet) as bar:

            async def one(prompt: Prompt) -> Generation:
                generation = await self._one(prompt, params)
                bar.update()
                return generation

            return await gather_all(one(prompt) for prompt in prompts)

    async def _one(self, prompt: Prompt, params: GenParams) -> Generation:
        # A no-op for images the pipeline already fitted.
        images = prompt.images if self.budget is None else self.budget.fit(prompt.images)
        body = request_params(params)
        # Encoding runs in a thread (PIL releases the GIL) so large images do not stall other requests.
        parts = await asyncio.to_thread(lambda: [image_part(im, fmt=self.image_format) for im in images])
        try:
            reply = await self.client.chat(prompt.messages(parts), **body)
        except RequestRejected as exc:
            field = unsupported_field(exc, body)
            if field is not None:
                # Every request carries it, so every sample would fail alike: a setup error, not a bad sample.
                raise RequestRejected(
                    f"{exc}\n{self.client.name} at {self.client.base_url} does not accept `{field}` "
                    f"(a vLLM extension of the OpenAI API, sent because it is not off): serve with vLLM or "
                    f"p2r-serve, or turn it off ({_MODEL_ARG[field]})",
                    exc.status,
                ) from None
            if exc.status in _SETUP_STATUS:
                raise
            return Generation(error=str(exc))
        return Generation(text=reply.text, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)
