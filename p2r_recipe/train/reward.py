"""PRA-GRPO rewards: `reward_func` for OpenRLHF's `--reward.remote_url`, and the per-rollout scoring the agents reuse.

Where to customise. The box rules: `box_rule` (and `evidence.py` for parsing and crops); how an
answer scores: `scoring.training_answer` / `scoring.score_training`; what the frozen reasoner is
sent: `Rewarder._reason_messages` and `release.REASONER_PARAMS`; a new per-rollout flag: `Outcome`
and `FAILURES`. Everything else is plumbing OpenRLHF needs.

Signature. OpenRLHF 0.11.2 loads this file with importlib (hence the absolute imports)
and calls `reward_func(queries, prompts, labels)` once per rollout, from a worker thread:
`queries` are prompt + response decoded with special tokens (a VLM's image placeholders
expanded), `prompts` the chat-formatted prompts, `labels` the JSON labels written by
`p2r_recipe.train.prepare` (a `TrainSample`). Batches of any size work.

Returns `{"rewards": Tensor[B], "scores": Tensor[B], "extra_logs": {name: Tensor[B]}}`;
rewards equal scores, in {0, 1}. OpenRLHF turns every extra log into a tensor, so they
are numbers: `box_count`, `no_evidence` (0/1), `untagged` (0/1: no `<answer>` tags, the
whole reply was scored) and one 0/1 flag per failure reason (`FAILURES`). Text (answers, predictions) goes to `$P2R_REWARD_LOG`, a JSONL file.

Environment.
- `P2R_ROLE`: perceiver | reasoner (required).
- `REASONER_HOST/PORT/MODEL/API_KEY` (perceiver role), `VERIFIER_...` (free-form answers):
  see `p2r_recipe.train.services` for the defaults.
- `P2R_MAX_PIXELS`, `P2R_MIN_PIXELS`, `P2R_CROP_MAX_PIXELS`: pixel budget of the images
  sent to the reasoner (default `TRAIN_BUDGET`, the release's 2,097,152 and 4,096).
- `P2R_CONCURRENCY`, `P2R_TIMEOUT_S`, `P2R_RETRIES`, `P2R_BACKOFF_S`: service clients.
- `P2R_REASONER_MAX_TOKENS`: the frozen reasoner's answer budget (default 2048, the release's).
- `P2R_REWARD_LOG`: optional path; one JSON line per rollout (answer, prediction, reason).

Rules (the release's, in order). Perceiver: any pair of ALL valid boxes with IoU > 0.5 on
the coordinates as written -> 0 (`iou_penalty`); any box label missing, empty, null or
"description" (case and surrounding spaces ignored) -> 0 (`label_penalty`; ours: a label
that is not a string is penalised too, where the release raises); else the evidence goes
to the frozen reasoner (`service_messages`, JPEG quality 75, max_tokens 2048, temperature
0, nothing else) and its answer is scored. An output with no valid box (including `[]`)
is not penalised: the reasoner answers from the original image with the no-evidence
prompt (`no_evidence` = 1). Reasoner: the policy's own answer is scored. Answers follow
`scoring.training_answer` (first `<answer>` tags, else the whole reply; `untagged` = 1)
and `scoring.score_training` (mca: first letter A-E; na: mathruler; other forms 0).
Free-form answers go to the verifier, read strictly (`scoring.parse_verdict`).

Failures. A service that stays down through its retries raises `ServiceUnavailable`
naming it: never a reward of 0. OpenRLHF 0.11.2's single-turn executor catches exceptions
from `reward_func` and logs them at INFO, leaving the rollout without a reward; training
then stops at the experience step with OpenRLHF's own error. The cause is therefore also
logged here at ERROR. `p2r_recipe/train/agent.py` lets the exception propagate instead.
Per-rollout problems that are not outages score 0 and raise their flag:
`verifier_unparsed` (verifier said neither yes nor no),
`request_rejected` (a service refused that request, e.g. too long), `image_error`
(the original image cannot be read).
"""

# No `from __future__ import annotations`: OpenRLHF executes this file without registering it
# in sys.modules, and dataclasses cannot resolve string annotations of such a module.
import asyncio
import functools
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from itertools import combinations

import torch
from PIL import Image

from p2r_recipe.client import RequestRejected, ServiceUnavailable, gather_all, image_part, run_sync
from p2r_recipe.evidence import PLACEHOLDER_LABEL, Box, gather_evidence, iou, parse_boxes
from p2r_recipe.images import TRAIN_BUDGET, ImageError, PixelBudget, load_image
from p2r_recipe.prompts import reason_text, service_messages
from p2r_recipe.release import IOU_LIMIT, REASONER_PARAMS, TRAIN_JPEG_QUALITY
from p2r_recipe.scoring import (
    TRAINING_LETTERS,
    VerdictError,
    extract_choice,
    score_free_form,
    score_training,
    training_answer,
)
from p2r_recipe.train.schema import TrainSample
from p2r_recipe.train.services import ServiceConfig, env_number

ROLES = ("perceiver", "reasoner")
# Up to this many boxes (120 pairs, under 0.1 ms) the pairs are checked one by one. The check runs on the
# event loop, where the tensor version took ~0.4 ms per rollout while threads prepared images (small
# torch calls, torch.triu above all, slow down when the cores are busy), delaying every request.
PAIRWISE_MAX_BOXES = 16
FAILURES = ("iou_penalty", "label_penalty", "verifier_unparsed", "request_rejected", "image_error")
# The 8 rollouts of a prompt share one decoded original; high-resolution images are large, so keep few.
IMAGE_CACHE_SIZE = 8
# Placeholder tokens a VLM processor repeats once per visual token (Qwen-VL, Gemma).
IMAGE_PADS = ("<|image_pad|>", "<|video_pad|>", "<image_soft_token>")
_END_TOKENS = re.compile(r"(?:\s*(?:<\|im_end\|>|<\|endoftext\|>|<end_of_turn>|<eos>|</s>))+\s*$")

logger = logging.getLogger("p2r_recipe.train.reward")


@dataclass
class Outcome:
    """What one rollout earned, and why."""

    score: float
    reason: str = ""  # one of FAILURES, or "" when the answer was scored
    box_count: int = 0
    has_evidence: bool = False
    answer: str | None = None  # the scored answer text (the reasoner's or the policy's)
    prediction: str = ""  # what was compared with the ground truth
    untagged: bool = False  # the reply had no <answer> tags, so all of it was the answer

    def logs(self) -> dict[str, float]:
        flags = {code: float(self.reason == code) for code in FAILURES}
        return {
            "box_count": float(self.box_count), "no_evidence": float(not self.has_evidence),
            "untagged": float(self.untagged), **flags,
        }  # fmt: skip


@dataclass(frozen=True)
class RewardConfig:
    """Everything the reward reads from the environment."""

    role: str
    reasoner: ServiceConfig
    verifier: ServiceConfig
    budget: PixelBudget = TRAIN_BUDGET
    reasoner_max_tokens: int = REASONER_PARAMS["max_tokens"]
    log_path: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, role: str | None = None) -> "RewardConfig":
        env = os.environ if env is None else env
        role = role or env.get("P2R_ROLE", "")
        if role not in ROLES:
            raise ValueError(f"P2R_ROLE={role!r}: set it to one of {ROLES}")
        budget = PixelBudget(
            max_pixels=env_number(env, "P2R_MAX_PIXELS", TRAIN_BUDGET.max_pixels, int),
            min_pixels=env_number(env, "P2R_MIN_PIXELS", TRAIN_BUDGET.min_pixels, int),
            crop_max_pixels=env_number(env, "P2R_CROP_MAX_PIXELS", TRAIN_BUDGET.crop_max_pixels, int),
        )
        reasoner, verifier = ServiceConfig.from_env("reasoner", env), ServiceConfig.from_env("verifier", env)
        max_tokens = env_number(env, "P2R_REASONER_MAX_TOKENS", REASONER_PARAMS["max_tokens"], int)
        return cls(role, reasoner, verifier, budget, max_tokens, env.get("P2R_REWARD_LOG") or None)


@functools.lru_cache(maxsize=IMAGE_CACHE_SIZE)
def _decoded(path: str) -> Image.Image:
    return load_image(path, "release")


@functools.lru_cache(maxsize=4 * IMAGE_CACHE_SIZE)
def _decoding(path: str) -> threading.Lock:
    return threading.Lock()


def _original(path: str) -> Image.Image:
    # A prompt's rollouts are scored at once: one thread decodes, the others wait for its cached result.
    with _decoding(path):
        return _decoded(path)


def _overlapping(boxes: list[Box], rows: int = 128) -> bool:
    """Whether any pair has IoU > IOU_LIMIT: `evidence.iou` pair by pair for a few boxes, else its arithmetic
    on blocks of pairs at once, since a runaway reply can hold 10,000 boxes (50 million pairs)."""
    if len(boxes) <= PAIRWISE_MAX_BOXES:
        return any(iou(a, b) > IOU_LIMIT for a, b in combinations(boxes, 2))
    xy = torch.tensor([b.bbox_2d for b in boxes], dtype=torch.float64).reshape(-1, 4)
    area = torch.tensor([b.area for b in boxes], dtype=torch.float64) * 1e6
    for start in range(0, len(boxes), rows):
        a, a_area = xy[start : start + rows, None], area[start : start + rows, None]
        ix = torch.minimum(a[..., 2], xy[:, 2]) - torch.maximum(a[..., 0], xy[:, 0])
        iy = torch.minimum(a[..., 3], xy[:, 3]) - torch.maximum(a[..., 1], xy[:, 1])
        inter = ix.clamp(min=0) * iy.clamp(min=0)
        union = a_area + area - inter
        ratio = torch.where(union > 0, inter / union, 0.0)
        if torch.triu(ratio, diagonal=start + 1).gt(IOU_LIMIT).any():
            return True
    return False


def bad_label(label: object) -> bool:
    """The release's label rule: missing, empty or null, or "description" in any case with any surrounding
    whitespace (a whitespace-only label passes). Ours: any other non-string is bad too (the release raises)."""
    if not label or not isinstance(label, str):
        return True
    return label.strip().lower() == PLACEHOLDER_LABEL


def box_rule(boxes: list[Box]) -> str:
    """The release's box penalties in order: '' when the boxes pass, else the failure code."""
    if _overlapping(boxes):
        return "iou_penalty"
    if any(bad_label(b.raw_label) for b in boxes):
        return "label_penalty"
    return ""


def strip_end_tokens(text: str) -> str:
    """A response without the end-of-turn tokens a decode with special tokens leaves at its end."""
    return _END_TOKENS.sub("", text)


def response_text(query: str, prompt: str) -> str:
    """The policy's response inside `query` (= prompt + response, image placeholders possibly expanded)."""
    if query.startswith(prompt):
        return strip_end_tokens(query[len(prompt) :])
    tail = prompt
    for pad in IMAGE_PADS:
        tail = tail[tail.rfind(pad) + len(pad) :] if pad in tail else tail
    at = query.find(tail) if tail else -1
    if at < 0:
        raise ValueError(f"the prompt's end {tail[-200:]!r} does not occur in the query {query[-300:]!r}")
    return strip_end_tokens(query[at + len(tail) :])


class Rewarder:
    """Scores rollouts of one role; service calls are async, bounded by each client's concurrency, retried."""

    def __init__(self, config: RewardConfig):
        self.config = config
        self.reasoner = config.reasoner.client()
        self.verifier = config.verifier.client()
        self._log_lock = threading.Lock()

    async def score(self, response: str, sample: TrainSample) -> Outcome:
        """One rollout's outcome under the configured role."""
        if self.config.role == "perceiver":
            outcome = await self._perceiver(response, sample)
        else:
            outcome = await self.judge(response, sample)
            outcome.box_count, outcome.has_evidence = sample.box_count, sample.has_evidence
        self.log(sample, response, outcome)
        return outcome

    async def score_batch(self, responses: list[str], samples: list[TrainSample]) -> list[Outcome]:
        """All rollouts concurrently; on an outage the remaining requests are cancelled and it raises."""
        return await gather_all(self.score(r, s) for r, s in zip(responses, samples, strict=True))

    def evidence(self, sample: TrainSample, boxes: list[Box]) -> tuple[list[Image.Image], bool]:
        """The reason pass's images for these boxes, fitted to the budget, and whether they are evidence."""
        found = gather_evidence(_original(sample.image), boxes)
        return self.config.budget.fit(found.images), found.has_evidence

    def _reason_messages(self, sample: TrainSample, boxes: list[Box]) -> tuple[list[dict], bool]:
        """The frozen reasoner's request for these boxes, and whether they are evidence.

        Run in a thread: encoding the images takes milliseconds each, which on the event
        loop would hold up every other rollout's request.
        """
        images, has_evidence = self.evidence(sample, boxes)
        text = reason_text(sample.question, sample.answer_form, has_evidence, training=True)
        return service_messages(text, [image_part(im, TRAIN_JPEG_QUALITY) for im in images]), has_evidence

    async def _perceiver(self, response: str, sample: TrainSample) -> Outcome:
        boxes = parse_boxes(response)
        penalty = box_rule(boxes)
        if penalty:
            return Outcome(0.0, penalty, len(boxes))
        try:
            messages, has_evidence = await asyncio.to_thread(self._reason_messages, sample, boxes)
        except ImageError as exc:
            logger.warning("sample %s: %s", sample.id, exc)
            return Outcome(0.0, "image_error", len(boxes))
        try:
            reply = await self.reasoner.text(messages, **{**REASONER_PARAMS, "max_tokens": self.config.reasoner_max_tokens})
        except RequestRejected as exc:
            logger.warning("sample %s: %s", sample.id, exc)
            return Outcome(0.0, "request_rejected", len(boxes), has_evidence)
        return replace(await self.judge(reply, sample), box_count=len(boxes), has_evidence=has_evidence)

    async def judge(self, text: str, sample: TrainSample) -> Outcome:
        """Score `text`'s answer (the release's training rules, `scoring.training_answer`) against the ground truth."""
        answer, tagged = training_answer(text)
        found = {"answer": answer, "prediction": answer, "untagged": not tagged}
        if sample.answer_form == "free_form":
            try:
                score = await score_free_form(sample.question, sample.answer, answer, self.verifier.text)
            except VerdictError as exc:
                logger.warning("sample %s: %s", sample.id, exc)
                return Outcome(0.0, "verifier_unparsed", **found)
            except RequestRejected as exc:
                logger.warning("sample %s: %s", sample.id, exc)
                return Outcome(0.0, "request_rejected", **found)
            return Outcome(score, **found)
        if sample.answer_form == "mca":
            found["prediction"] = extract_choice(answer, TRAINING_LETTERS)
            return Outcome(score_training(answer, sample.answer, "mca"), **found)
        # Numeric equivalence may go through sympy: keep it off the event loop.
        return Outcome(await asyncio.to_thread(score_training, answer, sample.answer, sample.answer_form), **found)

    def log(self, sample: TrainSample, response: str, outcome: Outcome) -> None:
        """Append the rollout's texts and outcome to $P2R_REWARD_LOG, when set."""
        if not self.config.log_path:
            return
        line = json.dumps(
            {"id": sample.id, "role": self.config.role, "response": response, **asdict(outcome)}
        )  # ASCII escapes: a service's reply may hold a lone surrogate (\ud800), which UTF-8 cannot encode
        with self._log_lock, open(self.config.log_path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


@functools.lru_cache(maxsize=4)
def _rewarder(config: RewardConfig) -> Rewarder:
    return Rewarder(config)


def rewarder(config: RewardConfig | None = None) -> Rewarder:
    """The process-wide Rewarder for a configuration (default: from the environment), so clients are shared."""
    return _rewarder(config or RewardConfig.from_env())


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **kwargs) -> dict:
    """OpenRLHF's custom reward hook; see the module docstring for the contract."""
    scorer = rewarder()
    responses = [response_text(q, p) for q, p in zip(queries, prompts, strict=True)]
    samples = [TrainSample.from_label(label) for label in labels]
    clients = (scorer.reasoner, scorer.verifier)
    retries_before = [client.stats["retries"] for client in clients]
    try:
        outcomes = run_sync(scorer.score_batch(responses, samples))
    except ServiceUnavailable as exc:
        logger.error("P2R %s reward cannot be computed, training must stop: %s", scorer.config.role, exc)
        raise
    for client, before in zip(clients, retries_before):
        if client.stats["retries"] > before:
            logger.warning(
                "%s service at %s needed %d retries for this batch (%.1f s waited in all); every rollout was scored",
                client.name, client.base_url, client.stats["retries"] - before, client.stats["waited_s"],
            )  # fmt: skip
    scores = torch.tensor([o.score for o in outcomes], dtype=torch.float32)
    logs = [o.logs() for o in outcomes]
    extra = {name: torch.tensor([log[name] for log in logs], dtype=torch.float32) for name in logs[0]} if logs else {}
    return {"rewards": scores, "scores": scores.clone(), "extra_logs": extra}
