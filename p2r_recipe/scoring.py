"""Scoring: answer extraction, option letters, numeric equivalence, and the verifier's judgement.

Two rule sets live here: the release's evaluation rules (`answer_text`, `score_answer`) and
its training-reward rules (`training_answer`, `score_training`), which differ: training
scores the whole reply when it has no `<answer>` tags, takes letters A-E, and grades
numbers with mathruler.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Awaitable, Callable

from .release import TRAINING_LETTERS, VERIFIER_PARAMS

ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
    "Answer:",
    "Option:",
    "The correct answer",
    "The correct option",
)
# Two searches, not one lazy pattern: `<answer>(.*?)</answer>` rescans the rest of the text from
# every unclosed tag, minutes for a megabyte of them. Case-sensitive, as the release's evaluation
# (and its training reward) reads the tags: `<ANSWER>` is no answer tag.
_ANSWER_OPEN = re.compile(r"<answer>")
_ANSWER_CLOSE = re.compile(r"</answer>")
_THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)

# Longer "numbers" are not numbers; sympy could spend minutes on a hostile power tower.
MAX_MATH_CHARS = 100
# Even a short answer explodes through powers and factorials: math-verify computes exact values,
# 9^{9^{9}} has 370 million digits, and off the main thread (rewards) no timeout can stop it. So a
# prediction may hold one power with an exponent of at most 4 digits, and nothing factorial-like.
_POWER = re.compile(r"\^|\*\*")
_SMALL_POWER = re.compile(r"(?:\^|\*\*)\s*\{?\s*-?\d{1,4}\s*\}?(?![\d.])")
_FACTORIAL_LIKE = re.compile(r"!|binom|choose|gamma|factorial|\\exp|exp\(", re.IGNORECASE)
logging.getLogger("math_verify").setLevel(logging.ERROR)

VERIFIER_SYSTEM = "You are a helpful grading assistant."
VERIFIER_TEMPLATE = (
    "Given the question and its ground truth answer, determine if the predicted answer is correct. "
    "Consider semantic equivalence, not just exact string match.\n\n"
    "Question: {question}\nGround truth answer: {ground_truth}\nPredicted answer: {answer}\n\n"
    'Is the predicted answer correct? Reply with only "Yes" or "No".'
)
# The release's training rules: option letters A-E whatever the question lists (release.TRAINING_LETTERS),
# forms scored locally; the verifier request is release.VERIFIER_PARAMS, field for field.
TRAINING_LOCAL_FORMS = ("mca", "na")


def answer_text(output: str, mode: str) -> str | None:
    """The answer part of a model output: inside the first lower-case <answer>...</answer> pair for
    reasoning modes (None when there is none; `<ANSWER>` or `<Answer>` are not tags, as in the
    release's case-sensitive `re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)`), the whole
    output for the default mode."""
    if mode == "default":
        return output.strip()
    opened = _ANSWER_OPEN.search(output)
    closed = opened and _ANSWER_CLOSE.search(output, opened.end())
    return output[opened.end() : closed.start()].strip() if closed else None


def training_answer(output: str) -> tuple[str, bool]:
    """The training reward's answer: inside the first case-sensitive <answer> tags, else the whole
    reply; stripped either way. Also says whether the tags were there."""
    opened = output.find("<answer>")
    closed = output.find("</answer>", opened + len("<answer>")) if opened >= 0 else -1
    if closed < 0:
        return output.strip(), False
    return output[opened + len("<answer>") : closed].strip(), True


def extract_choice(text: str, letters: str = "ABCD") -> str:
    """The release's lenient option-letter rule: the first option letter anywhere, '' when none.

    Known answer prefixes are removed first. (The release's "more than 10 words and no
    letter -> empty" guard is implied: without a letter the result is empty anyway.)
    A stray capital counts, as in the published numbers.
    """
    if not isinstance(text, str):
        return ""
    s = text.strip()
    for prefix in ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    found = re.search(f"[{re.escape(letters)}]", s)
    if found is None:
        return ""
    return found.group(0)


def _number(text: str) -> float | None:
    try:
        value = float(text.strip().rstrip(".").replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numbers_equal(prediction: str, ground_truth: str) -> bool:
    """Mathematical equivalence of a numeric answer (plain numbers fast, the rest via math-verify)."""
    pred, gold = _number(prediction), _number(ground_truth)
    if pred is not None and gold is not None:
        return math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-9)
    if len(prediction) > MAX_MATH_CHARS or len(ground_truth) > MAX_MATH_CHARS or _explosive(prediction):
        return False
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parsed(text: str):
        return parse(text if "$" in text else f"${text}$", parsing_timeout=timeout)

    try:
        return bool(verify(parsed(ground_truth), parsed(prediction), timeout_seconds=timeout))
    except Exception:
        return False


def _explosive(text: str) -> bool:
    """Whether math-verify could be led to compute an astronomically large exact value."""
    powers = len(_POWER.findall(text))
    return bool(_FACTORIAL_LIKE.search(text)) or powers > 1 or (powers == 1 and not _SMALL_POWER.search(text))


def score_choice(prediction: str, ground_truth: str, letters: str = "ABCD") -> float:
    return float(extract_choice(prediction, letters) == ground_truth.strip().lstrip("(").upper()[:1])


def score_number(prediction: str, ground_truth: str) -> float:
    return float(numbers_equal(prediction, ground_truth))


def grade_number(prediction: str, ground_truth: str) -> bool:
    """The release's training rule for numeric answers: mathruler's `grade_answer`, any exception False.

    One guard of ours: an answer that could make sympy compute an astronomically large value
    (see `_explosive`) is False unless it equals the ground truth as text, since the release
    would hang the reward there.
    """
    if prediction.strip() == ground_truth.strip():
        return True
    if len(prediction) > MAX_MATH_CHARS or _explosive(prediction):
        return False
    from mathruler.grader import grade_answer

    try:
        return bool(grade_answer(prediction, ground_truth))
    except Exception:
        return False


def score_training(answer: str, ground_truth: str, answer_form: str) -> float:
    """The release's training reward for a locally checkable answer: mca (first A-E letter, exact match
    with the stripped, upper-cased truth) and na (mathruler); every other form but free_form scores 0."""
    if answer_form == "free_form":
        raise ValueError("free_form answers need the verifier (score_free_form)")
    if answer_form == "mca":
        return float(extract_choice(answer, TRAINING_LETTERS) == ground_truth.strip().upper())
    if answer_form == "na":
        return float(grade_number(answer, ground_truth))
    return 0.0


def verifier_messages(question: str, ground_truth: str, answer: str) -> list[dict]:
    """The chat the verifier LLM is asked to judge a free-form answer with."""
    text = VERIFIER_TEMPLATE.format(question=question, ground_truth=ground_truth, answer=answer)
    return [{"role": "system", "content": VERIFIER_SYSTEM}, {"role": "user", "content": text}]


def parse_verdict(reply: str) -> bool | None:
    """Strict reading of a verifier reply: a leading yes/no once think blocks are removed, else None."""
    text = _THINK_BLOCK.sub("", reply or "").strip().lstrip("*\"'`#:- \n").lower()
    if re.match(r"yes\b", text):
        return True
    if re.match(r"no\b", text):
        return False
    return None


class VerdictError(RuntimeError):
    """The verifier answered, but with neither yes nor no."""


async def score_free_form(
    question: str, ground_truth: str, prediction: str, chat: Callable[..., Awaitable[str]]
) -> float:
    """Free-form answers are judged by the verifier service; `chat(messages, **params)` sends one request."""
    reply = await chat(verifier_messages(question, ground_truth, prediction), **VERIFIER_PARAMS)
    verdict = parse_verdict(reply)
    if verdict is None:
        raise VerdictError(f"verifier reply is neither yes nor no: {reply[:200]!r}")
    return float(verdict)


def score_answer(prediction: str | None, ground_truth: str, answer_form: str, letters: str = "ABCD") -> float:
    """Score an extracted answer of a locally checkable form (mca, na, one_word, yes_no); 0 when missing."""
    if prediction is None or prediction == "":
        return 0.0
    if answer_form == "mca":
        return score_choice(prediction, ground_truth, letters)
    if answer_form == "na":
        return score_number(prediction, ground_truth)
    if answer_form in ("one_word", "yes_no"):
        return float(_normalise(prediction) == _normalise(ground_truth))
    raise ValueError(f"answer form {answer_form!r} needs the verifier (score_free_form)")


def _normalise(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text).strip().lower()
