"""Helpers for reward and agent tests: samples on disk, prompts and queries as OpenRLHF builds them, scripted services and policy."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import p2r10k
from servers import free_port

from p2r_recipe import prompts
from p2r_recipe.train.schema import TrainSample

BOX = '[{"bbox_2d": [50, 200, 300, 500], "label": "the square"}]'
TWO_BOXES = '[{"bbox_2d": [50, 200, 300, 500], "label": "square"}, {"bbox_2d": [600, 100, 900, 400], "label": "sky"}]'
CHATML = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def sample(folder: Path, i: int = 0, form: str = "mca", **fields) -> TrainSample:
    """A P2R-10k-style sample whose image is written to `folder`."""
    path = folder / f"image_{i}.png"
    p2r10k.picture(i).save(path)
    values = {"id": str(i), "question": p2r10k.question(i, form), "answer": p2r10k.answer(i, form), "image": str(path)}
    return TrainSample(**{**values, "answer_form": form, **fields})


def chat_prompt(sample: TrainSample, images: int = 1) -> str:
    """The perceive prompt as OpenRLHF renders it with the Qwen-VL chat template."""
    text = prompts.perceive_text(sample.question, training=True)
    return CHATML.format(system=prompts.SYSTEM_PROMPT, images=IMAGE * images, text=text)


def query(prompt: str, response: str, pads: int = 24) -> str:
    """prompt + response as OpenRLHF decodes it: image placeholders expanded, end-of-turn token kept."""
    return prompt.replace("<|image_pad|>", "<|image_pad|>" * pads) + response + "<|im_end|>"


def image_count(body: dict) -> int:
    return sum(part.get("type") == "image_url" for part in body["messages"][-1]["content"])


def user_text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content if p["type"] == "text")


def reasoner(with_evidence: str, without: str):
    """A frozen reasoner that answers `with_evidence` when it sees evidence images, else `without`."""

    def reply(body: dict) -> str:
        answer = with_evidence if image_count(body) > 1 else without
        return f"<think>I looked.</think><answer>{answer}</answer>"

    return reply


def verifier(body: dict) -> str:
    """A verifier that says Yes exactly when the predicted answer equals the ground truth."""
    text = user_text(body)
    truth = text.split("Ground truth answer: ")[1].split("\n")[0]
    predicted = text.split("Predicted answer: ")[1].split("\n")[0]
    return "Yes" if truth == predicted else "No"


def configure(monkeypatch, role: str, reasoner=None, verifier=None, **env: str) -> None:
    """Point the reward's environment at these servers (a dead port for a missing one); fast retries."""
    monkeypatch.setenv("P2R_ROLE", role)
    for name, server in (("REASONER", reasoner), ("VERIFIER", verifier)):
        monkeypatch.setenv(f"{name}_PORT", str(server.port if server else free_port()))
        monkeypatch.setenv(f"{name}_MODEL", "scripted")
    settings = {"P2R_RETRIES": "1", "P2R_BACKOFF_S": "0.02", "P2R_TIMEOUT_S": "10", **env}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)


class ScriptedPolicy:
    """Stands in for OpenRLHF's vLLM engine (`RolloutRayActor.generate`): replies with fixed texts, tokenized by the
    real tokenizer, and records each call's (prompt ids, images, max_tokens), i.e. what vLLM would be asked."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    @property
    def max_tokens(self) -> list[int]:
        return [call[2] for call in self.calls]

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        self.calls.append((list(prompt_token_ids), multi_modal_data, sampling_params.max_tokens))
        text = self.replies[len(self.calls) - 1] + "<|im_end|>"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, text=text, finish_reason="stop", logprobs=None)])


def sampling_params(max_tokens: int | None = 64) -> SimpleNamespace:
    """The fields of vLLM's SamplingParams that OpenRLHF's executors read (`--rollout.max_new_tokens` as max_tokens)."""
    return SimpleNamespace(max_tokens=max_tokens, logprobs=None)
