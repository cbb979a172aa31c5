"""The release's prompt strings, and one builder per pass (direct, perceive, reason).

Every string here is byte-for-byte what the released P2R checkpoints were trained and
evaluated with; evaluation, rewards and data preparation all build prompts through
this module so they can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SYSTEM_PROMPT = "You are a helpful assistant."

MODES = ("default", "thinking", "p2r")
ANSWER_FORMS = ("mca", "na", "free_form", "one_word", "yes_no")

_PERCEIVE = (
    "Locate the key visual evidence in the image for answering this question. "
    'Report bbox coordinates in JSON format only: [{{"bbox_2d": [x1, y1, x2, y2], "label": "{label}"}}] '
    "If the question requires the entire image, return an empty list []."
)
PERCEIVE_INSTRUCTION = _PERCEIVE.format(label="<description>")
# Training wrote a bare "description" in the example JSON; the perceiver reward
# penalises boxes that copy it, so the stage-1 policy must see exactly this variant.
PERCEIVE_INSTRUCTION_TRAIN = _PERCEIVE.format(label="description")

WITH_EVIDENCE = "The key visual regions have been highlighted and cropped for you. Think step by step.\n"
NO_EVIDENCE = "Think step by step.\n"
# The release's evaluation "thinking" mode has a space before the newline; keep it.
THINKING_EVAL = "Think step by step. \n"

_REASON_HEAD = "Provide your detailed reasoning between the <think> </think> tags, and then "
_REASON_TAIL = {
    "mca": "answer the question with the option's letter from the given choices (e.g., A, B, etc.)",
    "na": "answer the question using a numerical value (e.g., 42 or 3.1)",
    "free_form": "answer the question simply",
    "one_word": "answer the question using a single word or phrase",
    "yes_no": "answer the question using yes or no",
}
_FREE_FORM_TRAIN_TAIL = "provide your text answer"

DIRECT_POST_PROMPTS = {
    "mca": "Answer the question with the option's letter from the given choices (e.g., A, B, etc.) directly.\n",
    "na": "Answer the question using a numerical value (e.g., 42 or 3.1) directly.\n",
    "free_form": "Output the answer simply and directly.\n",
    "one_word": "Output the answer using a single word or phrase directly.\n",
    "yes_no": "Output yes or no directly.\n",
}


def _check_form(answer_form: str) -> None:
    if answer_form not in ANSWER_FORMS:
        raise ValueError(f"unknown answer form {answer_form!r}; expected one of {ANSWER_FORMS}")


def reasoning_post_prompt(answer_form: str, training: bool = False) -> str:
    """The post-prompt asking for <think> reasoning and an <answer> of the given form.

    Training has the release's three tails only: any form but mca and na gets the free-form one.
    """
    if training:
        tail = _REASON_TAIL[answer_form] if answer_form in ("mca", "na") else _FREE_FORM_TRAIN_TAIL
    else:
        _check_form(answer_form)
        tail = _REASON_TAIL[answer_form]
    return f"{_REASON_HEAD}{tail} within the <answer> </answer> tags.\n"


def direct_text(question: str, answer_form: str) -> str:
    """User text of the `default` (direct answer) mode."""
    _check_form(answer_form)
    return f"Question: {question}\n{DIRECT_POST_PROMPTS[answer_form]}"


def perceive_text(question: str, training: bool = False) -> str:
    """User text of the perceive pass."""
    return f"Question: {question}\n{PERCEIVE_INSTRUCTION_TRAIN if training else PERCEIVE_INSTRUCTION}"


def reason_text(question: str, answer_form: str, has_evidence: bool, training: bool = False) -> str:
    """User text of the reason pass of p2r mode (with or without evidence images)."""
    lead = WITH_EVIDENCE if has_evidence else NO_EVIDENCE
    return f"Question: {question}\n{lead}{reasoning_post_prompt(answer_form, training)}"


def thinking_text(question: str, answer_form: str) -> str:
    """User text of the evaluation `thinking` mode (one reasoning pass on the original image)."""
    return f"Question: {question}\n{THINKING_EVAL}{reasoning_post_prompt(answer_form)}"


def service_messages(text: str, image_parts: list[dict]) -> list[dict]:
    """The release's training calls to a frozen partner (perceiver, reasoner): the system prompt as a
    plain string, then one user turn of the images followed by the text."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [*image_parts, {"type": "text", "text": text}]},
    ]


@dataclass
class Prompt:
    """One chat turn to generate from: the user's images (in order, before the text) and text."""

    text: str
    images: list[Any] = field(default_factory=list)
    system: str = SYSTEM_PROMPT

    def messages(self, image_parts: list[dict] | None = None) -> list[dict]:
        """OpenAI-style chat messages; `image_parts` replaces the bare image placeholders."""
        parts = image_parts if image_parts is not None else [{"type": "image"} for _ in self.images]
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system}]},
            {"role": "user", "content": [*parts, {"type": "text", "text": self.text}]},
        ]
